"""The rule a reward's output must follow to become a column: one number per row, finite, fp32.

Shared by the trainer (:mod:`mmgrpo.train.scoring` checks every local reward's output with :func:`to_column`) and the
reward server (:func:`mmgrpo.rewards.wire.rewards_to_list` applies the same function to a served reward's output
before answering), so a reward is refused for the same values, with the same words, wherever it runs.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np
import torch

from mmgrpo.core.errors import UserError, listed, quoted

FLOAT32_MAX = torch.finfo(torch.float32).max
"""the largest reward a column holds: the rewards are fp32"""


def to_column(name: str, value: Any, n: int, nan_ok: bool = False) -> torch.Tensor:
    """A reward's output as fp32 [N] with NaN for None (and for NaN itself only when ``nan_ok``). The values are read
    in fp64 first, so a finite value fp32 cannot hold (1e39) is named as too large, not as "non-finite"."""
    if isinstance(value, np.ndarray):  # native byte order: torch refuses a big-endian array ('>f4')
        native = value.astype(value.dtype.newbyteorder("="), copy=False) if value.dtype.kind in "biuf" else value
        value = torch.from_numpy(np.ascontiguousarray(native)) if value.dtype.kind in "biuf" else value.tolist()
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise UserError(f"reward {name!r} returned a {value.dtype} tensor; expected real numbers [N]")
        if sum(d > 1 for d in value.shape) > 1:  # e.g. [B, G] or [G, B]: which is which? ([1, N], [N, 1] are clear)
            raise UserError(f"reward {name!r} returned a tensor of shape {list(value.shape)} for {n} rows; expected "
                            f"[{n}] (or [{n}, 1], [1, {n}]): one number per row, in the rows' order")  # fmt: skip
        wide = value.detach().reshape(-1).cpu().double()
    elif isinstance(value, (list, tuple)):
        bad = [v for v in value if v is not None and (isinstance(v, bool) or not isinstance(v, (Real, torch.Tensor)))]
        if bad:
            raise UserError(f"reward {name!r} returned {quoted(bad[0], 60)} ({type(bad[0]).__name__}) among its "
                            "values; a reward gives a number per row, or None where it does not apply")  # fmt: skip
        wide = torch.tensor([math.nan if v is None else _one_number(name, i, v) for i, v in enumerate(value)],
                            dtype=torch.float64)  # fmt: skip
    else:
        raise UserError(f"reward {name!r} returned {type(value).__name__}; expected Tensor[N] or a list of N numbers")
    if wide.numel() != n:
        raise UserError(f"reward {name!r} returned {wide.numel()} values for {n} rows")
    _check_finite(name, value, wide, nan_ok)
    return wide.float()


def _one_number(name: str, row: int, v: Any) -> float:
    """Row ``row``'s value of a reward's list as a float: a tensor of more than one element, or an int beyond any
    float, is a UserError naming the row (they were a ValueError / OverflowError traceback)."""
    if isinstance(v, torch.Tensor) and v.numel() != 1:
        raise UserError(f"reward {name!r} returned a tensor of shape {list(v.shape)} as row {row}'s value; a reward "
                        "gives one number per row (a list of numbers, or one tensor [N])")  # fmt: skip
    try:
        return float(v)
    except OverflowError:
        raise UserError(f"reward {name!r} returned {quoted(v, 40)} for row {row}: too large for a float (rewards are "
                        f"fp32, at most {FLOAT32_MAX:.3g}); scale the reward") from None  # fmt: skip


def _check_finite(name: str, value: Any, wide: torch.Tensor, nan_ok: bool) -> None:
    """±inf is always an error; NaN too unless it means "does not apply" (None, or a reward that declares it); a
    finite value beyond fp32 (``wide``: the values in fp64) is named as too large."""
    big = wide.isfinite() & (wide.abs() > FLOAT32_MAX)
    if bool(big.any()):
        rows = big.nonzero().reshape(-1).tolist()
        shown = listed([f"row {r}: {wide[r].item():.3g}" for r in rows], 5)
        raise UserError(f"reward {name!r} returned values too large for fp32 ({shown}; {len(rows)} of "
                        f"{wide.numel()} rows): rewards are fp32, at most {FLOAT32_MAX:.3g} in size; scale the "
                        "reward down")  # fmt: skip
    if isinstance(value, (list, tuple)):
        given_nan = torch.tensor([v is not None and math.isnan(float(v)) for v in value], dtype=torch.bool)
    else:
        given_nan = wide.isnan()
    bad = wide.isinf() | (given_nan & (not nan_ok))
    if bool(bad.any()):
        rows = bad.nonzero().reshape(-1).tolist()
        shown = listed([f"row {r}: {wide[r].item()}" for r in rows], 5)
        raise UserError(
            f"reward {name!r} returned non-finite values ({shown}; {len(rows)} of {wide.numel()} rows). A non-finite "
            "reward would poison every later update: fix the reward, return None for rows it does not apply to, "
            "or set fn.nan_means_not_applicable = True if NaN means that"
        )
