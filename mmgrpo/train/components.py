"""What a recipe (pipeline) hands the trainer, and the registries that name recipes and policies.

A pipeline turns a :class:`~mmgrpo.train.config.Config` into :class:`Components`: the policy, a
deterministic prompt source, and optionally a held-out evaluation. Pipelines register themselves::

    PIPELINES.add("bandit", Pipeline(build=build_bandit, policy_options=BanditPolicyOptions, ...))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mmgrpo.core.registry import Registry
from mmgrpo.core.schema import options_from
from mmgrpo.core.types import Policy, PromptBatch


class PromptSource(Protocol):
    """A deterministic, indexable prompt stream: ``get(i)`` is the same prompt whatever the layout."""

    def get(self, indices: list[int]) -> PromptBatch:
        """Prompts at global stream positions ``indices`` (seeds are filled in by the trainer)."""
        ...


@dataclass
class EvalResult:
    """Held-out evaluation: scalar metrics (logged under ``eval/``) and optional images for a grid."""

    metrics: dict[str, float]
    images: torch.Tensor | None = None  # [n, 3, H, W] or [n, F, 3, H, W] in [0, 1]
    captions: list[str] = field(default_factory=list)


class AdvantageHook(Protocol):
    """``hook(adv [B, G], rollout, cols [V, R, N], reward_names) -> (adv [B, G], metrics)`` on this rank's groups.

    Runs after the estimator; ``rollout.loss_weight`` may also be set here (per-stream weights)."""

    def __call__(
        self, adv: torch.Tensor, rollout: Any, cols: torch.Tensor, reward_names: list[str]
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class Components:
    policy: Policy
    prompts: PromptSource
    evaluate: Callable[[Policy, int], EvalResult] | None = None
    sample_images: Callable[[Any], torch.Tensor | None] | None = None  # rollout.samples -> images for grids
    advantage_hooks: list[AdvantageHook] = field(default_factory=list)
    """method hooks applied, in order, to this rank's advantages after normalisation (PEARL gate, TempSamp anchor)"""


@dataclass
class Pipeline:
    build: Callable[..., Components]
    """build(cfg, accelerator) -> Components"""
    policy_options: type | None = None
    data_options: type | None = None
    description: str = ""

    def check(self, cfg: Any, where: str) -> None:
        """Validate ``policy.options`` / ``data.options`` against this pipeline's schemas."""
        if self.policy_options is not None:
            options_from(self.policy_options, cfg.policy.options, where, "policy.options")
        if self.data_options is not None:
            options_from(self.data_options, cfg.data.options, where, "data.options")


PIPELINES: Registry[Pipeline] = Registry("pipeline", plugins="pipelines")
