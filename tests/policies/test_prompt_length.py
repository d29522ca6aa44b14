"""A prompt longer than a text encoder's tokens: the model reads its first tokens, as the diffusers pipeline does,
and the run says so once per encoder (mmgrpo.policies.models.text)."""

import warnings

import pytest
import torch

from mmgrpo.policies.models import text
from mmgrpo.testing.tiny_flux import tiny_flux_adapter
from mmgrpo.testing.tiny_sd3 import tiny_sd3_adapter


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_long_prompt_is_cut_as_diffusers_cuts_it_and_said_once(monkeypatch, family):
    monkeypatch.setattr(text, "_WARNED", set())
    adapter = tiny_sd3_adapter() if family == "sd3" else tiny_flux_adapter()
    clip = adapter.tokenizers[0] if family == "sd3" else adapter.tokenizer
    limit = clip.model_max_length
    short = "a red circle"
    words = " ".join(["red"] * (3 * limit))  # ~3x the CLIP tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.encode([short, short])  # within every encoder's length: silent
        exact = " ".join(["red"] * (limit - 2))  # BOS + limit - 2 words + EOS: fills the window, nothing cut
        assert len(clip(exact)["input_ids"]) == limit
        text.tokenize(clip, [short, exact], limit, "CLIP text encoder")  # silent too
    with pytest.warns(UserWarning, match=rf"tokens is longer than the {limit} the CLIP text encoder reads"):
        cut = adapter.encode([short, words])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = adapter.encode([short, words])  # said once
    assert all(torch.equal(cut[k], again[k]) for k in cut)
    # what the model reads is the prompt's first tokens: ids as diffusers' pipelines make them (padded, truncated)
    ids = text.tokenize(clip, [words], limit, "CLIP text encoder").input_ids
    assert ids.shape == (1, limit) and torch.equal(
        ids, clip([words], padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    )
