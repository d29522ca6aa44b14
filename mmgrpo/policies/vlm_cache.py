"""The decode loop's KV cache: B prompts' prefill caches joined into one cache of B*G rows (:func:`join_caches`),
left-padded to the longest prompt, in preallocated buffers that each decoded token is written into in place.

Used by :meth:`mmgrpo.policies.vlm.VLMPolicy.sample_batch`; transformers is imported on first use (it loads with the
first VLM, not with mmgrpo).
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def join_caches(caches: list[Any], lengths: list[int], G: int, room: int = 0) -> Any | None:
    """B prefill caches (one row each, prompt b's ``lengths[b]`` slots) -> one cache of B*G rows, left-padded.

    Row n = b*G + j holds prompt b's keys/values in its last ``lengths[b]`` slots; the first ``max(lengths) -
    lengths[b]`` slots are zeros that the decode loop's attention mask hides. The joined layers keep their keys and
    values in buffers with ``room`` more slots, which each decoded token is written into in place (a
    ``DynamicLayer`` concatenates, i.e. copies the whole cache, at every token). Only transformers' ``DynamicCache``
    of plain ``DynamicLayer`` layers is joined (the first cache object is reused); for any other layout (sliding
    windows, static or quantised caches) one prompt's cache is repeated G times as it is, and several give None, which
    the caller then decodes prompt by prompt.
    """
    from transformers.cache_utils import DynamicLayer

    layers = [getattr(c, "layers", None) for c in caches]
    if any(ls is None or len(ls) != len(layers[0]) or any(type(x) is not DynamicLayer for x in ls) for ls in layers):
        if len(caches) == 1:
            caches[0].batch_repeat_interleave(G)
            return caches[0]
        return None
    L = max(lengths)
    for i in range(len(layers[0])):
        bufs = []
        for name in ("keys", "values"):
            first = getattr(layers[0][i], name)  # [1, H, L_0, d]
            # [B*G, H, L + room, d]; the room is written before it is read, so only the pad slots are zeroed
            out = first.new_empty(len(caches) * G, first.shape[1], L + room, first.shape[3])
            for b, ls in enumerate(layers):
                out[b * G : (b + 1) * G, :, : L - lengths[b]] = 0  # masked, but finite: 0 weight x NaN is NaN
                out[b * G : (b + 1) * G, :, L - lengths[b] : L] = getattr(ls[i], name)  # broadcast over the G rows
            bufs.append(out)
        caches[0].layers[i] = _buffered_layer(*bufs, L)
    return caches[0]


def _buffered_layer(keys: torch.Tensor, values: torch.Tensor, length: int) -> Any:
    """A transformers ``DynamicLayer`` over preallocated buffers [N, H, capacity, d] whose first ``length`` slots
    are filled: ``update`` writes the new slots in place and returns views (past the capacity it concatenates, as a
    ``DynamicLayer`` does)."""
    layer = _buffered_layer_class()()
    layer.lazy_initialization(keys, values)
    layer.buffers = (keys, values)
    layer.keys, layer.values = keys[:, :, :length], values[:, :, :length]
    return layer


@functools.cache
def _buffered_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer  # transformers loads with the first VLM, not with mmgrpo

    class BufferedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            n, q = self.keys.shape[-2], key_states.shape[-2]
            if n + q > self.buffers[0].shape[-2]:
                return super().update(key_states, value_states, *args, **kwargs)
            for buf, new in zip(self.buffers, (key_states, value_states)):
                buf[:, :, n : n + q] = new
            self.keys, self.values = (buf[:, :, : n + q] for buf in self.buffers)
            return self.keys, self.values

    return BufferedLayer
