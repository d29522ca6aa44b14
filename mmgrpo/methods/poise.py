"""POISE: the baseline is a lightweight probe on the policy's own internal states, trained online. Switched on by
``methods: {poise: {buffer_size: 512, probe_steps: 8, lr: 1e-3}}``; its advantages replace the estimator's.

POISE, "Your Language Model is Its Own Critic: Reinforcement Learning with Value Estimation from Actor's Internal
States" (Yunho Choi, Jongwon Lim, Woojin Ahn, Minjae Oh, Jeonghoon Shim, Yohan Jo 2026, arXiv 2605.07579). A probe
V_phi predicts the expected verifiable reward of a prompt from the policy's hidden states of the prompt and of a
generated trajectory plus token-entropy statistics; it is the baseline of the policy gradient, with no critic the
size of the policy and no need for many rollouts per prompt. Because the features of a trajectory carry information
about its own reward, using them as its own baseline would bias the gradient; POISE's cross-rollout construction
predicts rollout i's value from an *independent* rollout j of the same prompt:

    A_i = r_i - V_phi(f(q, o_j)),   j != i, o_j independent of o_i          (the baseline does not depend on o_i)
    phi <- argmin_phi  E_buffer [ (V_phi(f(q, o)) - r(o))^2 ]                (trained online, on recent rollouts)

What we implement (the paper's code was not public; our choices are marked):

- features f (:meth:`mmgrpo.policies.vlm.VLMPolicy.value_features`): the last prompt token's final hidden state,
  the mean final hidden state over the completion (our pooling), token-entropy mean / std / max / min and
  log(1 + length): [2 D + 5], from one no-grad forward at the sampling parameters (the paper reads them from the
  sampling forward itself; ours costs one teacher-forced forward, timed as ``extra/poise_probe/time_s``);
- the pairing: j = the next row of the same group, cyclically (i -> i + 1 mod G; G = 2 swaps the pair), so
  ``trainer.group_size >= 2`` (G = 2 is the paper's cheapest setting: one partner per rollout);
- the probe: a linear head on standardised features (mean / std tracked over everything seen, our choice), MSE,
  AdamW (``lr``), ``probe_steps`` full-batch steps per training step over a sliding buffer of the last
  ``buffer_size`` (feature, reward) rows. The baseline of step s is predicted BEFORE the probe sees step s's rewards
  (no leakage of r_i into A_i);
- r is the run's weighted reward (``rewards:`` weights, version 0); the advantages r - V replace the estimator's
  (``advantage.estimator`` then only sets the logged batch statistics).

State (probe weights, its optimizer, feature statistics, the buffer) is saved in checkpoints and a resumed run
continues exactly (``tests/methods/test_poise.py``). Layout-free: the probe is trained on the rows of every process
(all-gathered, in global row order), so 1 and 2 processes train the same probe; the probe is seeded from
``run.seed``. Metrics: ``poise/value_mean``, ``poise/probe_mse`` (buffer MSE after this step's training),
``poise/pred_abs_err`` (|r - V| on this step's rows, before training), ``poise/buffer``.

Applies to the VLM recipes. Not to the diffusion policy yet: its denoiser's hidden states are not exposed as
features (``value_features``) and there is no token entropy; the probe and the advantage maths are policy-free, so
a diffusion ``value_features`` would be all it takes.

>>> cross_rollout_partner(torch.tensor([[1.0, 2.0, 3.0]]))  # each row's baseline comes from the next row's features
tensor([[2., 3., 1.]])
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mmgrpo.core.errors import UserError
from mmgrpo.core.extra import ExtraModel
from mmgrpo.methods.registry import Method, MethodRuntime, register_method


def cross_rollout_partner(values: torch.Tensor) -> torch.Tensor:
    """[B, G, ...] -> [B, G, ...]: row i of each group gets row (i + 1) mod G's value (the cross-rollout pairing)."""
    return torch.roll(values, shifts=-1, dims=1)


class ValueProbe(torch.nn.Module):
    """V(f) = w . (f - mean) / std + b: a linear probe on standardised features [n, F] -> [n]."""

    def __init__(self, dim: int, generator: torch.Generator):
        super().__init__()
        self.head = torch.nn.Linear(dim, 1)
        with torch.no_grad():  # seeded init, independent of the global RNG
            self.head.weight.copy_(torch.randn(1, dim, generator=generator) * (1.0 / math.sqrt(dim)) * 0.01)
            self.head.bias.zero_()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    def observe(self, f: torch.Tensor) -> None:
        """Fold a batch of features [n, F] into the running mean / variance (Chan et al.'s parallel update)."""
        f = f.double()
        n, mean_b = f.shape[0], f.mean(0)
        m2_b = ((f - mean_b) ** 2).sum(0)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta**2 * self.count * n / total
        self.count.fill_(total)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        std = (self.m2 / self.count.clamp_min(1.0)).sqrt().clamp_min(1e-6)
        z = ((f.double() - self.mean) / std).float()
        return self.head(z).squeeze(-1)


class POISEState:
    """The probe, its optimizer and the replay buffer: what a checkpoint saves (``state_dict``)."""

    def __init__(self, opts: POISEOptions, seed: int):
        self.opts, self.seed = opts, seed
        self.probe: ValueProbe | None = None  # built on the first features (their size is the model's)
        self.optimizer: torch.optim.Optimizer | None = None
        self.feats = torch.zeros(0, 0)  # [buffer, F]
        self.rewards = torch.zeros(0)  # [buffer]
        self.extra = ExtraModel("poise_probe", torch.nn.Identity(), frozen=False)  # time + memory of the probe

    def build(self, dim: int) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.probe = ValueProbe(dim, g)
        self.optimizer = torch.optim.AdamW(self.probe.head.parameters(), lr=self.opts.lr, weight_decay=0.0)
        self.feats = torch.zeros(0, dim)
        self.extra.module = self.probe

    def predict(self, f: torch.Tensor) -> torch.Tensor:
        """V(f) [n] (no gradient); 0 before the probe has seen any reward."""
        if self.probe is None or self.probe.count.item() == 0:
            return torch.zeros(f.shape[0])
        with torch.no_grad():
            return self.probe(f)

    def learn(self, f: torch.Tensor, r: torch.Tensor) -> float:
        """Add rows (f [n, F], r [n]) to the buffer (the newest ``buffer_size`` kept), then ``probe_steps`` AdamW
        steps of MSE on the whole buffer; returns the buffer MSE after training."""
        if self.probe is None:
            self.build(f.shape[1])
        self.probe.observe(f)
        self.feats = torch.cat([self.feats, f.float()])[-self.opts.buffer_size :]
        self.rewards = torch.cat([self.rewards, r.float()])[-self.opts.buffer_size :]
        for _ in range(self.opts.probe_steps):
            loss = torch.nn.functional.mse_loss(self.probe(self.feats), self.rewards)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(self.probe(self.feats), self.rewards))

    def state_dict(self) -> dict[str, Any]:
        if self.probe is None:
            return {"built": torch.zeros(())}
        return {
            "built": torch.ones(()),
            "probe": {k: v.clone() for k, v in self.probe.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot, not the live moments
            "feats": self.feats.clone(),
            "rewards": self.rewards.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not float(state["built"]):
            self.probe = None
            return
        self.build(int(state["feats"].shape[1]))
        self.probe.load_state_dict(state["probe"])
        opt = state["optimizer"]
        opt = {**opt, "state": {int(k): v for k, v in opt["state"].items()}}
        self.optimizer.load_state_dict(opt)
        self.feats, self.rewards = state["feats"].float(), state["rewards"].float()


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """This process's rows [n, ...] -> every process's, in rank order (= global row order); itself alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(x, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous().to(dev))
    return torch.cat(parts).cpu()


def poise_hook(policy: Any, state: POISEState, weights: torch.Tensor):
    """The advantage hook: features of this rank's rows, the cross-rollout baseline from the probe as it was before
    this step, advantages r - V [B, G], then the probe trained on every process's rows of the step."""

    def hook(adv: torch.Tensor, rollout: Any, cols: torch.Tensor, names: list[str]):
        B, G = adv.shape
        r = (torch.nan_to_num(cols[0].float().cpu()) * weights[:, None]).sum(0)  # [N] the run's weighted reward
        with state.extra.timed():
            f = policy.value_features(rollout, torch.arange(rollout.num_rows))  # [N, F]
            base = cross_rollout_partner(state.predict(f).view(B, G))  # [B, G]: row i valued from row i + 1's states
            mse = state.learn(_gather_rows(f), _gather_rows(r))
        out = (r.view(B, G) - base).to(adv)
        return out, {
            "poise/value_mean": float(base.mean()),
            "poise/pred_abs_err": float((r.view(B, G) - base).abs().mean()),
            "poise/probe_mse": mse,
            "poise/buffer": float(state.rewards.numel()),
        }

    return hook


@dataclass
class POISEOptions:
    buffer_size: int = 512
    """rows (feature, reward) the probe is trained on: the newest ones"""
    probe_steps: int = 8
    """AdamW steps of the probe per training step (full batch over the buffer)"""
    lr: float = 1.0e-3
    """the probe's learning rate"""


def check_poise(opts: POISEOptions, cfg: Any, key: str) -> None:
    if cfg.trainer.group_size < 2:
        raise UserError(
            f"{key}: POISE's cross-rollout baseline values each rollout from another rollout of its prompt; set "
            "trainer.group_size >= 2 (2 is the cheapest)"
        )
    if opts.buffer_size < 1 or opts.probe_steps < 1:
        raise UserError(f"{key}: buffer_size={opts.buffer_size} and probe_steps={opts.probe_steps} must be >= 1")
    if not (opts.lr > 0 and math.isfinite(opts.lr)):
        raise UserError(f"{key}: lr={opts.lr} must be a finite number > 0 (1e-3)")


def setup_poise(policy: Any, opts: POISEOptions, cfg: Any) -> MethodRuntime:
    if not hasattr(policy, "value_features"):
        raise UserError(
            f"methods.poise needs a policy that exposes its internal states (value_features: the VLM policy); "
            f"{type(policy).__name__} has none"
        )
    state = POISEState(opts, cfg.run.seed)
    weights = torch.tensor([r.weight for r in cfg.rewards], dtype=torch.float32)
    return MethodRuntime(extra_models=[state.extra], advantage_hooks=[poise_hook(policy, state, weights)], state=state)


METHOD = register_method(
    Method(
        name="poise",
        paper="POISE (Choi et al. 2026, arXiv 2605.07579): an online probe on the policy's hidden states as baseline",
        options=POISEOptions,
        pipelines=("vlm_reasoning", "vlm_grounding"),
        check=check_poise,
        setup=setup_poise,
    )
)
