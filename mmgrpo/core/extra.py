"""What a paper method adds beyond the policy: frozen extra models (teachers, a probe...) and extra loss terms.

**Extra models** (:class:`ExtraModel`). A method that needs another network (KDRL's teacher, AMPO's teachers,
POISE's probe) holds it as an ExtraModel: a name, the module (frozen: ``requires_grad`` off, eval mode, on the
policy's device and dtype; the policy's loader builds it, e.g. :meth:`mmgrpo.policies.vlm.VLMPolicy.load_frozen`),
and the time spent in it. The trainer logs, every step, for every extra model of the run (``Components.extra_models``):

- ``extra/<name>/mib``: the memory of its parameters and buffers (MiB);
- ``extra/<name>/time_s``: seconds spent inside :meth:`ExtraModel.timed` since the previous step (forwards of the
  teacher, training of the probe...).

**Loss terms** (:class:`LossTerm`). A method adds per-unit values to the objective without an ``if method`` in the
trainer: for every micro-batch the trainer calls each term of ``Components.loss_terms`` with a :class:`TermInputs`
(the policy's :class:`~mmgrpo.core.types.LogProbs` with gradient, the rollout, the rows and units, advantages, mask,
step) and gets back ``per_unit [n, k]`` (already times the term's coefficient) and metrics. The trainer reduces it
with the run's aggregation (same normaliser, same row weights as the policy loss) and adds it to the loss; its value
is logged as ``loss/<name>``. A term whose ``replaces_surrogate`` is True is the whole policy objective (NFT's
token-level loss): the configured surrogate is then not added (``policy_loss(..., surrogate=False)``), the
reference KL still is.

Letters: n rows of a micro-batch, k units (tokens / denoising steps).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

MIB = float(1 << 20)


class ExtraModel:
    """A frozen network a method uses besides the policy, with its memory and the time spent in it.

    ``module``: the network (frozen here: no gradient, eval mode); ``handle``: what the owner needs to call it
    (e.g. the VLM scorer around the module); ``frozen=False`` for a small module the method trains itself (POISE's
    probe: it has its own optimizer and is not one of the policy's trainable parameters).
    """

    def __init__(self, name: str, module: torch.nn.Module, handle: Any = None, frozen: bool = True):
        self.name = name
        self.module = module
        self.handle = handle if handle is not None else module
        if frozen:
            module.requires_grad_(False).eval()
        self.frozen = frozen
        self.seconds = 0.0  # time in timed() since the last metrics()

    def mib(self) -> float:
        """Memory of the module's parameters and buffers, MiB (each storage counted once)."""
        seen, total = set(), 0
        for t in [*self.module.parameters(), *self.module.buffers()]:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total / MIB

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Count the wall time of the block (after the device finished its queued work) as time in this model."""
        dev = next(itertools.chain(self.module.parameters(), self.module.buffers()), torch.empty(0)).device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
        sync(dev)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(dev)
            self.seconds += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        """``extra/<name>/mib`` and ``extra/<name>/time_s`` (seconds since the previous call, then reset)."""
        out = {f"extra/{self.name}/mib": self.mib(), f"extra/{self.name}/time_s": self.seconds}
        self.seconds = 0.0
        return out


@dataclass
class TermInputs:
    """What a loss term sees for one micro-batch of n rows and k units."""

    lp: Any  # LogProbs of the policy, with gradient: logp [n, k]
    logp_old: torch.Tensor  # [n, k]
    rollout: Any  # the whole rollout (extras indexed by row: take ``rows``)
    rows: torch.Tensor  # [n] row indices into the rollout
    units: torch.Tensor  # [k] unit indices (columns of the rollout's [N, K] tensors)
    adv: torch.Tensor  # [n] (or [n, k]) advantages of the rows
    mask: torch.Tensor  # [n, k] bool, the units the update trains
    step: int = 0


class LossTerm(Protocol):
    """``term(TermInputs) -> (per_unit [n, k], metrics)``; ``name`` (logged as ``loss/<name>``),
    ``replaces_surrogate`` (the term is the whole policy objective)."""

    name: str
    replaces_surrogate: bool

    def __call__(self, x: TermInputs) -> tuple[torch.Tensor, dict[str, float]]: ...


def term_metric(name: str) -> str:
    """The metric a loss term's aggregated value is logged under (summed over micro-batches like loss/policy)."""
    return f"loss/{name}"
