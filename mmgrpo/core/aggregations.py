"""Aggregations of the policy loss: how per-unit values ``[n, k]`` become one scalar, and what the normaliser counts.

An aggregation is an open registry (``AGGREGATIONS``: built-ins, entry points of the group ``mmgrpo.aggregations``,
or a dotted path in YAML ``loss.aggregation.name``) of objects following :class:`Aggregation`:

- ``token_mean`` (:class:`TokenMean`, DAPO): the mean over every masked unit of the minibatch;
- ``seq_mean`` (:class:`SeqMean`, the original GRPO): the mean over each row's units, then over rows;
- ``constant`` (:class:`ConstantNorm`, Dr. GRPO): the sum over units divided by rows x a fixed constant.

Each one says what its normaliser counts (:meth:`Aggregation.local_count`), so the trainer can sum the counts over
micro-batches and ranks and pass the whole minibatch's ``denom`` to every call: the micro-batch gradients then add
up to the full-batch gradient exactly. ``unit_additive`` ones (token_mean, constant) are sums over units given that
``denom``, so a row's units may also be split across micro-batches (:func:`unit_additive`).

The surrogates and the reference KL that feed them live in :mod:`mmgrpo.core.losses`, which re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import Registry
from mmgrpo.core.schema import check_options


class Aggregation(Protocol):
    """Reduces per-unit values ``[n, k]`` to a scalar and owns its normaliser (units or rows or ...)."""

    def local_count(self, mask: torch.Tensor) -> torch.Tensor:
        """This minibatch slice's share of the normaliser, from its mask ``[n, k]``: a scalar tensor. The trainer
        sums it over micro-batches and ranks into the ``denom`` it then passes to every call."""
        ...

    def __call__(
        self,
        per_unit: torch.Tensor,
        mask: torch.Tensor,
        row_weight: torch.Tensor | None = None,
        denom: float | None = None,
    ) -> torch.Tensor: ...


AGGREGATIONS: Registry[Callable[..., Aggregation]] = Registry("aggregation", plugins="aggregations")


def unit_additive(aggregation: Aggregation) -> bool:
    """Whether ``aggregation`` with a global ``denom`` is a sum over units (token_mean, constant), so the aggregates of
    disjoint parts of a row's units add up to the row's: a class attribute ``unit_additive = True``."""
    return bool(getattr(aggregation, "unit_additive", False))


def make_aggregation(name: str, options: dict[str, Any] | None = None, where: str = "aggregate") -> Aggregation:
    """The aggregation ``name`` built with its ``options`` (checked: did-you-mean UserError naming
    ``loss.aggregation.options.x``; the aggregation validates the values itself)."""
    cls = AGGREGATIONS.get(name)
    what = f"aggregation {name!r}"
    return cls(**check_options(cls, options or {}, what=what, prefix="loss.aggregation.options", where=where))


# aggregations: objects with local_count(mask [n, k]) -> scalar and __call__(per_unit [n, k], mask [n, k],
# row_weight [n] | None, denom) -> scalar
#
# ``denom`` lets the trainer pass the normaliser of the whole minibatch (the sum of ``local_count`` over
# micro-batches and ranks), so that summing the micro-batch gradients gives exactly the full-batch gradient. What it
# counts is the aggregation's business: units for token_mean, rows for seq_mean and constant.


def _weighted_masked(per_unit: torch.Tensor, mask: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
    """w_i * x_i,t on masked units, 0 elsewhere (``where``, not ``*``: a NaN/inf under the mask stays out). [n, k]"""
    x = torch.where(mask.bool(), per_unit.float(), torch.zeros((), dtype=torch.float32, device=per_unit.device))
    if row_weight is not None:
        if row_weight.shape != (per_unit.shape[0],):
            raise ValueError(f"row_weight of shape {tuple(row_weight.shape)}; expected [n] = [{per_unit.shape[0]}]")
        x = x * row_weight.float()[:, None]
    return x


def _check_denom(denom: float | None) -> None:
    if denom is not None and not denom > 0:
        raise ValueError(f"aggregation denom={denom} must be > 0 (count of units or rows of the whole minibatch)")


def _row_count(mask: torch.Tensor) -> torch.Tensor:
    """Rows of a minibatch slice as a float scalar: the normaliser share of the per-row aggregations."""
    return torch.tensor(float(mask.shape[0]))


@AGGREGATIONS.register("token_mean")
@dataclass(frozen=True)
class TokenMean:
    """Mean over all masked units of the minibatch (DAPO token-level loss, Yu et al. 2025).

    sum_i,t w_i x_i,t m_i,t / sum m, with ``denom`` (the global unit count) replacing sum m. [n, k] -> scalar.
    """

    unit_additive: ClassVar[bool] = True  # with denom: a sum over units

    def local_count(self, mask: torch.Tensor) -> torch.Tensor:
        """Masked units of the slice (mask [n, k] -> scalar)."""
        return mask.sum()

    def __call__(self, per_unit, mask, row_weight=None, denom=None) -> torch.Tensor:
        _check_denom(denom)
        total = _weighted_masked(per_unit, mask, row_weight).sum()
        if denom is not None:
            return total / denom
        count = mask.bool().float().sum()
        return torch.where(count > 0, total / count.clamp_min(1e-12), total)  # no unit: 0, not NaN


@AGGREGATIONS.register("seq_mean")
@dataclass(frozen=True)
class SeqMean:
    """Mean over each row's masked units, then over rows (GRPO, Shao et al. 2024: 1/G sum_i 1/|o_i| sum_t).

    sum_i w_i (sum_t x_i,t m_i,t / sum_t m_i,t) / n, with ``denom`` (the global row count) replacing n.
    Rows without a masked unit contribute 0 but still count in n. [n, k] -> scalar.
    """

    def local_count(self, mask: torch.Tensor) -> torch.Tensor:
        """Rows of the slice (mask [n, k] -> scalar), masked units or not."""
        return _row_count(mask)

    def __call__(self, per_unit, mask, row_weight=None, denom=None) -> torch.Tensor:
        _check_denom(denom)
        row_sum = _weighted_masked(per_unit, mask, row_weight).sum(-1)  # [n]
        row_count = mask.bool().float().sum(-1)  # [n]
        row_mean = torch.where(row_count > 0, row_sum / row_count.clamp_min(1e-12), row_sum)  # [n]
        return row_mean.sum() / (denom if denom is not None else max(per_unit.shape[0], 1))


@AGGREGATIONS.register("constant")
@dataclass(frozen=True)
class ConstantNorm:
    """Sum over masked units divided by a fixed normaliser (Dr. GRPO, Liu et al. 2025: no length bias).

    sum_i,t w_i x_i,t m_i,t / (n * constant); ``constant`` is the max completion length (tokens) or the number
    of trained steps (SDE); ``denom`` (the global row count) replaces n. [n, k] -> scalar.
    """

    unit_additive: ClassVar[bool] = True  # with denom: a sum over units
    constant: float | None = None
    """the fixed normaliser per row: max completion length in tokens, or the number of trained denoising steps"""

    def __post_init__(self) -> None:
        if self.constant is None or not (math.isfinite(self.constant) and self.constant > 0):  # inf: loss 0
            raise UserError(
                f"aggregation 'constant' needs loss.aggregation.options.constant > 0 and finite (got "
                f"{self.constant}); set it "
                "to the max completion length in tokens, or the number of trained denoising steps, e.g. "
                "loss.aggregation: {name: constant, options: {constant: 512}}"
            )

    def local_count(self, mask: torch.Tensor) -> torch.Tensor:
        """Rows of the slice (mask [n, k] -> scalar): the constant is per row."""
        return _row_count(mask)

    def __call__(self, per_unit, mask, row_weight=None, denom=None) -> torch.Tensor:
        _check_denom(denom)
        rows = denom if denom is not None else max(per_unit.shape[0], 1)
        return _weighted_masked(per_unit, mask, row_weight).sum() / (rows * self.constant)


def aggregate(
    name: str,
    per_unit: torch.Tensor,
    mask: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    denom: float | None = None,
    **options: Any,
) -> torch.Tensor:
    """Reduce per-unit values [n, k] over ``mask`` [n, k] with row weights [n] to a scalar, by aggregation ``name``
    built with ``options`` (e.g. ``constant=512``)."""
    if per_unit.shape != mask.shape:
        raise ValueError(f"per-unit values {tuple(per_unit.shape)} and mask {tuple(mask.shape)} differ in shape")
    return make_aggregation(name, options)(per_unit, mask, row_weight, denom)
