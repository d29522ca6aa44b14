"""Tokenising prompts for the families' text encoders: padded and cut to the encoder's length as the diffusers
pipelines do, with one warning when a prompt is longer (its end never reaches the model; diffusers logs that, and
mmgrpo's adapters used to drop it without a word)."""

from __future__ import annotations

import warnings
from typing import Any

_WARNED: set[str] = set()
"""encoders a warning was given for in this process (one each: a run repeats its prompts every step)"""


def tokenize(tok: Any, texts: list[str], max_length: int, encoder: str, **kwargs: Any) -> Any:
    """``tok(texts)`` padded and truncated to ``max_length`` tokens (``return_tensors="pt"``; ``kwargs`` passed on);
    the first time a text is longer, a warning names the ``encoder``, the length and the prompt."""
    out = tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt", **kwargs)
    if encoder in _WARNED or not texts:
        return out
    mask = out.get("attention_mask")
    # only a text that fills the whole window can have been cut: the others are not tokenised a second time
    full = range(len(texts)) if mask is None else mask.sum(1).ge(max_length).nonzero().flatten().tolist()
    if not full:
        return out
    special = kwargs.get("add_special_tokens", True)
    ids = tok([texts[i] for i in full], truncation=False, add_special_tokens=special, verbose=False)["input_ids"]
    lengths = dict(zip(full, map(len, ids)))
    longest = max(lengths, key=lengths.__getitem__)
    if lengths[longest] > max_length:
        _WARNED.add(encoder)
        text = texts[longest] if len(texts[longest]) <= 80 else texts[longest][:80] + "..."
        warnings.warn(
            f"a prompt of {lengths[longest]} tokens is longer than the {max_length} the {encoder} reads: the model "
            f"sees its first {max_length} (as the diffusers pipeline does), e.g. {text!r}; shorten the prompts"
            + (" or raise policy.options.adapter_options.max_sequence_length" if "T5" in encoder else "")
            + " (said once)",
            stacklevel=2,  # the adapter's encode
        )
    return out
