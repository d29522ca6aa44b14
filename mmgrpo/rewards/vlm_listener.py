"""The listener reward for VLM runs: a frozen VLM, loaded like the policy, re-reads the reasoning of each row.

Listener-rewarded thinking (Gambashidze et al. 2025; the reward itself is :mod:`mmgrpo.rewards.listener`):
``reward = w_fmt * format + w_acc * accuracy + w_lis * confidence`` (defaults 1, 0.5, 0.5), the confidence being
the frozen listener's softmax over the candidate answers, read at the correct one.

``vlm_listener`` is ``listener`` with a scorer that fits the ``vlm_reasoning`` recipe:

- the listener VLM is loaded by :func:`mmgrpo.policies.vlm.load_vlm`, the policy's own loading path (safetensors,
  the family's class, ``dtype``), lazily on the first call, frozen (no grad, eval);
- its prompt is the question WITH its lettered options (``question_text``: "How many ...? A) 1 B) 2 C) 3"; the
  plain ``listener`` reads only ``text``/``prompt``/``content`` keys and would see an empty question), then the
  reasoning, in the model's chat template with the row's images (resized to ``max_pixels`` like the policy's);
- candidates are the option letters A, B, ... (the policy copies a prompt's ``options`` into each row's meta) or
  ``meta["candidates"]``; each candidate's log-prob is the sum of its tokens' log-probs as the assistant's reply.

Rows without a ground truth (e.g. PEARL checklist rows) get None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.policies.vlm import VLMPolicyOptions, load_vlm
from mmgrpo.policies.vlm_inputs import load_image, question_text
from mmgrpo.rewards.listener import HFListenerScorer, ListenerReward
from mmgrpo.rewards.registry import register


class VLMListenerScorer(HFListenerScorer):
    """:class:`HFListenerScorer` reading recipe prompts ``{question, options}`` and meta images (arrays, paths)."""

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu", max_pixels: int | None = None):
        super().__init__(model, processor, device)
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "cpu", dtype: str = "float32", family: str = "auto", **kw: Any
    ) -> VLMListenerScorer:

        options = VLMPolicyOptions(path=str(path), dtype=dtype, family=family)
        model, processor = load_vlm(str(path), options, key="rewards.<vlm_listener>.options.model")
        model.requires_grad_(False)
        return cls(model.to(device), processor, device, kw.get("max_pixels"))

    def _prefix(self, prompt: Any, meta: dict, reasoning: str) -> dict[str, torch.Tensor]:
        images = meta.get("images") or ([meta["image"]] if meta.get("image") is not None else [])
        images = [load_image(im, self.max_pixels) for im in images]
        return super()._prefix({"text": question_text(prompt)}, {"images": images}, reasoning)


class LazyListener:
    """Scorer callable that loads the frozen VLM on its first call (a reward factory must not load weights)."""

    def __init__(self, path: str, **options: Any):
        self.path, self.options = path, options
        self.scorer: VLMListenerScorer | None = None

    def __call__(self, prompts, meta, reasoning_texts, candidate_answers) -> torch.Tensor:  # -> [n, C]
        if self.scorer is None:
            self.scorer = VLMListenerScorer.from_pretrained(self.path, **self.options)
        return self.scorer(prompts, meta, reasoning_texts, candidate_answers)


@register("vlm_listener")
def vlm_listener(
    model: str = "",
    w_fmt: float = 1.0,
    w_acc: float = 0.5,
    w_lis: float = 0.5,
    mode: str = "auto",
    answer_key: str = "answer",
    device: str = "cpu",
    dtype: str = "float32",
    family: str = "auto",
    max_pixels: int | None = None,
    think_tag: str = "think",
    answer_tag: str = "answer",
):
    """Listener reward with a frozen VLM loaded like the policy: w_fmt*format + w_acc*accuracy + w_lis*confidence.

    ``model``: a local VLM directory (e.g. assets/tiny_qwen2_vl). Candidates: the option letters of each row.
    """
    if not model or not Path(model).expanduser().is_dir():
        raise UserError(
            f"vlm_listener: model={model!r} is not a directory; give a local VLM checkpoint directory "
            "(e.g. assets/tiny_qwen2_vl, written by `python scripts/make_tiny_vlm.py`)"
        )
    path = str(Path(model).expanduser())
    scorer = LazyListener(path, device=device, dtype=dtype, family=family, max_pixels=max_pixels)
    weights = (float(w_fmt), float(w_acc), float(w_lis))
    return ListenerReward(
        scorer, None, weights, mode, answer_key, "candidates", "options", device, think_tag, answer_tag
    )
