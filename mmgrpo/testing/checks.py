"""Invariants every policy is tested for, as reusable assertions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmgrpo.train.trainer import train


def assert_ratio_one(policy, rollout, micro_sizes: tuple[int, ...] | None = None, atol: float = 1e-5) -> None:
    """Recomputed log-probs right after ``rollout`` give exp(logp - logp_old) = 1 (within ``atol``) for every
    micro-batch size (default: 1 and G), on every unit some row trains."""
    units = rollout.train_mask.any(0).nonzero().reshape(-1)
    assert len(units) > 0, "the rollout trains no unit"
    for micro in micro_sizes or (1, rollout.group_size):
        for lo in range(0, rollout.num_rows, micro):
            rows = torch.arange(lo, min(lo + micro, rollout.num_rows))
            lp = policy.log_prob(rollout, rows, units).logp
            ratio = torch.exp(lp - rollout.logp_old[rows][:, units])
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=atol, rtol=0), (micro, ratio)


def assert_only_lora_changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """After training ``model`` (a LoRA-wrapped denoiser): some ``lora_B`` weight moved off its initial 0, and
    every tensor of ``before`` (the denoiser's state dict as loaded, before LoRA) is bit-identical."""
    after = model.state_dict()
    lora = [k for k in after if "lora" in k]
    assert lora and any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if "lora_B" in k)
    for k, v in before.items():  # every base weight unchanged (peft renames wrapped ones to *.base_layer.*)
        stem, _, leaf = k.rpartition(".")
        key = k if k in after else f"{stem}.base_layer.{leaf}"
        assert torch.equal(after[key], v), k


def cut_and_resume(config: Callable[[Path], Any], root: Path, cut_at: int = 2) -> tuple[Any, Any]:
    """Train ``config(root / "full")`` to its end, and ``config(root / "cut")`` stopped after ``cut_at`` steps and then
    resumed from its run directory: (full, resumed) trainers, which must agree for a run that resumes exactly."""
    full = train(config(root / "full"))
    cfg = config(root / "cut")
    cfg.trainer.stop_after_steps = cut_at
    assert train(cfg).step == cut_at
    cfg.resume, cfg.trainer.stop_after_steps = str(Path(cfg.run.output_dir) / cfg.run.name), None
    return full, train(cfg)


def logged_metrics(trainer: Any) -> list[dict[str, Any]]:
    """The run's metrics.jsonl lines without their timings (which differ between otherwise equal runs)."""
    text = (trainer.run_dir / "metrics.jsonl").read_text()
    return [{k: v for k, v in json.loads(x).items() if "time" not in k} for x in text.splitlines()]


def record_weight_loads(monkeypatch: Any) -> list[str]:
    """The class names of every model whose weights load from here on (diffusers' ``from_pretrained`` and
    ``from_single_file``, transformers' ``from_pretrained``), in order: each call is recorded and then runs as it
    would. A check that must refuse before any weights load asserts the list stays empty."""
    from diffusers import ModelMixin
    from diffusers.loaders import FromOriginalModelMixin
    from transformers import PreTrainedModel

    seen: list[str] = []

    def observed(owner: type, name: str) -> None:
        original = owner.__dict__[name].__func__

        def load(cls: type, *args: Any, **kwargs: Any) -> Any:
            seen.append(cls.__name__)
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(owner, name, classmethod(load))

    observed(ModelMixin, "from_pretrained")
    observed(FromOriginalModelMixin, "from_single_file")
    observed(PreTrainedModel, "from_pretrained")
    return seen
