"""KDRL: GRPO plus a reverse-KL distillation term to a frozen teacher, in one objective. Switched on by
``methods: {kdrl: {teacher: <folder or hub id>, coef: 0.005, estimator: k2}}``.

KDRL, "Post-Training Reasoning LLMs via Unified Knowledge Distillation and Reinforcement Learning" (Hongling Xu,
Qi Zhu, Heyuan Deng, Jinpeng Li et al. 2025, arXiv 2506.02208). The student samples its own G completions (on-policy,
as GRPO); besides the reward, each sampled token is pulled towards a teacher pi_T by the reverse KL
KL(pi_theta || pi_T) estimated on the student's own samples:

    J_KDRL(theta) = J_GRPO(theta) - beta * E_{o ~ pi_theta} [ KL(pi_theta || pi_T) ]

per token t of a sampled row, with d_t = log pi_theta(o_t) - log pi_T(o_t) (the student's sampled token):

- ``k2`` (the paper's choice): 1/2 d_t^2. Its gradient d_t * grad log pi_theta(o_t) is the (per-token) policy
  gradient of the reverse KL, so minimising it on on-policy samples is unbiased RKL minimisation;
- ``k3``: exp(-d_t) + d_t - 1 (Schulman's k3, the GRPO reference-KL form; non-negative, lower variance; its
  gradient (1 - pi_T / pi_theta) grad log pi_theta is the gradient of the *forward* KL on these samples, which
  the paper compares against).

The paper's two schedule refinements, both options here:

- **KL-coefficient annealing**: beta goes linearly from ``coef`` to ``coef_final`` over ``anneal_steps`` optimizer
  steps (the paper anneals 5e-3 -> 1e-3), then stays there; ``coef_final: null`` keeps beta constant;
- **reward-guided KD**: with ``skip_correct_reward: <reward name>``, rows whose that reward is >= ``correct_at``
  get no KD term (the student keeps its own correct solutions; KD only where it failed). An advantage hook marks
  the rows (``rollout.extras["kdrl_kd"] [N]``, 1.0 = distil).

The term is a :class:`mmgrpo.core.extra.LossTerm` (``loss/kdrl``), aggregated like the policy loss (same
normaliser and row weights) and added to it. The teacher scores each rollout's tokens once, in an advantage hook
(``rollout.extras["kdrl_teacher_logp"] [N, K]``), not once per epoch. It is an
:class:`mmgrpo.core.extra.ExtraModel` (``extra/kdrl_teacher/mib``, ``extra/kdrl_teacher/time_s``) loaded by the
policy like its own weights (:meth:`mmgrpo.policies.vlm.VLMPolicy.load_frozen`): the same tokenizer and family as
the policy (it scores the student's token ids), frozen, on the policy's device, in ``dtype`` (default the policy's).

Applies to the VLM recipes (``vlm_reasoning``, ``vlm_grounding``). Not to the diffusion policy: a diffusion teacher's
per-step Gaussian log-probs of the student's SDE transitions would need the teacher's velocity at the student's
latents, which ``DiffusionPolicy`` has no frozen-scorer path for yet (the reference-KL machinery uses the same
transformer with adapters off); the config check says so.

Letters: n rows, k tokens; N = B*G rows of a step.

>>> kd_per_token(torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, -1.0]]), "k2")  # d = [1, 0] -> d^2 / 2
tensor([[0.5000, 0.0000]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.extra import TermInputs
from mmgrpo.core.losses import k3_kl
from mmgrpo.methods.registry import Method, MethodRuntime, register_method

KD_KEY = "kdrl_kd"
"""rollout.extras key: [N] float, 1.0 where the KD term applies (reward-guided KD), written by the advantage hook"""
TEACHER_KEY = "kdrl_teacher_logp"
"""rollout.extras key: [N, K] the teacher's log-probs of the sampled tokens, scored once per rollout (one group per
teacher forward) by the advantage hook, whatever the number of epochs and minibatches"""


def kd_per_token(
    logp: torch.Tensor, teacher_logp: torch.Tensor, estimator: str = "k2", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token reverse-KL estimate KL(pi_theta || pi_T) on the student's samples. [n, k], [n, k] -> [n, k] fp32.

    d = logp - teacher_logp; k2 = d^2 / 2; k3 = exp(-d) + d - 1 (= :func:`mmgrpo.core.losses.k3_kl`).
    Gradient flows through ``logp`` only (the teacher is frozen). ``mask [n, k]``: d = 0 off the mask (padding
    cannot overflow exp into a NaN gradient).
    """
    d = logp.float() - teacher_logp.float().detach()
    if mask is not None:
        d = torch.where(mask.bool(), d, torch.zeros_like(d))
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return k3_kl(d, torch.zeros_like(d))  # exp(0 - d) - (0 - d) - 1 = exp(-d) + d - 1
    raise UserError(f"methods.kdrl.estimator={estimator!r}; use k2 (the paper's) or k3")


def kd_coef(step: int, coef: float, coef_final: float | None, anneal_steps: int) -> float:
    """beta at optimizer step ``step``: linear from ``coef`` to ``coef_final`` over ``anneal_steps``, then flat."""
    if coef_final is None or anneal_steps <= 0:
        return coef
    frac = min(max(step, 0) / anneal_steps, 1.0)
    return coef + (coef_final - coef) * frac


def kd_rows(cols: torch.Tensor, names: list[str], reward: str, correct_at: float) -> torch.Tensor:
    """Rows that get the KD term under reward-guided KD: ``cols [V, R, N]`` (version 0) -> [N] float, 1.0 where the
    reward ``reward`` is below ``correct_at`` (or not finite: the row was not graded)."""
    if reward not in names:
        raise UserError(f"methods.kdrl.skip_correct_reward={reward!r} is not one of the run's rewards {names}")
    r = cols[0, names.index(reward)].float()  # [N]
    return (~(torch.nan_to_num(r, nan=float("-inf")) >= correct_at)).float()


class KDRLTerm:
    """beta * k(logp, teacher_logp) on every trained token (of the rows the KD applies to): a loss term [n, k]."""

    name = "kdrl"
    replaces_surrogate = False

    def __init__(self, policy: Any, teacher: Any, opts: KDRLOptions):
        self.policy, self.teacher, self.opts = policy, teacher, opts

    def __call__(self, x: TermInputs) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.opts
        ex = x.rollout.extras
        if TEACHER_KEY in ex:  # scored once per rollout by the hook
            t_logp = ex[TEACHER_KEY][x.rows.to(ex[TEACHER_KEY].device)][:, x.units.to(ex[TEACHER_KEY].device)]
        else:
            t_logp = self.policy.frozen_log_prob(self.teacher, x.rollout, x.rows, x.units)  # [n, k]
        kd = kd_per_token(x.lp.logp, t_logp.to(x.lp.logp.device), o.estimator, x.mask)  # [n, k]
        if KD_KEY in x.rollout.extras:
            kd = kd * x.rollout.extras[KD_KEY][x.rows.to(x.rollout.extras[KD_KEY].device)].to(kd)[:, None]
        beta = kd_coef(x.step, o.coef, o.coef_final, o.anneal_steps)
        m = x.mask.bool()
        seen = kd.detach()[m]
        stats = {"kdrl/kl": float(seen.mean()) if seen.numel() else 0.0, "kdrl/coef": beta}
        return beta * kd, stats


@dataclass
class KDRLOptions:
    teacher: str = ""
    """the teacher VLM: a local folder or hub id (same tokenizer and family as the policy)"""
    coef: float = 0.005
    """beta, the weight of the KD term (the paper: 5e-3 annealed to 1e-3)"""
    coef_final: float | None = None
    """beta after annealing; null = constant beta"""
    anneal_steps: int = 0
    """optimizer steps over which beta goes linearly from coef to coef_final"""
    estimator: Literal["k2", "k3"] = "k2"
    """per-token reverse-KL estimator: k2 = d^2/2 (unbiased RKL gradient, the paper's) or k3"""
    skip_correct_reward: str | None = None
    """reward-guided KD: rows whose this reward is >= correct_at get no KD term (null: every row is distilled)"""
    correct_at: float = 1.0
    """the value of skip_correct_reward from which a row counts as correct"""
    dtype: str | None = None
    """the teacher's weights dtype (float32, bfloat16, float16); null = the policy's"""
    revision: str | None = None
    """hub revision of the teacher (a hub id only)"""


def check_kdrl(opts: KDRLOptions, cfg: Any, key: str) -> None:
    if not opts.teacher:
        raise UserError(f"{key}: KDRL needs a teacher: set methods.kdrl.teacher to a model folder or hub id")
    if not opts.coef >= 0 or (opts.coef_final is not None and not opts.coef_final >= 0):
        raise UserError(f"{key}: coef={opts.coef}, coef_final={opts.coef_final} must be >= 0 (0.005 -> 0.001)")
    if opts.anneal_steps < 0:
        raise UserError(f"{key}: anneal_steps={opts.anneal_steps} must be >= 0")
    if opts.estimator not in ("k2", "k3"):
        raise UserError(f"{key}: estimator={opts.estimator!r}; use k2 or k3")
    names = [r.name for r in cfg.rewards]
    if opts.skip_correct_reward is not None and opts.skip_correct_reward not in names:
        raise UserError(
            f"{key}: skip_correct_reward={opts.skip_correct_reward!r} is not listed under rewards: {names}; name one "
            "of them (e.g. accuracy) or set it to null"
        )


def need_frozen_scorer(policy: Any, what: str) -> None:
    """A UserError unless ``policy`` can load and run frozen token scorers (the VLM policy)."""
    if not (hasattr(policy, "load_frozen") and hasattr(policy, "frozen_log_prob")):
        raise UserError(
            f"{what} needs a policy that scores tokens with a frozen teacher (the VLM policy: load_frozen / "
            f"frozen_log_prob); {type(policy).__name__} has none"
        )


def setup_kdrl(policy: Any, opts: KDRLOptions, cfg: Any) -> MethodRuntime:
    need_frozen_scorer(policy, "methods.kdrl")
    teacher = policy.load_frozen("kdrl_teacher", opts.teacher, "methods.kdrl.teacher", opts.dtype, opts.revision)

    def score(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
        B, G = adv.shape
        t_logp = torch.zeros_like(rollout.logp_old)  # [N, K]
        for b in range(B):  # one prompt's rows per teacher forward (its memory is one group's)
            rows = torch.arange(b * G, (b + 1) * G)
            t_logp[rows] = policy.frozen_log_prob(teacher, rollout, rows).to(t_logp)
        rollout.extras[TEACHER_KEY] = t_logp
        return adv, {}

    hooks = [score]
    if opts.skip_correct_reward is not None:

        def mark(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
            flags = kd_rows(cols, names, opts.skip_correct_reward, opts.correct_at)  # [N]
            rollout.extras[KD_KEY] = flags
            return adv, {"kdrl/distilled_frac": float(flags.mean()) if flags.numel() else 0.0}

        hooks.append(mark)
    return MethodRuntime(extra_models=[teacher], loss_terms=[KDRLTerm(policy, teacher, opts)], advantage_hooks=hooks)


METHOD = register_method(
    Method(
        name="kdrl",
        paper="KDRL (Xu et al. 2025, arXiv 2506.02208): GRPO + reverse-KL distillation to a teacher in one objective",
        options=KDRLOptions,
        pipelines=("vlm_reasoning", "vlm_grounding"),
        check=check_kdrl,
        setup=setup_kdrl,
    )
)
