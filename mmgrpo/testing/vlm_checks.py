"""What the VLM tests share: one tiny model per family, a two-prompt image batch, the ratio and HF-forward checks.

:data:`VLM_BUILDERS` maps every registered built-in VLM family to its tiny test model (``tests/policies/
test_vlm_conformance.py`` runs the same contract over all of them); a new family adds its builder here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.testing.tiny_vlm import tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl

VLM_BUILDERS = {
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "generic": tiny_llava,
}
"""family -> builder of its tiny (model, processor), seeded"""


def images(seed: int = 0) -> list[np.ndarray]:
    """Two uint8 images [H, W, 3] of different sizes (so the prompts have different lengths)."""
    rng = np.random.default_rng(seed)
    return [(rng.random((64, 64, 3)) * 255).astype(np.uint8), (rng.random((60, 100, 3)) * 255).astype(np.uint8)]


def image_batch(seeds: tuple[int, ...] = (11, 12)) -> PromptBatch:
    """B = 2 prompts, a plain question and a multiple-choice one, one image each."""
    a, b = images()
    return PromptBatch(
        prompts=["How many red circles are there?", {"question": "Which shape is blue?", "options": ["a", "b"]}],
        meta=[{"images": [a], "answer": "A"}, {"images": [b], "answer": "B"}],
        seeds=list(seeds),
    )


def make_policy(family: str = "qwen2_vl", reference: bool = False, **options) -> VLMPolicy:
    """A policy over ``family``'s tiny model (seed 0), K = 10 unless ``options`` says otherwise."""
    torch.manual_seed(0)
    model, processor = VLM_BUILDERS[family]()
    return VLMPolicy(model, processor, VLMPolicyOptions(**{"max_new_tokens": 10, **options}), reference=reference)


def biased_head(policy: VLMPolicy, ids: torch.Tensor, value: float = 30.0) -> torch.nn.Linear:
    """Swap the LM head for one whose bias makes ``ids`` the most likely tokens by far."""
    hf = policy.model.hf
    old = hf.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[ids] = value
    hf.lm_head = head
    return head


def ratio_error(policy: VLMPolicy, rollout, micro: int) -> float:
    """max |exp(logp - logp_old) - 1| over the trained tokens, recomputing ``micro`` rows at a time."""
    worst = 0.0
    for lo in range(0, rollout.num_rows, micro):
        rows = torch.arange(lo, min(lo + micro, rollout.num_rows))
        units = rollout.train_mask[rows].any(0).nonzero().reshape(-1)
        lp = policy.log_prob(rollout, rows, units).logp
        ratio = torch.exp(lp - rollout.logp_old[rows][:, units])
        worst = max(worst, (ratio - 1).abs().masked_select(rollout.train_mask[rows][:, units]).max().item())
    return worst


def hf_reference_logprobs(policy: VLMPolicy, rollout, row: int) -> torch.Tensor:
    """Token log-probs [n] of one row by the transformers model's OWN forward (its positions, vision scatter and, for
    Qwen3-VL, deepstack), to compare with the policy's scorer."""
    logits = hf_reference_logits(policy, rollout, row)  # [n, V]
    comp = rollout.extras["completion_ids"][row, : logits.shape[0]]
    return torch.log_softmax(logits, -1).gather(-1, comp[:, None]).squeeze(-1)  # [n]


def hf_reference_logits(policy: VLMPolicy, rollout, row: int) -> torch.Tensor:
    """fp32 logits [n, V] / temperature (suppressed ids -inf) predicting each of one row's n completion tokens, by the
    transformers model's own teacher-forced forward: the distributions the row's tokens were sampled from."""
    prompt = rollout.extras["prompt"][row]
    n = int(rollout.extras["completion_len"][row])
    comp = rollout.extras["completion_ids"][row, :n]
    ids = torch.cat([prompt.input_ids, comp])[None]  # [1, Lp + n]
    kw = dict(prompt.vision)
    if prompt.mm_token_type_ids is not None:
        kw["mm_token_type_ids"] = torch.cat([prompt.mm_token_type_ids, torch.zeros_like(comp)])[None]
    with torch.no_grad():
        logits = policy.model.hf(input_ids=ids, **kw).logits[0].float()
    Lp = prompt.input_ids.shape[0]
    logits = logits[Lp - 1 : Lp - 1 + n] / policy.options.temperature
    return logits.masked_fill(policy.model.suppress, -math.inf)  # [n, V]


def write_mp4(path, frames: int = 8, size: int = 64, fps: int = 4):
    """A small real mp4 (``frames`` grey levels with noise) for video prompts."""
    import imageio

    rng = np.random.default_rng(0)
    clip = [np.full((size, size, 3), 40 * i % 255, dtype=np.uint8) for i in range(frames)]
    clip = [np.clip(f.astype(int) + rng.integers(0, 30, f.shape), 0, 255).astype(np.uint8) for f in clip]
    imageio.mimwrite(str(path), clip, fps=fps)
    return path
