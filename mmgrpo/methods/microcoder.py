"""MicroCoder-GRPO: conditional truncation masking, a diversity-determined sampling temperature, no KL with a high
clip. Switched on by ``methods: {microcoder: {...}}`` on a VLM recipe.

Li, Huang, Chi, Su, Zhou, Dong, Collier & Wei 2026, "Breaking Training Bottlenecks: Effective and Stable
Reinforcement Learning for Coding Models" (arXiv 2603.07777). Three changes to GRPO, as the abstract states them:
"conditional truncation masking to improve long output potential while maintaining training stability,
diversity-determined temperature selection to maintain and encourage output diversity, and removal of KL loss with
high clipping ratios". Only the abstract was available here; what each part does in this module (our reading):

1. **Conditional truncation masking** (advantage hook). DAPO-style overlong filtering masks every completion that
   hit ``max_new_tokens`` (``policy.options.mask_truncated``: unconditional). Here a truncated row is masked only
   when it would be *pushed down*: its advantage is set to 0 when A_i < 0 and row i has no EOS,

       A_i <- 0   if truncated_i and A_i < 0,      else A_i unchanged

   so the policy is never punished for running out of room (long outputs keep their potential), while a truncated
   row that still beat its group (a reward that reads partial output) keeps its positive credit. With
   ``truncation: all`` every truncated row is zeroed (unconditional, as DAPO); ``off`` disables the hook. Set
   ``loss.mask_zero_adv: true`` to take the zeroed rows out of the normaliser too.
2. **Diversity-determined temperature** (policy wrapper). Before the first step (and every ``reselect_every``
   steps, if set) the step's prompts are sampled once at each candidate in ``temperatures``; the diversity of a
   temperature is the mean over groups (of all processes) of (distinct completions / G); the run samples at the
   smallest temperature whose diversity reaches ``target_diversity`` (none does: the largest). The choice is state
   (checkpointed, a resumed run keeps it). The policy's log-probs follow the temperature (they are of
   logits / temperature), so the ratio = 1 invariant holds at any choice.
3. **No KL, high clip** (load-time check): ``loss.beta`` must be 0 and ``loss.options.clip_high`` at least
   ``min_clip_high`` (0.28, DAPO's clip-higher; the paper's exact ratio is not in the abstract).

Diffusion: not applicable (no truncation, and a diffusion sampler has no token temperature; its noise level is a
different knob), so the method is restricted to the VLM recipes.
Logged: ``microcoder/masked_truncated`` (rows zeroed this step), ``microcoder/temperature``,
``microcoder/diversity`` (of the chosen temperature at the last selection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch, Rollout
from mmgrpo.methods.registry import Method, PolicyWrapper, register_method
from mmgrpo.policies.vlm_load import TEMPERATURES

TRUNCATION = ("conditional", "all", "off")


def mask_truncated(adv: torch.Tensor, finished: torch.Tensor, mode: str = "conditional") -> torch.Tensor:
    """adv [B, G], finished [B, G] (bool: the row ended with EOS) -> adv [B, G] with truncated rows zeroed: those
    with A < 0 (``conditional``) or all of them (``all``); ``off`` returns adv unchanged."""
    if mode not in TRUNCATION:
        raise UserError(f"microcoder: truncation={mode!r} is not one of {list(TRUNCATION)}")
    if mode == "off":
        return adv
    cut = ~finished.bool()
    if mode == "conditional":
        cut = cut & (adv < 0)
    return torch.where(cut, torch.zeros_like(adv), adv)


def group_diversity(samples: list[Any], group_size: int) -> float:
    """Mean over groups of (number of distinct samples) / G; samples [N] (texts), contiguous groups. Under data
    parallelism the mean is over every process's groups (all-reduced), so every rank chooses the same temperature."""
    groups = [samples[i : i + group_size] for i in range(0, len(samples), group_size)]
    total = torch.tensor(
        [sum(len({str(s) for s in g}) / group_size for g in groups), len(groups)], dtype=torch.float64
    )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        total = total.to(device)
        dist.all_reduce(total)
        total = total.cpu()
    return float(total[0] / total[1].clamp_min(1))


def choose_temperature(diversity: dict[float, float], target: float) -> float:
    """The smallest temperature whose diversity reaches ``target``; none does: the largest."""
    ok = sorted(t for t, d in diversity.items() if d >= target)
    return ok[0] if ok else max(diversity)


@dataclass
class MicroCoderOptions:
    truncation: str = "conditional"
    """conditional (zero truncated rows with a negative advantage), all (every truncated row) or off"""
    temperatures: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2])
    """candidate sampling temperatures; [] keeps policy.options.temperature"""
    target_diversity: float = 0.75
    """the smallest candidate whose groups have at least this share of distinct completions is chosen"""
    reselect_every: int = 0
    """select again every this many steps (0: once, before the first step)"""
    min_clip_high: float = 0.28
    """loss.options.clip_high must be at least this (the paper's high clip; DAPO's 0.28)"""


def _scorer(policy: Any) -> Any:
    m = policy.model
    while hasattr(m, "module"):  # DDP / accelerate wrappers
        m = m.module
    return m


class MicroCoderPolicy(PolicyWrapper):
    """A VLM policy whose sampling temperature is chosen by the diversity it gives (module doc, part 2)."""

    def __init__(self, inner: Any, temperatures: list[float], target: float, every: int):
        super().__init__(inner)
        self._own("temperatures", [float(t) for t in temperatures])
        self._own("target", float(target))
        self._own("every", int(every))
        self._own("chosen", None)  # (temperature, diversity, step chosen)

    def set_temperature(self, t: float) -> None:
        self.inner.options.temperature = t
        scorer = _scorer(self.inner)
        if hasattr(scorer, "temperature"):
            scorer.temperature = t  # the log-probs are of logits / temperature: keep them the sampled ones

    def _due(self, step: int) -> bool:
        if not self.temperatures:
            return False
        if self.chosen is None:
            return True
        return self.every > 0 and step - self.chosen[2] >= self.every

    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        if self._due(batch.step):
            state = generator.get_state() if generator is not None else None
            diversity = {}
            for t in self.temperatures:
                self.set_temperature(t)
                if state is not None:
                    generator.set_state(state)  # every probe and the real rollout draw the same shared numbers
                diversity[t] = group_diversity(self.inner.rollout(batch, group_size, generator).samples, group_size)
            t = choose_temperature(diversity, self.target)
            self._own("chosen", (t, diversity[t], batch.step))
            if state is not None:
                generator.set_state(state)
        if self.chosen is not None:
            self.set_temperature(self.chosen[0])
        return self.inner.rollout(batch, group_size, generator)

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        out = dict(self.inner.rollout_metrics(rollout)) if hasattr(self.inner, "rollout_metrics") else {}
        if self.chosen is not None:
            out["microcoder/temperature"], out["microcoder/diversity"] = self.chosen[0], self.chosen[1]
        return out

    def training_state(self) -> dict[str, Any] | None:
        inner = self.inner.training_state() if hasattr(self.inner, "training_state") else None
        mine = None if self.chosen is None else torch.tensor(self.chosen, dtype=torch.float64)
        return {"inner": inner, "microcoder": mine}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if state.get("inner") is not None and hasattr(self.inner, "load_training_state"):
            self.inner.load_training_state(state["inner"])
        if state.get("microcoder") is not None:
            t, d, s = state["microcoder"].tolist()
            self._own("chosen", (float(t), float(d), int(s)))
            self.set_temperature(float(t))


def truncation_hook(mode: str):
    """Conditional truncation masking as an advantage hook: adv [B, G], ``rollout.extras["finished"]`` [N]."""

    def hook(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
        finished = rollout.extras["finished"].bool().reshape(adv.shape).to(adv.device)  # [B, G]
        out = mask_truncated(adv, finished, mode)
        return out, {"microcoder/masked_truncated": float(((out == 0) & (adv != 0)).sum())}

    return hook


def check_microcoder(opts: MicroCoderOptions, cfg: Any, key: str) -> None:
    if opts.truncation not in TRUNCATION:
        raise UserError(f"{key}: truncation={opts.truncation!r} is not one of {list(TRUNCATION)}")
    lo, hi = TEMPERATURES  # the candidates replace policy.options.temperature: they take its bound
    if any(not lo <= t <= hi for t in opts.temperatures):
        raise UserError(f"{key}: temperatures={opts.temperatures} must all be in {lo:g}..{hi:g} (the sampling "
                        "temperatures a VLM policy takes)")  # fmt: skip
    if not 0.0 < opts.target_diversity <= 1.0:
        raise UserError(f"{key}: target_diversity={opts.target_diversity} must lie in (0, 1]")
    if opts.reselect_every < 0:
        raise UserError(f"{key}: reselect_every={opts.reselect_every} must be >= 0 (0 = once)")
    if cfg.loss.beta != 0:
        raise UserError(f"{key}: MicroCoder-GRPO removes the KL loss; set loss.beta=0 (got {cfg.loss.beta})")
    if opts.min_clip_high < 0:
        raise UserError(f"{key}: min_clip_high={opts.min_clip_high} must be >= 0 (the least loss.options.clip_high "
                        "it accepts; 0.28 is DAPO's clip-higher)")  # fmt: skip
    clip_high = (cfg.loss.options or {}).get("clip_high", 0.2)
    if clip_high < opts.min_clip_high:
        raise UserError(f"{key}: MicroCoder-GRPO trains with a high clip ratio; set loss.options.clip_high >= "
                        f"{opts.min_clip_high} (got {clip_high})")  # fmt: skip
    if opts.truncation != "off" and (cfg.policy.options or {}).get("mask_truncated"):
        raise UserError(f"{key}: policy.options.mask_truncated=true already drops every truncated row "
                        "(unconditional); set it false, or methods.microcoder.truncation=off")  # fmt: skip


METHOD = register_method(
    Method(
        name="microcoder",
        paper="MicroCoder-GRPO (Li et al. 2026, arXiv 2603.07777): conditional truncation masking, "
        "diversity-determined temperature, no KL with a high clip",
        options=MicroCoderOptions,
        pipelines=("vlm_reasoning", "vlm_grounding"),
        check=check_microcoder,
        wrap_policy=lambda policy, o: MicroCoderPolicy(policy, o.temperatures, o.target_diversity, o.reselect_every),
        advantage_hooks=lambda o: [] if o.truncation == "off" else [truncation_hook(o.truncation)],
    )
)
