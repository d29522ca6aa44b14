"""Paper methods as registered parts, switched on by the config's top-level ``methods:`` block.

A paper method is one module of ``mmgrpo.methods`` (or of a plug-in) that registers one :class:`Method`: its name,
its options schema and what it contributes to a run. The recipe that builds the policy knows nothing about it::

    methods:
      pearl: {cap: 0.5, checklist_weight: 0.1}   # a method is on when it is listed; its options are checked
      tempsamp: {position: last}                 # null (methods.tempsamp=null on the command line) turns it off

What a method may contribute (every part optional):

- ``rewards``: reward names its module registers in the REWARDS registry (``pearl_checklist``, ``acre``, ...); the
  config still lists the rewards it runs with their weights. A method whose only part is a reward
  (``reward_switched``) is also run by just listing that reward; ``methods: {acre: {}}`` then checks that it is
  listed and that the recipe fits;
- ``wrap_policy(policy, options) -> policy``: a :class:`PolicyWrapper` around the recipe's policy that changes what
  ``rollout`` produces (PEARL's checklist groups, TempSamp-R1's off-policy ground-truth rows);
- ``advantage_hooks(options) -> [hook]``: hooks run after the estimator (``Components.advantage_hooks``,
  docs/architecture.md "Hooks");
- ``reward_weights(options) -> weighter``: a stateful object that sets the reward weights of each step
  (``Components.reward_weighters``): ``weighter(weights [R], rewards [V, R, N], kinds, step) -> (weights [R],
  metrics)`` on all processes' rewards, with ``state_dict()`` / ``load_state_dict()`` saved in checkpoints (dynamic
  reward weighting); optionally ``current(weights [R]) -> weights [R]``, the weights its next call will use, without
  changing its state (DAPO's dynamic sampling and the re-roll test a group's spread under them before the
  advantage; a weighter without it: under the weights it is given);
- ``setup(policy, options, cfg) -> MethodRuntime``: the parts that need the built policy (after the wrappers):
  extra models loaded like it (a teacher, a probe: :class:`mmgrpo.core.extra.ExtraModel`, their memory and time
  logged as ``extra/<name>/*``), loss terms (:class:`mmgrpo.core.extra.LossTerm`), advantage hooks that use them,
  and state saved in checkpoints (objects with ``state_dict`` / ``load_state_dict``: a resumed run continues
  exactly);
- ``rewrite(options, cfg) -> Rewrite``: prompt rewriting before a re-roll (:mod:`mmgrpo.core.rewriting`): groups
  without learning signal are sampled again from a rewritten prompt (at most one enabled method may have one);
- ``check(options, cfg, key)``: load-time checks against the rest of the config (UserErrors naming ``key``);
- ``pipelines``: the recipes it applies to (empty: any); ``conflicts``: methods it cannot be combined with;
  ``data_keys``: what each example's meta must carry (documentation and ``mmgrpo list``), checked against a data
  file at load (:func:`check_example_keys`) as ``data_keys_needed`` says, with the keys that stand in for one
  (``data_key_stand_ins``) and without those the method supplies itself under its options (``supplied_keys``).

Validation (:func:`check_methods`) runs at config load, before any model is built; :func:`enabled_methods` gives the
training code each enabled method with its parsed options, in the order of the block.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmgrpo.core.errors import UserError, quoted
from mmgrpo.core.registry import Registry
from mmgrpo.core.schema import options_from


@dataclass
class NoOptions:
    """A method without options of its own (a reward-only method: its options are the reward's)."""


@dataclass(frozen=True)
class Method:
    """One paper method and the parts it contributes (see the module doc)."""

    name: str
    paper: str
    """one line: the paper, its authors and year, arXiv id (shown by ``mmgrpo list``)"""
    options: type = NoOptions
    """options dataclass: the schema of ``methods.<name>``"""
    pipelines: tuple[str, ...] = ()
    """recipes the method applies to; () = any"""
    rewards: tuple[str, ...] = ()
    """reward names the method's module registers"""
    reward_switched: bool = False
    """the method's part is its reward: listing one of ``rewards`` runs it (and ``methods:`` requires one listed)"""
    data_keys: tuple[str, ...] = ()
    """meta keys each training example must carry"""
    data_keys_needed: str | dict[str, str] = "some"
    """how a data file is checked for ``data_keys`` at load (:func:`check_example_keys`): ``"each"`` example must
    carry them (the method fails without), ``"some"`` example must (it skips examples without one, so a file with
    none would leave it without effect), or ``"none"`` (it has a fallback); a dict gives a key its own level
    (``{"options": "each"}``; the keys not in it: ``"some"``)"""
    data_key_stand_ins: dict[str, tuple[str, ...]] | None = None
    """keys of the examples that stand in for a data key: an example carrying one of them carries the key (the
    listener's ``candidates`` for ``options``)"""
    supplied_keys: Callable[[Any], tuple[str, ...]] | None = None
    """supplied_keys(options) -> the data keys the method supplies itself under these options, which the data then
    need not carry (AMPO's online ``teachers`` answer without a ``guidance`` pool)"""
    conflicts: tuple[str, ...] = ()
    """methods that cannot be enabled together with this one"""
    check: Callable[[Any, Any, str], None] | None = None
    """check(options, cfg, key) at config load; raises UserError naming ``key``"""
    wrap_policy: Callable[[Any, Any], Any] | None = None
    """wrap_policy(policy, options) -> policy"""
    advantage_hooks: Callable[[Any], list] | None = None
    """advantage_hooks(options) -> hooks applied after the estimator, in order"""
    reward_weights: Callable[[Any], Any] | None = None
    """reward_weights(options) -> a stateful weighter of the rewards (see the module doc)"""
    setup: Callable[[Any, Any, Any], MethodRuntime] | None = None
    """setup(policy, options, cfg) -> MethodRuntime: extra models, loss terms, hooks and state needing the policy"""
    rewrite: Callable[[Any, Any], Any] | None = None
    """rewrite(options, cfg) -> :class:`Rewrite`: re-roll groups without signal from rewritten prompts"""
    ragged: bool = False
    """its policy wrapper and advantage hooks work with ragged groups (a sampler varying the rollouts per prompt)"""
    local_forwards: str = ""
    """why the method runs forwards of the model that depend on this process's rows alone (e.g. only its failed
    groups), which under collective forwards (FSDP, DeepSpeed ZeRO-3 with several processes: every forward is a
    collective) would leave the processes waiting on each other; the trainer then refuses it, with this reason.
    Empty: its forwards are the same on every process (or it runs none)"""

    def parts(self) -> list[str]:
        """What the method contributes, in words (``mmgrpo list`` and the paper table)."""
        out = [f"reward {r}" for r in self.rewards]
        out += ["policy wrapper"] if self.wrap_policy else []
        out += ["advantage hooks"] if self.advantage_hooks else []
        out += ["reward weights"] if self.reward_weights else []
        out += ["runtime parts (extra models / loss terms)"] if self.setup else []
        out += ["prompt rewriting"] if self.rewrite else []
        return out


@dataclass
class MethodRuntime:
    """What a method's ``setup(policy, options, cfg)`` adds to a run once the policy is built."""

    extra_models: list[Any] = field(default_factory=list)
    """:class:`mmgrpo.core.extra.ExtraModel` s: logged as ``extra/<name>/mib`` and ``extra/<name>/time_s``"""
    loss_terms: list[Any] = field(default_factory=list)
    """:class:`mmgrpo.core.extra.LossTerm` s added to the policy loss of every micro-batch"""
    advantage_hooks: list[Any] = field(default_factory=list)
    """hooks run after the estimator (after the static ``advantage_hooks`` of every method)"""
    state: Any = None
    """an object with ``state_dict()`` / ``load_state_dict(d)`` saved in checkpoints under the method's name"""


METHODS: Registry[Method] = Registry("method", plugins="methods")


def register_method(method: Method) -> Method:
    """Register ``method`` under its name (its paper line is its description)."""
    METHODS.add(method.name, method, method.paper)
    return method


class PolicyWrapper:
    """A policy that changes what another policy's ``rollout`` returns and is that policy for everything else.

    Attribute reads and writes go to the wrapped policy (``inner``): the trainer's ``policy.model = prepared`` must
    reach the policy that runs the forwards, and evaluation, rewards that query the policy (ACRE) and checkpoints see
    the recipe's policy unchanged. Subclasses override ``rollout`` and keep their own state in ``__init__`` through
    ``object.__setattr__`` (see :meth:`_own`).
    """

    def __init__(self, inner: Any):
        self._own("inner", inner)

    def _own(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only called when the wrapper itself has no such attribute
        if name == "inner":  # not set yet (copy / pickle build the object without __init__): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def rollout(self, batch: Any, group_size: int, generator: Any = None) -> Any:
        return self.inner.rollout(batch, group_size, generator)


# keys that used to switch methods on inside a recipe's options -> how to say it now
MOVED_KEYS: dict[tuple[str, str], str] = {
    ("data", "methods"): "methods: {pearl: {cap: 0.5}} or methods: {tempsamp: {anchor_factor: 1.2}}",
    ("policy", "inject_ground_truth"): "methods: {tempsamp: {}} (TempSamp-R1 writes the ground-truth rows)",
    ("policy", "ground_truth_key"): "methods: {tempsamp: {ground_truth_key: answer}}",
}


def check_moved_keys(cfg: Any, where: str) -> None:
    """Old method switches inside ``data.options`` / ``policy.options`` fail with where they went."""
    for (section, key), now in MOVED_KEYS.items():
        if key in (getattr(cfg, section).options or {}):
            raise UserError(
                f"{section}.options.{key} in {where}: paper methods are switched on by the top-level methods: block "
                f"now, not by a recipe's or policy's options; remove {section}.options.{key} and write {now}"
            )


def enabled_methods(cfg: Any, where: str = "the config") -> list[tuple[Method, Any]]:
    """(method, parsed options) of every method listed under ``cfg.methods`` (null entries are off), in order."""
    out = []
    for name, raw in (cfg.methods or {}).items():
        if raw is None:
            continue
        try:
            method = METHODS.get(name)  # a registered name, an entry point, or a dotted path to a Method
        except UserError as e:
            raise UserError(f"methods.{name} in {where}: {e}") from e
        if not isinstance(method, Method):
            raise UserError(f"methods.{name} in {where}: {name!r} is a {type(method).__name__}, not a Method")
        if "enabled" in raw and not _has_field(method.options, "enabled"):
            raise UserError(
                f"methods.{name}.enabled in {where}: a method is on when it is listed under methods:, so there is no "
                f"'enabled'; remove it (to turn the method off, remove methods.{name} or set it to null)"
            )
        out.append((method, options_from(method.options, raw, where, f"methods.{name}")))
    return out


def check_example_keys(cfg: Any, examples: list[tuple[str, dict]]) -> None:
    """The examples of a data file (``(where, {**prompt, **meta})``, where naming its file and line) carry the
    ``data_keys`` of every method enabled under ``methods:`` as its ``data_keys_needed`` says -- a UserError at load
    naming the first example without one (``"each"``: PEARL's missing checklist used to stop the run in its first
    step) or the file (``"some"``: Scaf-GRPO without any hints trained without effect). A key renamed by an option
    ``<key>_key`` (of the method, or of its reward in ``rewards:``) is looked up under its new name; an example
    carrying one of the key's ``data_key_stand_ins`` carries it; the keys the method supplies itself
    (``supplied_keys(options)``) are not looked for. A method whose part is its reward (``reward_switched``) runs
    when its reward is listed under ``rewards:`` alone, so it is checked then too, with its default options."""
    listed = [(m, o, f"methods.{m.name}", f"remove methods.{m.name}") for m, o in enabled_methods(cfg)]
    for m, o in reward_switched_methods(cfg):
        used = next(r.name for r in cfg.rewards if r.name in m.rewards)
        listed.append((m, o, f"the {used} reward", f"remove {used} from rewards:"))
    for method, opts, who, off in listed:
        if not examples:
            continue
        specs = [r.options for r in cfg.rewards if r.name in method.rewards]
        supplied = set(method.supplied_keys(opts)) if method.supplied_keys is not None else set()
        levels = method.data_keys_needed
        for key in method.data_keys:
            needed = levels.get(key, "some") if isinstance(levels, dict) else levels
            if needed == "none" or key in supplied:
                continue
            names = [_key_name(k, specs, opts) for k in (key, *(method.data_key_stand_ins or {}).get(key, ()))]
            lacking = [where for where, ex in examples if all(ex.get(n) in (None, "", [], {}) for n in names)]
            said, paper = repr(names[0]) + "".join(f" (or {n!r})" for n in names[1:]), method.paper.split(":")[0]
            add = " or ".join(repr(n) for n in names)
            if needed == "each" and lacking:
                more = f" (and {len(lacking) - 1} other example(s))" if len(lacking) > 1 else ""
                raise UserError(
                    f"{lacking[0]}{more}: {who} reads each example's {said}, which is missing or empty here; add "
                    f"{add} to every example ({paper}) or {off}"
                )
            if len(lacking) == len(examples):
                file = re.sub(r" (line|row) \d+$", "", examples[0][0])
                raise UserError(
                    f"{file}: {who} reads an example's {said}, and none of the {len(examples)} example(s) has one, "
                    f"so it would do nothing; add {add} to the examples ({paper}) or {off}"
                )


def reward_switched_methods(cfg: Any) -> list[tuple[Method, Any]]:
    """(method, default options) of each ``reward_switched`` method not listed under ``methods:`` one of whose rewards
    is listed under ``rewards:`` (listing the reward runs the method). The built-in methods, and those of plug-ins
    already imported (a plug-in's reward module registers its method as it registers the reward)."""
    listed = {r.name for r in cfg.rewards}
    enabled = {m.name for m, _ in enabled_methods(cfg)}
    out = []
    for name, method in sorted(METHODS.registered().items()):
        if not (isinstance(method, Method) and method.reward_switched) or method.name in enabled:
            continue
        if listed.intersection(method.rewards):
            out.append((method, options_from(method.options, {}, "the config", f"methods.{name}")))
    return out


def _key_name(key: str, reward_options: list[dict], opts: Any) -> str:
    """The name an example carries ``key`` under: renamed by an option ``<key>_key`` of the method's reward in
    ``rewards:`` or of the method itself, else ``key``."""
    option = f"{key}_key"
    return next((o[option] for o in reward_options if isinstance(o.get(option), str)), getattr(opts, option, key))


def _has_field(cls: type, name: str) -> bool:
    return name in getattr(cls, "__dataclass_fields__", {})


def check_methods(cfg: Any, where: str = "the config") -> list[tuple[Method, Any]]:
    """Validate the ``methods:`` block against the registry and the rest of ``cfg``; returns the enabled methods."""
    methods = enabled_methods(cfg, where)
    names = [m.name for m, _ in methods]
    rewards = [r.name for r in cfg.rewards]
    rewriting = [m.name for m, _ in methods if m.rewrite is not None]
    if len(rewriting) > 1:
        raise UserError(
            f"methods.{rewriting[0]} and methods.{rewriting[1]} in {where} both rewrite prompts before a re-roll; "
            "enable one of them (remove the other from methods:)"
        )
    for method, opts in methods:
        key = f"methods.{method.name} in {where}"
        if method.pipelines and cfg.pipeline not in method.pipelines:
            raise UserError(
                f"{key}: {method.name} ({method.paper}) applies to the {', '.join(method.pipelines)} recipe(s), not "
                f"pipeline {cfg.pipeline!r}; remove methods.{method.name} or use pipeline: {method.pipelines[0]}"
            )
        clash = [c for c in method.conflicts if c in names]
        if clash:
            raise UserError(
                f"{key}: {method.name} and {clash[0]} cannot be combined yet; enable one of them (remove the other "
                "from methods:)"
            )
        if method.reward_switched and not any(r in rewards for r in method.rewards):
            raise UserError(
                f"{key}: {method.name}'s part is its reward, but rewards: lists none of {list(method.rewards)}; add "
                f"e.g. {{name: {method.rewards[0]}}} to rewards:"
            )
        _check_finite(method.name, opts, where)
        if method.check is not None:
            method.check(opts, cfg, key)
    return methods


def _check_finite(name: str, opts: Any, where: str) -> None:
    """No method option is nan or inf (a float, or an entry of a list of floats): the methods' own range checks
    compare with < and >, which nan passes (a threshold of nan re-rolled no group, a cap of nan never capped), and
    no method option means "unbounded" by inf."""
    if not dataclasses.is_dataclass(opts):
        return
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise UserError(f"methods.{name}.{f.name}={quoted(value, 60)} in {where}: must be a finite number "
                            f"(see the option's doc in `mmgrpo list methods`)")  # fmt: skip


@dataclass
class MethodParts:
    """What the enabled methods add to a recipe's components, collected in the order of the ``methods:`` block."""

    wrappers: list[Callable[[Any], Any]] = field(default_factory=list)
    advantage_hooks: list[Any] = field(default_factory=list)
    reward_weighters: list[Any] = field(default_factory=list)
    rewrite: Any = None
    """the one enabled method's :class:`Rewrite` (prompt rewriting before a re-roll), or None"""

    def wrap(self, policy: Any) -> Any:
        for wrap in self.wrappers:
            policy = wrap(policy)
        return policy


def method_runtimes(cfg: Any, policy: Any, where: str = "the config") -> dict[str, MethodRuntime]:
    """name -> MethodRuntime of every enabled method with a ``setup``, in the order of the ``methods:`` block."""
    return {m.name: m.setup(policy, opts, cfg) for m, opts in enabled_methods(cfg, where) if m.setup is not None}


def method_parts(cfg: Any, where: str = "the config") -> MethodParts:
    """The policy wrappers, advantage hooks and reward weighters of every enabled method of ``cfg`` (checked
    first)."""
    parts = MethodParts()
    for method, opts in check_methods(cfg, where):
        if method.wrap_policy is not None:
            parts.wrappers.append(lambda policy, m=method, o=opts: m.wrap_policy(policy, o))
        if method.advantage_hooks is not None:
            parts.advantage_hooks += list(method.advantage_hooks(opts))
        if method.reward_weights is not None:
            parts.reward_weighters.append(method.reward_weights(opts))
        if method.rewrite is not None:  # check_methods allows one
            parts.rewrite = method.rewrite(opts, cfg)
    return parts


@dataclass
class Rewrite:
    """A method's prompt rewriting (:mod:`mmgrpo.core.rewriting`): its rewriter, its :class:`RerollOptions`."""

    method: str
    rewriter: Callable[[Any], list]
    options: Any
