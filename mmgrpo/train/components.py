"""What a recipe (pipeline) hands the trainer, and the registries that name recipes and policies.

A pipeline turns a :class:`~mmgrpo.train.config.Config` into :class:`Components`: the policy, a
deterministic prompt source, and optionally a held-out evaluation. Pipelines register themselves::

    PIPELINES.add("bandit", Pipeline(build=build_bandit, policy_options=BanditPolicyOptions, ...))

:func:`build_components` then adds the parts of the paper methods enabled under the config's ``methods:`` block
(:mod:`mmgrpo.methods.registry`): their policy wrappers around the recipe's policy, their advantage hooks, and the
parts their ``setup`` builds around the policy (extra models, loss terms, checkpointed state). A recipe
never sees the methods, and a method never edits the recipe's or the policy's options.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mmgrpo.core.registry import Registry
from mmgrpo.core.schema import options_from
from mmgrpo.core.types import Policy, PromptBatch
from mmgrpo.methods.registry import method_parts, method_runtimes
from mmgrpo.policies.vlm_inputs import question_text


class PromptSource(Protocol):
    """A deterministic, indexable prompt stream: ``get(i)`` is the same prompt whatever the layout."""

    def get(self, indices: list[int]) -> PromptBatch:
        """Prompts at global stream positions ``indices`` (seeds are filled in by the trainer)."""
        ...


@dataclass
class EvalResult:
    """Held-out evaluation: scalar metrics (logged under ``eval/``) and optional images for a grid."""

    metrics: dict[str, float]
    images: torch.Tensor | None = None  # [n, 3, H, W] or [n, F, 3, H, W] in [0, 1]
    captions: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    """one JSON-able dict per held-out example (:func:`completion_records`: prompt, completion, scores): the trainer
    writes them to ``samples/completions_step_XXXXXX.jsonl`` and logs them as a table to the trackers"""


def completion_records(prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[dict[str, Any]]:
    """The records of an evaluation's completions, one per example: ``{"prompt": text, "completion": text, column:
    value, ...}`` in the order given (a ``None`` value leaves its key out of that record).

    ``prompts`` are the recipe's prompts (a str, or a dict with ``question``/``text`` and optional ``options``,
    written as the model read them: "question A) x B) y"); ``columns`` are per-example lists (the ground truth, the
    score...). Tensors, numpy values and tuples become plain JSON values. Every VLM recipe's evaluation returns
    these as :attr:`EvalResult.records`, so each writes the same ``samples/completions_step_XXXXXX.jsonl``.
    """
    n = len(completions)
    wrong = {k: len(v) for k, v in {"prompts": prompts, **columns}.items() if len(v) != n}
    if wrong:
        raise ValueError(f"completion_records: {n} completions but {wrong} values")
    return [
        {
            "prompt": _prompt_text(prompts[i]),
            "completion": str(completions[i]),
            **{k: _plain(v[i]) for k, v in columns.items() if v[i] is not None},
        }
        for i in range(n)
    ]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, dict) and isinstance(prompt.get("question") or prompt.get("text"), str):
        return question_text(prompt)
    return prompt if isinstance(prompt, str) else str(prompt)


def _plain(value: Any) -> Any:
    """A JSON value: tensors / numpy arrays and scalars -> python numbers or lists, tuples -> lists."""
    if hasattr(value, "tolist") and callable(value.tolist):  # torch.Tensor, np.ndarray, np.generic
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


class AdvantageHook(Protocol):
    """``hook(adv [B, G], rollout, cols [V, R, N], reward_names) -> (adv [B, G], metrics)`` on this rank's groups.

    Runs after the estimator; ``rollout.loss_weight`` may also be set here (per-stream weights). A hook that
    declares a ``kinds`` keyword gets the reward streams [R] (outcome / process), one declaring ``weights`` this
    step's reward weights [R] (after any reward weighter)."""

    def __call__(
        self, adv: torch.Tensor, rollout: Any, cols: torch.Tensor, reward_names: list[str]
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class Components:
    policy: Policy
    prompts: PromptSource
    evaluate: Callable[[Policy, int], EvalResult] | None = None
    sample_images: Callable[[Any], torch.Tensor | None] | None = None  # rollout.samples -> images for grids
    advantage_hooks: list[AdvantageHook] = field(default_factory=list)
    """hooks applied, in order, to this rank's advantages after normalisation: the recipe's, then those of the
    methods under ``methods:`` (PEARL gate, TempSamp anchor), in the block's order"""
    reward_weighters: list[Any] = field(default_factory=list)
    """stateful objects setting each step's reward weights from all ranks' rewards, in order:
    ``w(weights [R], rewards [V, R, N], kinds, step) -> (weights [R], metrics)`` with ``state_dict`` /
    ``load_state_dict`` (checkpointed: dynamic reward weighting)"""
    extra_models: list[Any] = field(default_factory=list)
    """the methods' extra models (:class:`mmgrpo.core.extra.ExtraModel`): memory and time logged every step"""
    loss_terms: list[Any] = field(default_factory=list)
    """the methods' loss terms (:class:`mmgrpo.core.extra.LossTerm`), added to every micro-batch's loss"""
    method_state: dict[str, Any] = field(default_factory=dict)
    """method name -> its stateful part (``state_dict`` / ``load_state_dict``), saved in checkpoints"""
    rewrite: Any = None
    """prompt rewriting before a re-roll (:class:`mmgrpo.methods.registry.Rewrite`, from the ``methods:`` block):
    ``mmgrpo.train.reroll`` samples groups without learning signal again from rewritten prompts; None: off"""
    run_dir: Path | None = None
    """the run directory the trainer writes (set by the trainer once the recipe is built; None outside a run): what
    a recipe reads back of the run, e.g. the step-0 evaluation a resumed VLM run's gains compare against"""

    @property
    def prompt_count(self) -> int | None:
        """P, the prompts of one pass over ``prompts`` (``len``); None for a source without a length (an endless
        stream). The sampler's pool, the too-few-prompts warning and the checkpoint's record of the prompts all read
        it here, so they agree on what a source's length is (``len`` is looked up on the type, as ``len()`` does)."""
        return len(self.prompts) if hasattr(type(self.prompts), "__len__") else None


@dataclass
class Pipeline:
    build: Callable[..., Components]
    """build(cfg, accelerator) -> Components"""
    policy_options: type | None = None
    data_options: type | None = None
    description: str = ""
    group_keys: bool = False
    """its policy's rollouts carry each row's stratum (``Rollout.group_keys``) without ``methods: {strata: ...}``:
    the ``stratified`` estimator's ``keys`` (the bandit's prompts)"""

    def check(self, cfg: Any, where: str) -> None:
        """Validate ``policy.options`` / ``data.options`` against this pipeline's schemas."""
        if self.policy_options is not None:
            options_from(self.policy_options, cfg.policy.options, where, "policy.options")
        if self.data_options is not None:
            options_from(self.data_options, cfg.data.options, where, "data.options")


PIPELINES: Registry[Pipeline] = Registry("pipeline", plugins="pipelines")


def build_components(cfg: Any, accelerator: Any = None) -> Components:
    """The recipe's components with the enabled methods' parts added: each method's policy wrapper around the policy
    (in the order of ``cfg.methods``) and its advantage hooks after the recipe's own."""
    pipeline = PIPELINES.get(cfg.pipeline)
    comp = pipeline.build(cfg, accelerator)
    n, per_step = comp.prompt_count, cfg.trainer.prompts_per_step
    if n is not None and n < per_step:  # legitimate for a smoke test, a surprise otherwise: say it once
        warnings.warn(
            f"the training data holds {n} prompt(s), fewer than trainer.prompts_per_step={per_step}: every step "
            f"repeats prompts (the same one in several groups); add data or lower trainer.prompts_per_step to {n}",
            stacklevel=2,
        )
    if pipeline.policy_options is not None:  # said when training starts, not at every load of the config
        options = options_from(pipeline.policy_options, cfg.policy.options, "the config", "policy.options")
        for text in getattr(options, "training_warnings", list)():  # e.g. a MixGRPO window that never slides
            warnings.warn(text, stacklevel=2)
        lora = getattr(options, "finetune", "lora") == "lora" and getattr(options, "lora_rank", 0) > 0
        if getattr(options, "init_lora", "") and lora and cfg.trainer.export_checkpoints:
            warnings.warn("trainer.export_checkpoints with policy.options.init_lora: the trained adapter applies on "
                          "top of the merged start LoRA, so each checkpoint's export is a full model folder, written "
                          "from a merged copy of the model (memory for a second copy while it is written); set "
                          "trainer.export_checkpoints=false and run mmgrpo export on the checkpoint you keep to "
                          "avoid it", stacklevel=2)  # fmt: skip
    parts = method_parts(cfg)
    comp.policy = parts.wrap(comp.policy)
    comp.advantage_hooks = [*comp.advantage_hooks, *parts.advantage_hooks]
    comp.reward_weighters = [*comp.reward_weighters, *parts.reward_weighters]
    for name, rt in method_runtimes(cfg, comp.policy).items():  # parts that need the built (wrapped) policy
        comp.extra_models += rt.extra_models
        comp.loss_terms += rt.loss_terms
        comp.advantage_hooks += rt.advantage_hooks
        if rt.state is not None:
            comp.method_state[name] = rt.state
    comp.rewrite = parts.rewrite
    return comp
