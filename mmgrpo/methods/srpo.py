"""SRPO: route each sample to GRPO (correct) or to self-distillation from a corrected self (failed). Switched on by
``methods: {srpo: {reward: accuracy, coef: 1.0}}``.

SRPO, "Unifying Group-Relative and Self-Distillation Policy Optimization via Sample Routing" (Gengsheng Li, Tianyu
Yang, Junfeng Fang, Mingyang Song, Mao Zheng, Haiyun Guo, Dan Zhang, Jinqiao Wang, Tat-Seng Chua 2026, arXiv
2604.02288). GRPO penalises every token of a failed rollout alike; SDPO (self-distillation policy optimisation,
"Reinforcement Learning via Self-Distillation", 2026) instead distils the policy towards a *self-teacher*: the
same policy shown privileged information (a correct solution, feedback), which re-scores the failed rollout token by
token. SDPO on already-correct samples is ambiguous
and its teacher degrades late in training, so SRPO routes:

- correct rows (reward >= ``correct_at``) -> GRPO, with the group's advantages as the estimator gives them;
- failed rows -> self-distillation only (their GRPO advantage is set to 0): per token t of the failed row o,

      L_SD = coef * sum_t w_t * KL_t( pi_theta(. | x, o_<t) || sg[pi_theta(. | x + c, o_<t)] )

  with c the privileged context: a correct sibling's completion from the same group when there is one, else the
  example's ground truth (``meta[ground_truth_key]``); a failed row with neither stays with GRPO;
- entropy-aware weighting: w_t = clamp(1 - H_t / log V, 0, 1), H_t the self-teacher's entropy at token t (V the
  vocabulary): confident teacher tokens count fully, uniform ones not at all (the abstract states the principle;
  this linear form is our choice).

What we approximate: the paper's distillation is logit-level (full-distribution KL); ours estimates the same reverse
KL on the sampled token (``estimator: k2``, 1/2 (log pi_theta - log pi_teacher)^2, whose gradient is the on-policy
per-token reverse-KL gradient, as KDRL's; or ``k3``), so it needs no [n, L, V] student logits with gradient. The
self-teacher scores the failed rows once, at the sampling parameters, in the advantage hook (SDPO's teacher is the
current policy; with one optimizer step per rollout they coincide; with several epochs ours is the rollout's).

Parts: the advantage hook (routing, one no-grad forward of the failed rows under their hinted prompts, timed as
``extra/srpo_self_teacher/time_s``; the self-teacher is the policy itself, so its memory is 0) and the loss term
``srpo`` (:class:`mmgrpo.core.extra.LossTerm`). Metrics: ``srpo/distilled_frac``, ``srpo/teacher_entropy``.

Applies to the VLM recipes; not to the diffusion policy (its self-teacher would be the denoiser conditioned on a
corrected prompt, which needs a "corrected version" of an image prompt that the shapes / text-to-image data do not
carry).

>>> entropy_weights(torch.tensor([[0.0, math.log(16.0), 2 * math.log(16.0)]]), vocab=16)
tensor([[1., 0., 0.]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.extra import ExtraModel, TermInputs
from mmgrpo.methods.kdrl import kd_per_token, need_frozen_scorer
from mmgrpo.methods.registry import Method, MethodRuntime, register_method

T_LOGP, T_W, DISTIL = "srpo_teacher_logp", "srpo_weight", "srpo_distil"
"""rollout.extras keys: the self-teacher's token log-probs [N, K], the per-token weights [N, K] (0 off the
distilled rows), which rows are distilled [N] bool"""


def entropy_weights(entropy: torch.Tensor, vocab: int) -> torch.Tensor:
    """w = clamp(1 - H / log V, 0, 1) per token. [..] -> [..] fp32."""
    return (1.0 - entropy.float() / math.log(max(vocab, 2))).clamp(0.0, 1.0)


def route(correct: torch.Tensor, has_gt: torch.Tensor, use_siblings: bool = True) -> tuple[torch.Tensor, list]:
    """Which rows are distilled and from what. correct [B, G] bool, has_gt [B] bool -> (distil [B, G] bool, hints:
    per row n = b * G + g a ("sibling", row) / ("gt", b) / None). A failed row takes the first correct row of its
    group as context, else the ground truth; a correct row is never distilled."""
    B, G = correct.shape
    distil = torch.zeros(B, G, dtype=torch.bool)
    hints: list = [None] * (B * G)
    for b in range(B):
        ok = correct[b].nonzero().reshape(-1).tolist()
        for g in range(G):
            if bool(correct[b, g]):
                continue
            if use_siblings and ok:
                hints[b * G + g] = ("sibling", b * G + ok[0])
            elif bool(has_gt[b]):
                hints[b * G + g] = ("gt", b)
            else:
                continue
            distil[b, g] = True
    return distil, hints


def with_hint(prompt: Any, hint: str, template: str) -> Any:
    """The prompt shown to the self-teacher: its question followed by ``template`` filled with ``hint``."""
    extra = template.format(hint=hint)
    if isinstance(prompt, str):
        return prompt + extra
    if isinstance(prompt, dict):
        for key in ("question", "text"):
            if isinstance(prompt.get(key), str):
                return {**prompt, key: prompt[key] + extra}
    raise UserError(
        f"methods.srpo: cannot add the self-teacher's context to a prompt of type {type(prompt).__name__}; prompts "
        "must be a str or a dict with 'question' or 'text'"
    )


class SRPOTerm:
    """coef * w_t * k(logp, teacher_logp) on the distilled rows' tokens (0 elsewhere)."""

    name = "srpo"
    replaces_surrogate = False

    def __init__(self, coef: float, estimator: str):
        self.coef, self.estimator = coef, estimator

    def __call__(self, x: TermInputs) -> tuple[torch.Tensor, dict[str, float]]:
        ex = x.rollout.extras
        if T_LOGP not in ex:
            return torch.zeros_like(x.lp.logp), {}
        rows, units = x.rows.to(ex[T_LOGP].device), x.units.to(ex[T_LOGP].device)
        t_logp, w = ex[T_LOGP][rows][:, units], ex[T_W][rows][:, units]
        kd = kd_per_token(x.lp.logp, t_logp.to(x.lp.logp.device), self.estimator, x.mask)
        return self.coef * w.to(kd) * kd, {}


@dataclass
class SRPOOptions:
    reward: str = "accuracy"
    """the verifier that routes a row: >= correct_at -> GRPO, else self-distillation"""
    correct_at: float = 1.0
    """a row is correct when the reward is >= this"""
    coef: float = 1.0
    """weight of the self-distillation term"""
    estimator: Literal["k2", "k3"] = "k2"
    """per-token reverse-KL estimator on the sampled token (k2: the on-policy RKL gradient)"""
    entropy_weighting: bool = True
    """w_t = clamp(1 - H_t / log V, 0, 1) from the self-teacher's entropy (false: w_t = 1)"""
    use_siblings: bool = True
    """a correct sibling's completion is the context when the group has one (false: only the ground truth)"""
    ground_truth_key: str | None = "answer"
    """meta key of the ground truth used as context when no sibling is correct (null: siblings only)"""
    template: str = "\n\nA correct solution: {hint}\nAnswer again."
    """appended to the question for the self-teacher; {hint} is the context"""


def check_srpo(opts: SRPOOptions, cfg: Any, key: str) -> None:
    names = [r.name for r in cfg.rewards]
    if opts.reward not in names:
        raise UserError(f"{key}: reward={opts.reward!r} is not listed under rewards: {names}; name the verifier")
    if not (opts.coef >= 0 and math.isfinite(opts.coef)):
        raise UserError(f"{key}: coef={opts.coef} must be a finite number >= 0")
    if opts.estimator not in ("k2", "k3"):
        raise UserError(f"{key}: estimator={opts.estimator!r}; use k2 or k3")
    if "{hint}" not in opts.template:
        raise UserError(f"{key}: template={opts.template!r} must contain {{hint}} (where the context goes)")
    if not opts.use_siblings and opts.ground_truth_key is None:
        raise UserError(f"{key}: use_siblings=false and ground_truth_key=null leave the self-teacher no context")


def srpo_hook(policy: Any, opts: SRPOOptions, extra: ExtraModel):
    def hook(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
        B, G = adv.shape
        x = torch.nan_to_num(cols[0, names.index(opts.reward)].float().cpu(), nan=float("-inf"))
        correct = (x >= opts.correct_at).view(B, G)
        gts = [rollout.meta[b * G].get(opts.ground_truth_key) if opts.ground_truth_key else None for b in range(B)]
        distil, hints = route(correct, torch.tensor([g is not None for g in gts]), opts.use_siblings)
        rows = distil.reshape(-1).nonzero().reshape(-1)
        N, K = rollout.logp_old.shape
        t_logp, w = torch.zeros(N, K), torch.zeros(N, K)
        ent_mean = 0.0
        if rows.numel():
            prompts = []
            for n in rows.tolist():
                kind, src = hints[n]
                hint = rollout.samples[src] if kind == "sibling" else str(gts[src])
                prompts.append(policy.prepare(with_hint(rollout.prompts[n], hint, opts.template), rollout.meta[n]))
            extra.handle = policy.model  # the policy itself (its prepared wrapper), at the sampling parameters
            lp, ent = policy.frozen_log_prob(extra, rollout, rows, None, prompts=prompts, with_entropy=True)
            vocab = int(len(policy.tokenizer))
            t_logp[rows] = lp.cpu()
            w[rows] = entropy_weights(ent.cpu(), vocab) if opts.entropy_weighting else 1.0
            m = rollout.train_mask[rows].bool()
            ent_mean = float(ent.cpu()[m].mean()) if m.any() else 0.0
        rollout.extras[T_LOGP], rollout.extras[T_W], rollout.extras[DISTIL] = t_logp, w, distil.reshape(-1)
        out = torch.where(distil.to(adv.device), torch.zeros_like(adv), adv)  # failed + distilled: no GRPO term
        return out, {"srpo/distilled_frac": float(distil.float().mean()), "srpo/teacher_entropy": ent_mean}

    return hook


def setup_srpo(policy: Any, opts: SRPOOptions, cfg: Any) -> MethodRuntime:
    need_frozen_scorer(policy, "methods.srpo")
    extra = ExtraModel("srpo_self_teacher", torch.nn.Identity(), frozen=False)  # the policy itself: no extra memory
    return MethodRuntime(
        extra_models=[extra],
        loss_terms=[SRPOTerm(opts.coef, opts.estimator)],
        advantage_hooks=[srpo_hook(policy, opts, extra)],
    )


METHOD = register_method(
    Method(
        name="srpo",
        paper="SRPO (Li et al. 2026, arXiv 2604.02288): correct rows -> GRPO, failed rows -> self-distillation",
        options=SRPOOptions,
        pipelines=("vlm_reasoning", "vlm_grounding"),
        check=check_srpo,
        setup=setup_srpo,
    )
)
