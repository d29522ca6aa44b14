"""NFT (negative-aware fine-tuning), token level: supervised learning on the policy's own positive AND negative
answers, the negatives through an implicit negative policy. Switched on by
``methods: {nft: {reward: accuracy, correct_at: 1.0}}``; the NFT loss then replaces the configured surrogate.

NFT, "Bridging Supervised Learning and Reinforcement Learning in Math Reasoning" (Huayu Chen, Kaiwen Zheng, Qinsheng
Zhang, Ganqu Cui, Yin Cui, Haotian Ye, Tsung-Yi Lin, Ming-Yu Liu, Jun Zhu, Haoxiang Wang 2025, arXiv 2505.18116).
For a question q the sampling policy pi_old answers G times; a verifier marks each answer r in {0, 1}; r_q is the
question's correct fraction (the group mean). pi_old splits into the policy of correct answers pi+ and of wrong ones
pi-: pi_old = r_q pi+ + (1 - r_q) pi-. NFT trains pi_theta as pi+ by maximum likelihood on the positives and, on the
negatives, trains the *implicit negative policy* it defines,

    pi-_theta(a | q) = (pi_old(a | q) - r_q pi_theta(a | q)) / (1 - r_q),

by maximum likelihood too. Relative to pi_old, per token t with R_t = pi_theta(a_t | ...) / pi_old(a_t | ...):

    L_NFT = - sum_q omega(q) sum_a sum_t [ r log R_t + (1 - r) log max( (1 - r_q R_t) / (1 - r_q), eps ) ]

(eps keeps the negative term finite when R_t -> 1 / r_q; its gradient is 0 past the floor). At R = 1 the gradient of
a negative token is -r_q / (1 - r_q) grad log pi_theta: the positives are pulled up, the negatives pushed down in
proportion to how often the question is solved, and with omega(q) = sqrt((1 - r_q) / r_q) this is exactly GRPO's
gradient on binary rewards (r - r_q) / std (the paper's on-policy equivalence; ``prompt_weight: grpo``). The paper
leaves omega(q) as a per-question weight to choose; we offer:

- ``prompt_weight``: ``one`` (omega = 1), ``one_minus_acc`` (omega = 1 - r_q: hard questions weigh more) or ``grpo``
  (omega = sqrt((1 - r_q) / r_q); 0 when r_q = 0, where nothing is trained anyway);
- ``neg_ratio_floor``: eps, the floor of the negative ratio before the log (our default 0.05: the abstract does not
  give the paper's value);
- ``skip_solved``: drop questions every answer of which is correct (their only signal is SFT on the positives).

r comes from one reward (``reward``, >= ``correct_at`` = correct). Questions no answer of which is correct
contribute 0: log((1 - 0) / 1) = 0. The per-token values are reduced by the run's aggregation (``token_mean`` is the
paper's token-level average); the token ratio is the policy's (the VLM's completion tokens; a diffusion ``sde``
objective's denoising steps, whose per-step Gaussian log-probs make the same ratio: the method applies to any
policy with ``logp``/``logp_old``).

Reused from the diffusion analogue (DiffusionNFT: ``objective: nft`` + loss ``nft``): nothing but the idea: there
the negative policy is an explicit velocity field (``LogProbs.neg_logp``); here it is implicit in the token ratio,
so no extra forward is needed. Parts: an advantage hook writes each row's r, r_q and omega into
``rollout.extras`` (whole groups are on one rank, so r_q is exact and the result layout-free); the loss term
``nft`` (:class:`mmgrpo.core.extra.LossTerm`, ``replaces_surrogate``) computes the loss above. Metrics:
``nft/pos_frac`` (positive rows), ``nft/rq_mean``.

>>> # a negative token whose ratio doubled, r_q = 1/4: -log((1 - 0.25 * 2) / 0.75) = -log(2/3)
>>> nft_per_token(torch.tensor([[math.log(2.0)]]), torch.zeros(1, 1), torch.tensor([0.0]), torch.tensor([0.25]))
tensor([[0.4055]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.extra import TermInputs
from mmgrpo.methods.registry import Method, MethodRuntime, register_method

R_KEY, RQ_KEY, W_KEY = "nft_r", "nft_rq", "nft_weight"
"""rollout.extras keys, [N] float each: the row's correctness, its question's correct fraction, omega(q)"""


def nft_per_token(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    r: torch.Tensor,
    rq: torch.Tensor,
    eps: float = 0.05,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """NFT's per-token loss (before omega). logp, logp_old [n, k]; r, rq [n] -> [n, k] fp32.

    Positive rows (r = 1): -log R_t = -(logp - logp_old). Negative rows (r = 0): -log max((1 - rq R_t) / (1 - rq),
    eps). A negative row with rq = 1 cannot exist (rq counts it); rq is clamped below 1 for the arithmetic only.
    ``mask [n, k]``: units off the mask get log-ratio 0 (value 0, and no inf / NaN can reach the gradient).
    """
    log_ratio = logp.float() - logp_old.float()  # [n, k]
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    rq = rq.float()[:, None].to(log_ratio.device)  # [n, 1]
    r = r.float()[:, None].to(log_ratio.device)  # [n, 1]
    pos = -log_ratio
    neg_ratio = (1.0 - rq * torch.exp(log_ratio)) / (1.0 - rq).clamp_min(1e-6)  # [n, k]
    neg = -torch.log(neg_ratio.clamp_min(eps))
    return torch.where(r > 0.5, pos, neg)


def prompt_weights(rq: torch.Tensor, kind: str) -> torch.Tensor:
    """omega(q) from the correct fractions ``rq`` [...]: one, one_minus_acc (1 - rq) or grpo (sqrt((1 - rq) / rq),
    0 where rq = 0)."""
    rq = rq.float()
    if kind == "one":
        return torch.ones_like(rq)
    if kind == "one_minus_acc":
        return 1.0 - rq
    if kind == "grpo":
        return torch.where(rq > 0, ((1.0 - rq) / rq.clamp_min(1e-12)).sqrt(), torch.zeros_like(rq))
    raise UserError(f"methods.nft.prompt_weight={kind!r}; use one, one_minus_acc or grpo")


def nft_row_stats(correct: torch.Tensor, kind: str, skip_solved: bool) -> tuple[torch.Tensor, ...]:
    """correct [B, G] (0/1) -> r, rq, omega, each [B, G] (rq and omega repeated over the group); omega = 0 for
    solved groups when ``skip_solved``."""
    r = correct.float()
    rq = r.mean(-1, keepdim=True).expand_as(r)
    w = prompt_weights(rq, kind)
    if skip_solved:
        w = torch.where(rq >= 1.0, torch.zeros_like(w), w)
    return r, rq, w


class NFTTerm:
    """The NFT loss per token, omega(q) x :func:`nft_per_token`: the whole policy objective (replaces the
    surrogate)."""

    name = "nft"
    replaces_surrogate = True

    def __init__(self, eps: float):
        self.eps = eps

    def __call__(self, x: TermInputs) -> tuple[torch.Tensor, dict[str, float]]:
        ex = x.rollout.extras
        rows = x.rows.to(ex[R_KEY].device)
        r, rq, w = ex[R_KEY][rows], ex[RQ_KEY][rows], ex[W_KEY][rows]
        per = nft_per_token(x.lp.logp, x.logp_old, r, rq, self.eps, x.mask) * w.float().to(x.lp.logp.device)[:, None]
        return per, {}


@dataclass
class NFTOptions:
    reward: str = "accuracy"
    """the reward that says whether an answer is correct"""
    correct_at: float = 1.0
    """a row is positive (r = 1) when that reward is >= correct_at"""
    prompt_weight: Literal["one", "one_minus_acc", "grpo"] = "one"
    """omega(q): one, one_minus_acc (1 - r_q) or grpo (sqrt((1 - r_q) / r_q): GRPO's gradient on-policy)"""
    neg_ratio_floor: float = 0.05
    """eps: the implicit negative policy's ratio (1 - r_q R) / (1 - r_q) is floored here before the log"""
    skip_solved: bool = False
    """drop questions whose every answer is correct (omega = 0)"""


def check_nft(opts: NFTOptions, cfg: Any, key: str) -> None:
    names = [r.name for r in cfg.rewards]
    if opts.reward not in names:
        raise UserError(f"{key}: reward={opts.reward!r} is not listed under rewards: {names}; name the verifier")
    if not 0.0 < opts.neg_ratio_floor < 1.0:
        raise UserError(f"{key}: neg_ratio_floor={opts.neg_ratio_floor} must be in (0, 1) (e.g. 0.05)")
    if opts.prompt_weight not in ("one", "one_minus_acc", "grpo"):
        raise UserError(f"{key}: prompt_weight={opts.prompt_weight!r}; use one, one_minus_acc or grpo")
    if cfg.trainer.group_size < 2:
        raise UserError(f"{key}: NFT needs trainer.group_size >= 2 (r_q is the group's correct fraction)")
    if not math.isfinite(opts.correct_at):
        raise UserError(f"{key}: correct_at={opts.correct_at} must be finite")
    objective = (cfg.policy.options or {}).get("objective") if isinstance(cfg.policy.options, dict) else None
    objective = objective.get("name") if isinstance(objective, dict) else objective
    if objective not in (None, "sde"):  # a diffusion objective without log-probabilities
        raise UserError(f"{key}: token-level NFT reads the policy's log-probabilities, but policy.options.objective="
                        f"{objective} scores samples by a flow-matching error (its 'logp' is not a log-probability, "
                        "and the method would replace that objective's loss): DiffusionNFT is the objective 'nft' "
                        "itself; remove methods.nft")  # fmt: skip
    if cfg.loss.name == "nft":
        raise UserError(f"{key}: loss.name=nft is DiffusionNFT's loss, which methods.nft replaces with its own term; "
                        "token-level NFT runs with loss.name=grpo (set it, or remove methods.nft)")  # fmt: skip


def setup_nft(policy: Any, opts: NFTOptions, cfg: Any) -> MethodRuntime:
    def mark(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
        x = torch.nan_to_num(cols[0, names.index(opts.reward)].float(), nan=float("-inf"))  # [N]
        correct = (x >= opts.correct_at).view(adv.shape)  # [B, G]
        r, rq, w = nft_row_stats(correct, opts.prompt_weight, opts.skip_solved)
        rollout.extras[R_KEY], rollout.extras[RQ_KEY], rollout.extras[W_KEY] = r.reshape(-1), rq.reshape(-1), \
            w.reshape(-1)  # fmt: skip
        return adv, {"nft/pos_frac": float(r.mean()), "nft/rq_mean": float(rq[:, 0].mean())}

    return MethodRuntime(loss_terms=[NFTTerm(opts.neg_ratio_floor)], advantage_hooks=[mark])


METHOD = register_method(
    Method(
        name="nft",
        paper="NFT (Chen et al. 2025, arXiv 2505.18116): token-level negative-aware fine-tuning (implicit negatives)",
        options=NFTOptions,
        check=check_nft,
        setup=setup_nft,
        conflicts=("srpo",),  # NFT replaces the surrogate SRPO routes its correct rows to (loss/policy was 0)
    )
)
