"""AMPO: guidance from several teachers, inserted only when the on-policy group fails. Switched on by
``methods: {ampo: {reward: accuracy, guidance_key: guidance}}``; each example's meta carries its guidance pool.

AMPO, "More Than One Teacher: Adaptive Multi-Guidance Policy Optimization for Diverse Exploration" (Xiaoyang Yuan,
Yujuan Ding, Yi Bin, Wenqi Shao, Jinyu Cai, Jingkuan Song, Yang Yang, Heng Tao Shen 2025, arXiv 2510.02227). A
multi-guidance pool P_G holds, per question, correct solutions written by several teacher models. Training is GRPO
on the student's own G samples, except:

1. **adaptive replacement** (guidance on demand): when every on-policy response of a question fails (reward below
   ``correct_at``), k of them are replaced by solutions from the pool, as off-policy rows; a group with at least one
   success is left alone (self-discovery keeps its value);
2. **comprehension-based selection**: among the pool's solutions, the ones the student is most likely to understand
   are taken: here the highest length-normalised log-likelihood under the student (mean token log-prob,
   :meth:`mmgrpo.policies.vlm.VLMPolicy.mean_logprob`; the paper's exact comprehension score is not in its
   abstract, this is our reading of it);
3. the mixed group is scored by the run's rewards and optimised with GRPO's group advantages: the inserted solution
   is typically the only success of its group, so it gets the large positive advantage.

How: a policy wrapper (:class:`AMPOPolicy`) samples the G rows, grades them with the verifier ``reward`` (the same
registered reward as in ``rewards:``, called once more, without state), and re-rolls only the failed prompts with the
selected solution in the meta (:data:`mmgrpo.policies.offpolicy.OFFPOLICY_KEY`): the VLM policy then
teacher-forces it into the last row exactly as TempSamp-R1's ground truth (its ``logp_old`` is the student's, so
its ratio starts at 1); the other G - 1 rows are the same samples as before (per-prompt seeds: a prompt's samples do
not depend on its batch). k = 1 (the off-policy-row mechanism writes one row per group; the paper's k is a
hyper-parameter). The pool is offline, as in the paper: ``meta[guidance_key]`` is a list of solutions, each a str
or ``{"text": ..., "teacher": name}``; and/or online: ``teachers: [<folder or hub id>, ...]`` are frozen VLMs
(extra models ``ampo_teacher<i>``, loaded like the policy by :meth:`mmgrpo.policies.vlm.VLMPolicy.load_generator`,
any VLM family, their memory and generation time logged as ``extra/ampo_teacher<i>/*``) that each answer a failed
question greedily; an answer the verifier accepts joins that question's pool. A failed question whose pool stays
empty stays on-policy.

Metrics: ``ampo/failed_groups``, ``ampo/guided_groups``, ``ampo/teacher/<name>`` (how often each teacher's
solution was selected). Applies to ``vlm_reasoning`` (the off-policy-row mechanism is the VLM policy's); not to the
diffusion policy, whose samples cannot be teacher-forced from a stored solution (an image has no token path to
score; an SDE trajectory to a given image is not recorded).

>>> pool_entries([{"text": "<answer>B</answer>", "teacher": "qwen"}, "<answer>B</answer>"])
[('<answer>B</answer>', 'qwen'), ('<answer>B</answer>', 'teacher1')]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch, RewardContext, Rollout, concat_rollouts, select_groups
from mmgrpo.methods.registry import Method, MethodRuntime, PolicyWrapper, register_method
from mmgrpo.policies.offpolicy import OFFPOLICY_KEY, OFFPOLICY_POSITION_KEY
from mmgrpo.rewards import registry as reward_registry

TEACHER_KEY = "ampo_teacher"
"""row meta: the teacher whose solution the row holds (guided groups only)"""


def pool_entries(pool: Any) -> list[tuple[str, str]]:
    """(text, teacher) of every solution in a guidance pool (a list of str or {"text", "teacher"})."""
    if not isinstance(pool, (list, tuple)):
        raise UserError(f"methods.ampo: the guidance pool must be a list of solutions, got {type(pool).__name__}")
    out = []
    for i, e in enumerate(pool):
        if isinstance(e, str):
            out.append((e, f"teacher{i}"))
        elif isinstance(e, dict) and isinstance(e.get("text"), str):
            out.append((e["text"], str(e.get("teacher", f"teacher{i}"))))
        else:
            raise UserError(f"methods.ampo: guidance entry {i} is {e!r}; use a str or {{text: ..., teacher: ...}}")
    return out


def failed_groups(rewards: torch.Tensor, correct_at: float) -> torch.Tensor:
    """rewards [B, G] (NaN = not graded = failed) -> [B] bool: no row of the group reaches ``correct_at``."""
    r = torch.nan_to_num(rewards.float(), nan=float("-inf"))
    return ~(r >= correct_at).any(-1)


def select_guidance(scores: torch.Tensor, how: str = "comprehension") -> int:
    """The pool entry to insert: the best-understood (highest score) one, or the first."""
    return int(scores.argmax()) if how == "comprehension" else 0


class AMPOPolicy(PolicyWrapper):
    """Samples G rows per prompt; prompts whose every row fails are re-rolled with the selected pool solution as an
    off-policy last row. ``verifier`` (set by the method's setup) grades rows: ``fn(samples, prompts, meta, ctx)``."""

    def __init__(self, inner: Any, opts: AMPOOptions):
        super().__init__(inner)
        self._own("opts", opts)
        self._own("verifier", None)
        self._own("teachers", [])  # ExtraModels whose handle generates (online guidance)

    def teacher_solutions(self, batch: PromptBatch, idx: list[int]) -> dict[int, list[tuple[str, str]]]:
        """prompt index -> [(text, teacher)] of the teachers' greedy answers to prompts ``idx`` that the verifier
        accepts (and that fit the policy's rows)."""
        out: dict[int, list[tuple[str, str]]] = {b: [] for b in idx}
        if not (self.teachers and idx):
            return out
        prompts = [batch.prompts[b] for b in idx]
        metas = [
            {**batch.meta[b], **({"options": list(p["options"])} if isinstance(p, dict) and p.get("options") else {})}
            for b, p in zip(idx, prompts)
        ]
        sub = PromptBatch(prompts=prompts, meta=metas, seeds=[batch.seeds[b] for b in idx] if batch.seeds else [],
                          step=batch.step)  # fmt: skip
        ctx = RewardContext(group_size=1, step=batch.step, group=torch.arange(len(idx)), policy=self.inner,
                            update_state=False)  # fmt: skip
        for t in self.teachers:
            with t.timed():
                texts = t.handle.generate(sub, greedy=True)
            for j, v in enumerate(self.verifier(texts, prompts, metas, ctx)):
                if v is not None and float(v) >= self.opts.correct_at and self.inner.fits_completion(texts[j]):
                    out[idx[j]].append((texts[j], t.name))
        return out

    def rollout(self, batch: PromptBatch, group_size: int, generator: torch.Generator | None = None) -> Rollout:
        G, B, o = group_size, len(batch), self.opts
        out = self.inner.rollout(batch, G, generator)
        ctx = RewardContext(group_size=G, step=batch.step, group=torch.arange(B * G) // G, policy=self.inner,
                            update_state=False)  # fmt: skip
        raw = self.verifier(out.samples, out.prompts, out.meta, ctx)
        r = torch.tensor([math.nan if v is None else float(v) for v in raw], dtype=torch.float32)
        failed = failed_groups(r.view(B, G), o.correct_at)
        guided, metas = [], []
        online = self.teacher_solutions(batch, failed.nonzero().reshape(-1).tolist())
        for b in failed.nonzero().reshape(-1).tolist():
            pool = batch.meta[b].get(o.guidance_key)
            entries = (pool_entries(pool) if pool else []) + online[b]
            if not entries:
                continue
            scores = self.inner.mean_logprob(batch.prompts[b], batch.meta[b], [t for t, _ in entries])
            text, teacher = entries[select_guidance(scores, o.selection)]
            metas.append({**batch.meta[b], OFFPOLICY_KEY: text, OFFPOLICY_POSITION_KEY: "last", TEACHER_KEY: teacher})
            guided.append(b)
        out.extras.setdefault("offpolicy_mask", torch.zeros(out.num_rows, dtype=torch.bool))
        out.extras["ampo_failed"] = failed.repeat_interleave(G)  # [N] bool
        if not guided:
            return out
        sub = PromptBatch(
            prompts=[batch.prompts[b] for b in guided],
            meta=metas,
            seeds=[batch.seeds[b] for b in guided] if batch.seeds else [],
            step=batch.step,
        )
        again = self.inner.rollout(sub, G, generator)  # same seeds: the G - 1 sampled rows are the same
        again.extras["ampo_failed"] = torch.ones(again.num_rows, dtype=torch.bool)
        where = {b: j for j, b in enumerate(guided)}
        parts = [select_groups(again, [where[b]]) if b in where else select_groups(out, [b]) for b in range(B)]
        return concat_rollouts(parts)


def ampo_metrics_hook(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
    """Counts of failed and guided groups, and which teacher each inserted solution came from."""
    B, G = adv.shape
    off = rollout.extras["offpolicy_mask"].reshape(B, G)
    m = {
        "ampo/failed_groups": float(rollout.extras["ampo_failed"].reshape(B, G)[:, 0].sum()),
        "ampo/guided_groups": float(off.any(1).sum()),
    }
    for n in off.reshape(-1).nonzero().reshape(-1).tolist():
        key = f"ampo/teacher/{rollout.meta[n].get(TEACHER_KEY, 'unknown')}"
        m[key] = m.get(key, 0.0) + 1.0
    return adv, m


@dataclass
class AMPOOptions:
    reward: str = "accuracy"
    """the verifier that decides whether a group failed (a reward listed under rewards:)"""
    correct_at: float = 1.0
    """a row succeeds when the verifier gives >= this; a group fails when none of its rows does"""
    guidance_key: str = "guidance"
    """meta key of each example's guidance pool: a list of teachers' solutions (str or {text, teacher})"""
    selection: Literal["comprehension", "first"] = "comprehension"
    """comprehension: the solution with the highest mean token log-prob under the student; first: the pool's first"""
    teachers: list[str] = field(default_factory=list)
    """teacher VLMs (folders / hub ids) that answer failed questions online; [] = the data's pool only"""
    teacher_dtype: str | None = None
    """the teachers' weights dtype; null = the policy's"""


def check_ampo(opts: AMPOOptions, cfg: Any, key: str) -> None:
    names = [r.name for r in cfg.rewards]
    if opts.reward not in names:
        raise UserError(f"{key}: reward={opts.reward!r} is not listed under rewards: {names}; name the verifier")
    if cfg.trainer.group_size < 2:
        raise UserError(f"{key}: AMPO replaces one row of a failed group; set trainer.group_size >= 2")
    if opts.selection not in ("comprehension", "first"):
        raise UserError(f"{key}: selection={opts.selection!r}; use comprehension or first")
    if not math.isfinite(opts.correct_at):
        raise UserError(f"{key}: correct_at={opts.correct_at} must be finite")
    if any(not isinstance(t, str) or not t for t in opts.teachers):
        raise UserError(f"{key}: teachers={opts.teachers!r} must be model folders or hub ids (non-empty strings)")


def setup_ampo(policy: Any, opts: AMPOOptions, cfg: Any) -> MethodRuntime:
    wrapper = policy
    while not isinstance(wrapper, AMPOPolicy):  # the AMPO wrapper, under any wrappers of later methods
        wrapper = wrapper.inner
    spec = next(r for r in cfg.rewards if r.name == opts.reward)
    fn = reward_registry.get(spec.name, **spec.options)
    if hasattr(fn, "state_dict") or getattr(fn, "group_aware", False):
        raise UserError(
            f"methods.ampo.reward={opts.reward!r} is stateful or group-aware; AMPO grades rows once more with it, "
            "so name a plain verifier (accuracy, iou)"
        )
    wrapper.verifier = fn
    if opts.teachers and not hasattr(policy, "load_generator"):
        raise UserError(f"methods.ampo.teachers needs the VLM policy (load_generator), not {type(policy).__name__}")
    wrapper.teachers = [
        policy.load_generator(f"ampo_teacher{i}", path, f"methods.ampo.teachers[{i}]", opts.teacher_dtype)
        for i, path in enumerate(opts.teachers)
    ]
    return MethodRuntime(extra_models=list(wrapper.teachers), advantage_hooks=[ampo_metrics_hook])


METHOD = register_method(
    Method(
        name="ampo",
        paper="AMPO (Yuan et al. 2025, arXiv 2510.02227): teachers' solutions replace rows only of failed groups",
        options=AMPOOptions,
        pipelines=("vlm_reasoning",),
        data_keys=("guidance",),
        supplied_keys=lambda opts: ("guidance",) if opts.teachers else (),  # online teachers stand in for a pool
        conflicts=("tempsamp", "pearl"),
        check=check_ampo,
        wrap_policy=lambda policy, opts: AMPOPolicy(policy, opts),
        setup=setup_ampo,
        local_forwards="it scores teachers' solutions and samples again only for the groups this process failed",
    )
)
