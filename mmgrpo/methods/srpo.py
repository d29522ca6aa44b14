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

  with c the privileged context: a correct sibling's completion from the same group when there is one (its answer
  only: ``<think>...</think>`` dropped, ``strip_thinking``, as SDPO's ``remove_thinking_from_demonstration``), else
  the example's ground truth (``meta[ground_truth_key]``); a failed row with neither stays with GRPO. c goes after
  the question and its options (``template``);
- entropy-aware weighting: w_t = clamp(1 - H_t / log V, 0, 1), H_t the self-teacher's entropy at token t (V the
  vocabulary): confident teacher tokens count fully, uniform ones not at all (the abstract states the principle;
  this linear form is our choice).

The self-teacher's weights (``teacher``): ``ema`` (default), an exponential moving average of the policy's
trainable parameters, teacher <- (1 - r) teacher + r policy once per rollout with r = ``teacher_update_rate`` (0.05),
SDPO's regularised teacher (its public configuration's default, ``teacher_regularization: ema``); or ``current``, the
policy at the sampling parameters. It scores the failed rows once per rollout, in the advantage hook.

What we approximate: the paper's distillation is logit-level (full-distribution KL); ours estimates the same reverse
KL on the sampled token (``estimator: k2``, 1/2 (log pi_theta - log pi_teacher)^2, whose gradient is the on-policy
per-token reverse-KL gradient, as KDRL's; or ``k3``), so it needs no [n, L, V] student logits with gradient.

Precondition: the method works only if the model reads its context, i.e. a correct solution in the prompt makes the
self-teacher likelier to produce it. ``measure_context: true`` logs ``srpo/context_gain`` (:func:`context_gain`:
mean per-token log-prob of the demonstrated completion with minus without the context; > 0 when the teacher reads
it). On the shapes VLM world it is -0.4 to -0.7 nats a token at the shipped model: that 1.6M-parameter model,
pretrained on templated questions only, cannot read an appended solution, so its self-teacher knows less than the
student and SRPO collapses there (docs/results.md).

Parts: the advantage hook (routing, one no-grad forward of the failed rows under their hinted prompts, timed as
``extra/srpo_self_teacher/time_s``; the teacher is the policy with the EMA's weights swapped in, so its memory is the
fp32 shadows of the trainable parameters, 0 with ``teacher: current``), the loss term ``srpo``
(:class:`mmgrpo.core.extra.LossTerm`) and the teacher's state (the shadows, checkpointed: a resumed run continues
exactly). Metrics: ``srpo/distilled_frac``, ``srpo/teacher_entropy``, ``srpo/context_gain`` (opt-in). ``teacher:
ema`` is refused under FSDP / DeepSpeed sharding (use ``current``).

Applies to the VLM recipes; not to the diffusion policy (its self-teacher would be the denoiser conditioned on a
corrected prompt, which needs a "corrected version" of an image prompt that the shapes / text-to-image data do not
carry).

>>> entropy_weights(torch.tensor([[0.0, math.log(16.0), 2 * math.log(16.0)]]), vocab=16)
tensor([[1., 0., 0.]])
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmgrpo.core.ema import EMA
from mmgrpo.core.errors import UserError
from mmgrpo.core.extra import ExtraModel, TermInputs
from mmgrpo.methods.kdrl import kd_per_token, need_frozen_scorer
from mmgrpo.methods.registry import Method, MethodRuntime, register_method
from mmgrpo.policies.vlm_inputs import question_text

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
    """The prompt shown to the self-teacher: its question (with its options, :func:`question_text`) followed by
    ``template`` filled with ``hint``."""
    extra = template.format(hint=hint)
    if isinstance(prompt, str):
        return prompt + extra
    if isinstance(prompt, dict):
        for key in ("question", "text"):
            if isinstance(prompt.get(key), str):  # after the options, not between the question and its options
                return {**prompt, key: question_text(prompt) + extra, "options": None}
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
    strip_thinking: bool = True
    """drop ``<think>...</think>`` from a sibling's completion before it becomes the context (SDPO's
    ``remove_thinking_from_demonstration``): the self-teacher sees the sibling's answer, not its reasoning"""
    teacher: Literal["ema", "current"] = "ema"
    """the self-teacher's weights: an exponential moving average of the policy's (SDPO's regularised teacher) or the
    current policy itself"""
    teacher_update_rate: float = 0.05
    """ema: teacher <- (1 - rate) * teacher + rate * policy once per rollout (SDPO's ``teacher_update_rate``)"""
    measure_context: bool = False
    """log ``srpo/context_gain``: does the self-teacher read its context? Two more no-grad forwards a step"""


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
    if opts.teacher not in ("ema", "current"):
        raise UserError(f"{key}: teacher={opts.teacher!r}; use ema (a moving average of the policy) or current")
    if not 0.0 < opts.teacher_update_rate < 1.0:
        raise UserError(f"{key}: teacher_update_rate={opts.teacher_update_rate} must be in (0, 1), e.g. 0.05")
    if not opts.use_siblings and opts.ground_truth_key is None:
        raise UserError(f"{key}: use_siblings=false and ground_truth_key=null leave the self-teacher no context")


THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def demonstration(completion: str, strip_thinking: bool = True) -> str:
    """A correct sibling's completion as the self-teacher's context: without its ``<think>...</think>`` spans when
    ``strip_thinking`` (the answer, not the reasoning: a failed row's own reasoning is then not judged by how closely
    it copies the sibling's)."""
    return THINK.sub("", completion).strip() if strip_thinking else completion


class SelfTeacher:
    """The self-teacher's weights, checkpointed. ``current``: the policy's own. ``ema``: an exponential moving average
    of the policy's trainable parameters (fp32 shadows, :class:`mmgrpo.core.ema.EMA`), advanced once per rollout
    and swapped into the policy for the teacher's forward; it starts at the policy of the first rollout. Its memory is
    reported as ``extra/srpo_self_teacher/mib``."""

    def __init__(self, mode: str, rate: float, extra: ExtraModel):
        self.mode, self.rate, self.extra = mode, rate, extra
        self.ema: EMA | None = None
        self.loaded: list[torch.Tensor] | None = None  # shadows from a checkpoint, applied at the first rollout

    def advance(self, policy: Any) -> None:
        """Move the teacher by one rollout (the first rollout's teacher is the policy itself)."""
        if self.mode == "current":
            return
        if self.ema is None:
            params = [p for p in policy.model.parameters() if p.requires_grad]
            sharded = [type(p).__name__ for p in params if hasattr(p, "ds_id") or type(p).__name__ == "DTensor"]
            if sharded:
                raise UserError(
                    "methods.srpo.teacher=ema keeps a moving average of the policy's parameters, which this run "
                    f"shards ({sharded[0]} parameters: FSDP / DeepSpeed); set methods.srpo.teacher: current, or train "
                    "unsharded"
                )
            self.ema = EMA(params, 1.0 - self.rate, "methods.srpo.teacher_update_rate")
            if self.loaded is not None:
                self.ema.load_state_dict({"shadow": self.loaded})
                self.ema.update()
            self._expose()
        else:
            self.ema.update()  # in place: the exposed buffers follow

    def scoring(self) -> contextlib.AbstractContextManager:
        """The context in which the policy scores as the self-teacher (its weights swapped for the EMA's)."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def _expose(self) -> None:
        """Count the shadows as the extra model's memory."""
        module = torch.nn.Module()
        for i, t in enumerate(self.ema.shadow):
            module.register_buffer(f"shadow{i}", t, persistent=False)
        self.extra.module = module

    def state_dict(self) -> dict[str, Any]:
        if self.ema is not None:
            return {"shadow": [t.clone() for t in self.ema.shadow]}
        return {"shadow": list(self.loaded)} if self.loaded is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("shadow"):
            return
        if self.ema is not None:
            self.ema.load_state_dict(state)
            self._expose()
        else:
            self.loaded = [t.clone().float() for t in state["shadow"]]


def context_gain(
    policy: Any, extra: ExtraModel, rollout: Any, rows: torch.Tensor, hints: list, prompts: list
) -> float | None:
    """How much the self-teacher's context helps it: the mean per-token log-prob of each demonstrated (correct)
    sibling completion under a failed row's hinted prompt minus under that row's own prompt, both scored by the
    self-teacher. Positive when the teacher reads the demonstration (copying makes it likelier); near 0 or negative
    when it cannot, and then its targets carry no correction (None when no row was hinted by a sibling)."""
    pairs = [(i, hints[n][1]) for i, n in enumerate(rows.tolist()) if hints[n][0] == "sibling"]
    if not pairs:
        return None
    src = torch.tensor([s for _, s in pairs])
    with_ctx = policy.frozen_log_prob(extra, rollout, src, None, prompts=[prompts[i] for i, _ in pairs])
    without = policy.frozen_log_prob(
        extra, rollout, src, None, prompts=[rollout.extras["prompt"][int(rows[i])] for i, _ in pairs]
    )
    mask = rollout.train_mask[src].bool().to(with_ctx.device)
    per_row = ((with_ctx - without) * mask).sum(1) / mask.sum(1).clamp_min(1)
    return float(per_row.mean())


def srpo_hook(policy: Any, opts: SRPOOptions, extra: ExtraModel, teacher: SelfTeacher):
    def hook(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
        B, G = adv.shape
        x = torch.nan_to_num(cols[0, names.index(opts.reward)].float().cpu(), nan=float("-inf"))
        correct = (x >= opts.correct_at).view(B, G)
        gts = [rollout.meta[b * G].get(opts.ground_truth_key) if opts.ground_truth_key else None for b in range(B)]
        distil, hints = route(correct, torch.tensor([g is not None for g in gts]), opts.use_siblings)
        rows = distil.reshape(-1).nonzero().reshape(-1)
        N, K = rollout.logp_old.shape
        t_logp, w = torch.zeros(N, K), torch.zeros(N, K)
        teacher.advance(policy)  # every rollout, whether or not a row is distilled
        ent_mean, stats = 0.0, {}
        if rows.numel():
            prompts = []
            for n in rows.tolist():
                kind, src = hints[n]
                hint = demonstration(rollout.samples[src], opts.strip_thinking) if kind == "sibling" else str(gts[src])
                prompts.append(policy.prepare(with_hint(rollout.prompts[n], hint, opts.template), rollout.meta[n]))
            extra.handle = policy.model  # the policy itself (its prepared wrapper), with the teacher's weights
            with teacher.scoring(), torch.no_grad():
                lp, ent = policy.frozen_log_prob(extra, rollout, rows, None, prompts=prompts, with_entropy=True)
            vocab = int(len(policy.tokenizer))
            t_logp[rows] = lp.cpu()
            w[rows] = entropy_weights(ent.cpu(), vocab) if opts.entropy_weighting else 1.0
            m = rollout.train_mask[rows].bool()
            ent_mean = float(ent.cpu()[m].mean()) if m.any() else 0.0
            if opts.measure_context:
                with teacher.scoring(), torch.no_grad():
                    gain = context_gain(policy, extra, rollout, rows, hints, prompts)
                if gain is not None:
                    stats["srpo/context_gain"] = gain
        rollout.extras[T_LOGP], rollout.extras[T_W], rollout.extras[DISTIL] = t_logp, w, distil.reshape(-1)
        out = torch.where(distil.to(adv.device), torch.zeros_like(adv), adv)  # failed + distilled: no GRPO term
        return out, {"srpo/distilled_frac": float(distil.float().mean()), "srpo/teacher_entropy": ent_mean, **stats}

    return hook


def setup_srpo(policy: Any, opts: SRPOOptions, cfg: Any) -> MethodRuntime:
    need_frozen_scorer(policy, "methods.srpo")
    extra = ExtraModel("srpo_self_teacher", torch.nn.Identity(), frozen=False)  # the policy (+ EMA shadows)
    teacher = SelfTeacher(opts.teacher, opts.teacher_update_rate, extra)
    return MethodRuntime(
        extra_models=[extra],
        loss_terms=[SRPOTerm(opts.coef, opts.estimator)],
        advantage_hooks=[srpo_hook(policy, opts, extra, teacher)],
        state=teacher,
    )


METHOD = register_method(
    Method(
        name="srpo",
        paper="SRPO (Li et al. 2026, arXiv 2604.02288): correct rows -> GRPO, failed rows -> self-distillation",
        options=SRPOOptions,
        pipelines=("vlm_reasoning", "vlm_grounding"),
        check=check_srpo,
        setup=setup_srpo,
        local_forwards="its self-teacher scores only the rows this process distils (its failed ones)",
        conflicts=("nft",),  # NFT replaces the surrogate SRPO routes its correct rows to
    )
)
