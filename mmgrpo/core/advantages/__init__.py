"""Advantage estimators, reward shaping and multi-reward combination (phase 3 of the loop, docs/architecture.md).

Letters: B prompts, G rows per group, N = B*G rows, R reward columns. Rows of one group are one row of the
``[B, G]`` reward tensor.

Three open registries of small pure functions (built-ins, entry points of the groups ``mmgrpo.estimators``,
``mmgrpo.shaping``, ``mmgrpo.combine``, or a dotted path in YAML):

- ``ESTIMATORS``: ``fn(rewards [B, G], *, <options>) -> advantages [B, G]``. Its keyword parameters are its options
  (``advantage.options``, checked at config load by :func:`estimator_options`), except the inputs the trainer
  supplies (:data:`ESTIMATOR_INPUTS`: ``keys``). An estimator may also carry a per-row loss-weight function as
  ``fn.row_weights`` (MC-GRPO zeroes its pivot row); :func:`get_row_weights` returns it, or ones.
- ``SHAPERS``: elementwise ``fn(rewards [...], **options) -> [...]``, applied to raw rewards *before* any
  estimator (TempSamp-R1's soft shaping).
- ``COMBINERS``: turn R reward columns ``[R, B, G]`` into one advantage ``[B, G]`` (sum-then-normalise, or
  normalise-each-then-sum as in GDPO). A combiner may declare the inputs of :data:`COMBINER_INPUTS` (``kinds``: the
  reward stream of each column) and options of its own (``advantage.combine_options``, checked at config load by
  :func:`combine_options`).

Reward streams: every configured reward is an ``outcome`` reward (is the final answer right: accuracy, IoU, test
cases; the default) or a ``process`` reward (how the answer was reached: the quality of the reasoning, format,
intermediate steps), set per reward in YAML with ``kind`` (:data:`REWARD_KINDS`). The built-in combiners ignore the
kind (so a config that sets none computes what it always did); a combiner or a method's advantage hook that declares a
``kinds`` keyword receives one kind per reward column, in the order of ``rewards:`` (Posterior-GRPO's
:func:`posterior` gates the process rewards on the outcome).

Conventions shared by every built-in estimator:

- All maths is fp32: the input is cast to float32 (a copy when it is not fp32 already); inputs are never modified.
- NaN means "this reward does not apply to this row": NaN rows are left out of every statistic (group
  mean/std/median, batch std, BNPO moments, strata) and get advantage exactly 0.
- Zero-variance groups (all valid rewards equal, see :func:`zero_variance_groups`) get advantage exactly 0
  for grpo, dr_grpo, batch_std, mc_grpo and bnpo: mathematically r - mean = 0 there, but in fp32 the mean of
  equal values can differ from them by an ulp, and dividing that by ``std + eps`` would turn rounding noise
  into an advantage of order 1e-2. NGRPO is the exception by design (see :func:`ngrpo`).
- Statistics that span the batch (batch_std, bnpo, stratified) are over the tensor given; under data
  parallelism the caller gathers the rewards of all ranks first (docs/architecture.md, "The seeding contract").

Layout: :mod:`~mmgrpo.core.advantages.registry` (the registries, their decorators and getters, the options' checks),
:mod:`~mmgrpo.core.advantages.estimators` (the built-in estimators and the masked group statistics they share),
:mod:`~mmgrpo.core.advantages.shaping`, :mod:`~mmgrpo.core.advantages.combiners` (the combiners and :func:`combine`).
Import from this package: it re-exports every public name and the statistics a plug-in estimator may share
(``_as_groups``, ``_masked_mean``, ``_masked_std``, ``_finish``), and importing it registers the built-ins.
"""

from __future__ import annotations

from mmgrpo.core.advantages.combiners import (  # noqa: F401
    check_kinds,
    combine,
    combine_options,
    normalize_then_sum,
    posterior,
    row_weight_total,
    sum_then_normalize,
    summed,
)
from mmgrpo.core.advantages.estimators import (  # noqa: F401
    _as_groups,
    _finish,
    _masked_mean,
    _masked_std,
    batch_std,
    bnpo,
    dr_grpo,
    grpo,
    mapo,
    mc_grpo,
    mc_grpo_weights,
    ngrpo,
    pacs,
    stratified,
    zero_variance_groups,
)
from mmgrpo.core.advantages.registry import (  # noqa: F401
    COMBINER_INPUTS,
    COMBINERS,
    ESTIMATOR_INPUTS,
    ESTIMATORS,
    REWARD_KINDS,
    SHAPERS,
    Estimator,
    check_eps,
    estimator_options,
    finite,
    get_estimator,
    get_row_weights,
    get_shaping,
    has_row_weights,
    register_estimator,
    register_shaping,
    shaping_options,
)
from mmgrpo.core.advantages.shaping import (  # noqa: F401
    no_shaping,
    tempsamp_soft,
)
