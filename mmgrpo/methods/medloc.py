"""MedLoc-R1's performance-aware IoU curriculum: a grounding reward whose IoU threshold rises as the policy improves.
The whole method: the stateful reward ``iou_curriculum`` (listing it under ``rewards:`` runs it; ``methods: {medloc:
{}}`` also checks that it is listed and that the recipe is a VLM one, :data:`METHOD`).

MedLoc-R1 ("Performance-Aware Curriculum Reward Scheduling for GRPO-Based Medical Visual Grounding", 2025) replaces
the dense IoU reward with the sparse ``1[IoU >= tau]`` and raises ``tau`` only once the policy reliably clears it,
judged on a sliding window of recent groups:

1. every call scores each row ``r = 1[IoU >= tau]`` (IoU exactly as the ``iou`` reward computes it);
2. each group (G contiguous rows with a ground-truth box) pushes one entry ``(mean r, mean IoU)`` into a window of
   the newest ``window`` entries;
3. once the window is full, if ``mean(r) >= P(tau)``, ``std(r) <= S(tau)`` and ``mean(IoU) - tau >= margin``
   (all over the window's entries; std is the *population* std, divide by the count), then
   ``tau <- min(tau + delta(tau), tau_max)`` and only the newest ``window // 2`` entries are kept (so the next raise
   needs at least ``window - window // 2`` fresh groups). At most one raise per call.

Tables, evaluated at the *current* tau (half-open intervals: "below 0.6" means tau < 0.6):

- ``(P, S)``: (0.80, 0.20) for tau < 0.6; (0.75, 0.35) for 0.6 <= tau < 0.75; (0.55, 0.40) for tau >= 0.75.
- ``delta`` by ``schedule`` (our naming of the variants):
  "step": 0.15 for tau < 0.55, 0.10 for 0.55 <= tau < 0.75, else 0.05 (MedLoc-R1's table);
  "linear": the constant ``linear_delta``;
  "cosine": ``max(0.15 * (1 + cos(pi * (tau - tau0) / (tau_max - tau0))) / 2, 0.05)`` -- large steps while the
  threshold is easy, shrinking smoothly to the 0.05 floor as tau approaches tau_max.

tau is rounded to 6 decimals after each raise so that float drift (0.3 + 0.15 = 0.44999999999999996) cannot move a
threshold across a table boundary. The kept entries after a raise were scored under the old tau: the window keeps
group means, not raw IoUs, so they cannot be re-scored (MedLoc-R1 keeps them the same way).

The state (tau and the window) is plain data: :meth:`IoUCurriculum.state_dict` goes into the checkpoint's JSON and
resuming continues exactly. Under data parallelism each rank keeps its own window; to keep ranks in lock-step the
caller must gather the group means of all ranks and call :meth:`IoUCurriculum.update` with the same values on every
rank.

>>> cur = IoUCurriculum(window=2)
>>> cur.update([1.0], [0.9]), cur.update([1.0], [0.9]), cur.tau
(False, True, 0.45)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mmgrpo.core.errors import UserError
from mmgrpo.methods.registry import Method, register_method
from mmgrpo.rewards.registry import register
from mmgrpo.rewards.text import iou_reward

SCHEDULES = ("step", "linear", "cosine")


def pass_thresholds(tau: float) -> tuple[float, float]:
    """``(P, S)``: the window's minimum mean reward and maximum (population) std needed to raise ``tau``."""
    if tau < 0.6:
        return 0.80, 0.20
    if tau < 0.75:
        return 0.75, 0.35
    return 0.55, 0.40


def step_delta(tau: float) -> float:
    """MedLoc-R1's increment: 0.15 below 0.55, 0.10 below 0.75, then 0.05."""
    if tau < 0.55:
        return 0.15
    if tau < 0.75:
        return 0.10
    return 0.05


def cosine_delta(tau: float, tau0: float, tau_max: float) -> float:
    """0.15 * (1 + cos(pi * progress)) / 2 with progress = (tau - tau0) / (tau_max - tau0), floored at 0.05."""
    progress = (tau - tau0) / (tau_max - tau0)
    return max(0.15 * (1.0 + math.cos(math.pi * progress)) / 2.0, 0.05)


def _population_std(xs: Sequence[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


class IoUCurriculum:
    """The threshold schedule alone: a window of per-group (mean reward, mean IoU) and the current tau."""

    def __init__(
        self,
        tau0: float = 0.3,
        tau_max: float = 0.8,
        window: int = 30,
        margin: float = 0.10,
        schedule: str = "step",
        linear_delta: float = 0.1,
    ):
        if schedule not in SCHEDULES:
            raise UserError(f"iou_curriculum: unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
        if not 0.0 < tau0 < tau_max <= 1.0:
            raise UserError(f"iou_curriculum: need 0 < tau0 < tau_max <= 1; got tau0={tau0}, tau_max={tau_max}")
        if window < 2:
            raise UserError(f"iou_curriculum: window={window} must be >= 2 groups (MedLoc-R1 uses 30)")
        if linear_delta <= 0:
            raise UserError(f"iou_curriculum: linear_delta={linear_delta} must be > 0 (e.g. 0.1)")
        self.tau0, self.tau_max, self.window, self.margin = float(tau0), float(tau_max), int(window), float(margin)
        self.schedule, self.linear_delta = schedule, float(linear_delta)
        self.tau = self.tau0
        self.rewards: list[float] = []  # window entries: group-mean reward, oldest first
        self.ious: list[float] = []  # window entries: group-mean IoU, oldest first
        self.raises = 0

    def delta(self, tau: float) -> float:
        """The increment applied at threshold ``tau`` under this schedule."""
        if self.schedule == "step":
            return step_delta(tau)
        if self.schedule == "linear":
            return self.linear_delta
        return cosine_delta(tau, self.tau0, self.tau_max)

    def ready(self) -> bool:
        """Full window, mean reward >= P(tau), population std <= S(tau), mean IoU - tau >= margin."""
        if len(self.rewards) < self.window or self.tau >= self.tau_max:
            return False
        p, s = pass_thresholds(self.tau)
        mean_r = sum(self.rewards) / len(self.rewards)
        mean_iou = sum(self.ious) / len(self.ious)
        return mean_r >= p and _population_std(self.rewards) <= s and mean_iou - self.tau >= self.margin

    def update(self, group_rewards: Sequence[float], group_ious: Sequence[float]) -> bool:
        """Push one entry per group (group-mean reward, group-mean IoU) and maybe raise tau; True iff it rose."""
        if len(group_rewards) != len(group_ious):
            raise ValueError(f"update: {len(group_rewards)} group rewards but {len(group_ious)} group IoUs")
        self.rewards = (self.rewards + [float(r) for r in group_rewards])[-self.window :]
        self.ious = (self.ious + [float(x) for x in group_ious])[-self.window :]
        if not self.ready():
            return False
        self.tau = round(min(self.tau + self.delta(self.tau), self.tau_max), 6)
        keep = self.window // 2
        self.rewards, self.ious = self.rewards[-keep:], self.ious[-keep:]
        self.raises += 1
        return True

    def last_metrics(self) -> dict[str, float]:
        """``{"curriculum/tau": tau, "curriculum/window": entries in the window}`` for metrics.jsonl."""
        return {"curriculum/tau": self.tau, "curriculum/window": float(len(self.rewards))}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (floats, lists): JSON-safe, restored exactly by :meth:`load_state_dict`."""
        return {"tau": self.tau, "rewards": list(self.rewards), "ious": list(self.ious), "raises": self.raises}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["rewards"]) != len(state["ious"]):
            raise UserError("iou_curriculum: checkpoint window has different numbers of rewards and IoUs")
        self.tau = float(state["tau"])
        self.rewards = [float(x) for x in state["rewards"]][-self.window :]
        self.ious = [float(x) for x in state["ious"]][-self.window :]
        self.raises = int(state.get("raises", 0))


def _group_means(values: list[float | None], group_size: int) -> tuple[list[float], list[int]]:
    """Mean over the non-None values of each group of ``group_size`` contiguous rows, and the groups that had any."""
    means, groups = [], []
    for g in range(len(values) // group_size):
        vals = [v for v in values[g * group_size : (g + 1) * group_size] if v is not None]
        if vals:
            means.append(sum(vals) / len(vals))
            groups.append(g)
    return means, groups


class IoUCurriculumReward:
    """The ``iou_curriculum`` reward callable: ``1[IoU >= tau]`` per row, then one curriculum update per call."""

    group_aware = True

    def __init__(self, curriculum: IoUCurriculum, iou_fn: Any):
        self.curriculum, self.iou_fn = curriculum, iou_fn

    def __call__(self, samples, prompts, meta, ctx) -> list[float | None]:  # samples: N completions; meta: N dicts
        G = int(ctx.group_size)
        if len(samples) % G:
            raise ValueError(f"iou_curriculum: {len(samples)} rows is not a multiple of the group size {G}")
        ious: list[float | None] = self.iou_fn(samples, prompts, meta, ctx)  # N, None: no ground-truth box
        tau = self.curriculum.tau
        out = [None if x is None else float(x >= tau) for x in ious]
        mean_r, _ = _group_means(out, G)
        mean_iou, _ = _group_means(ious, G)
        if getattr(ctx, "update_state", True):  # not when the same rows are re-scored (variants, evaluation)
            self.curriculum.update(mean_r, mean_iou)
        return out

    def last_metrics(self) -> dict[str, float]:
        return self.curriculum.last_metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.curriculum.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(state)


@register("iou_curriculum")
def iou_curriculum(
    family: str = "qwen2_5_vl",
    box_key: str = "box",
    answer_tag: str = "answer",
    tau0: float = 0.3,
    tau_max: float = 0.8,
    window: int = 30,
    margin: float = 0.10,
    schedule: str = "step",
    linear_delta: float = 0.1,
):
    """MedLoc-R1 IoU curriculum: 1[IoU >= tau], tau raised from tau0 when a window of groups clears it (stateful).

    IoU is computed like the ``iou`` reward (``family``, ``box_key``, ``answer_tag``); rows without a ground-truth
    box get None and do not enter the window. ``schedule``: "step" | "linear" | "cosine" (see the module doc).
    """
    curriculum = IoUCurriculum(tau0, tau_max, window, margin, schedule, linear_delta)
    return IoUCurriculumReward(curriculum, iou_reward(family=family, box_key=box_key, answer_tag=answer_tag))


METHOD = register_method(
    Method(
        name="medloc",
        paper="MedLoc-R1 (2025): performance-aware IoU curriculum, 1[IoU >= tau], tau raised as the policy clears it",
        pipelines=("vlm_grounding", "vlm_reasoning"),
        rewards=("iou_curriculum",),
        reward_switched=True,
        data_keys=("box",),
    )
)
