"""Write the tiny VLM asset that configs/vlm_reasoning_tiny.yaml trains: ``assets/tiny_qwen2_vl/`` (< 1 MB).

    python scripts/make_tiny_vlm.py                       # Qwen2-VL, seed 0, short format warm-up
    python scripts/make_tiny_vlm.py --family qwen2_5_vl --out assets/tiny_qwen2_5_vl --sft-steps 0
    python scripts/make_tiny_vlm.py --family qwen3_vl --out assets/tiny_qwen3_vl  # any family of VLM_BUILDERS

The model is :func:`mmgrpo.testing.tiny_vlm.tiny_qwen2_vl` (random init, local tokenizer, real Qwen processor).
A randomly initialised model never writes ``<think>...</think><answer>...</answer>``, so the format reward would be 0
for every sample and GRPO would have no signal. ``--sft-steps`` teacher-forces a few hundred steps of that format on
synthetic shapes questions with a *random* option letter as the answer: the model learns the format, not the answers
(accuracy stays at chance), which leaves the accuracy reward for RL to improve. ``--sft-steps 0`` skips it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mmgrpo.core.types import PromptBatch
from mmgrpo.pipelines.vlm_reasoning import shapes_question
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.testing.tiny_vlm import save_tiny
from mmgrpo.testing.vlm_checks import VLM_BUILDERS


def format_target(options: list[str], rng: np.random.Generator) -> str:
    """An R1-format completion with a random option letter (format, not knowledge)."""
    letter = "ABCD"[int(rng.integers(len(options)))]
    return f"<think> I look at the shapes. </think><answer> {letter} </answer>"


def warm_up_format(model, processor, steps: int, lr: float = 3e-3, batch: int = 4, seed: int = 0) -> list[float]:
    """Full fine-tuning of ``model`` (in place) on format targets; returns the per-step NLL (nats per token)."""
    policy = VLMPolicy(model, processor, VLMPolicyOptions(finetune="full", freeze_vision=False, max_new_tokens=32))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    tok, losses = policy.tokenizer, []
    policy.model.train()
    for _ in range(steps):
        examples = [shapes_question(int(rng.integers(1 << 30)), seed) for _ in range(batch)]
        prompts = [policy.prepare(p, m) for p, m in examples]
        targets = [tok(format_target(p["options"], rng) + "<|im_end|>").input_ids for p, _ in examples]
        L = max(len(t) for t in targets)
        comp = torch.full((batch, L), policy.pad_id, dtype=torch.long)
        mask = torch.zeros(batch, L)
        for i, t in enumerate(targets):
            comp[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), 1.0
        logp, _ = policy.model(prompts, comp)  # [batch, L]
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    policy.model.eval()
    return losses


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(VLM_BUILDERS), default="qwen2_vl")
    ap.add_argument("--out", default="assets/tiny_qwen2_vl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft-steps", type=int, default=300, help="format warm-up steps (0 = random weights)")
    args = ap.parse_args(argv)
    model, processor = VLM_BUILDERS[args.family](seed=args.seed)
    if args.sft_steps:
        torch.manual_seed(args.seed)
        losses = warm_up_format(model, processor, args.sft_steps, seed=args.seed)
        print(f"format warm-up: NLL {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f} nats/token")
        check = [shapes_question(10_000 + i, args.seed) for i in range(4)]
        policy = VLMPolicy(model, processor, VLMPolicyOptions(finetune="full", max_new_tokens=32))  # no adapters
        print("greedy samples:", policy.generate(PromptBatch([p for p, _ in check], [m for _, m in check])))
    out = save_tiny(model, processor, args.out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote {out}/ ({size:.2f} MB)")
    return out


if __name__ == "__main__":
    main()
