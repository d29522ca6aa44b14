"""The top-level ``methods:`` block: checked at config load (before any model loads), each method's parts added to
the recipe's components, a method from outside the library by dotted path, the old switches pointing to the new."""

import re
import textwrap
from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.pearl import PearlPolicy
from mmgrpo.methods.registry import METHODS, Method, PolicyWrapper, method_parts
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
NO_MODEL = "policy.options.path=/nonexistent/vlm"  # nothing may try to load it: the errors come first


def test_every_paper_module_registers_its_method():
    assert {"pearl", "tempsamp", "acre", "listener", "medloc", "mmupt"} <= set(METHODS.names())
    assert {"kdrl", "nft", "poise", "srpo", "ampo"} <= set(METHODS.names())
    assert "runtime parts (extra models / loss terms)" in METHODS.get("kdrl").parts()
    pearl = METHODS.get("pearl")
    assert pearl.parts() == ["reward pearl_checklist", "policy wrapper", "advantage hooks"]
    assert METHODS.get("acre").parts() == ["reward acre"] and METHODS.get("acre").reward_switched
    assert "2511.18437" in METHODS.describe("pearl")


def test_an_unknown_method_fails_at_load_with_the_known_ones():
    with pytest.raises(UserError) as e:
        load_config(CONFIGS / "vlm_pearl.yaml", [NO_MODEL, "methods.perl={}"])
    msg = str(e.value)
    assert "methods.perl in command-line override 'methods.perl={}'" in msg and "did you mean 'pearl'" in msg
    assert all(name in msg for name in ("acre", "listener", "medloc", "mmupt", "tempsamp"))


def test_an_unknown_option_fails_at_load_naming_the_key_and_where_it_came_from():
    with pytest.raises(UserError, match=r"unknown key 'methods.pearl.xyz' in command-line override 'methods.pearl.x"):
        load_config(CONFIGS / "vlm_pearl.yaml", [NO_MODEL, "methods.pearl.xyz=1"])
    with pytest.raises(UserError, match="methods.pearl.cap in .*: expected float"):
        load_config(CONFIGS / "vlm_pearl.yaml", [NO_MODEL, "methods.pearl.cap=high"])
    with pytest.raises(UserError, match="no 'enabled'"):  # the old switch inside the block
        load_config(CONFIGS / "vlm_pearl.yaml", [NO_MODEL, "methods.pearl.enabled=true"])
    with pytest.raises(UserError, match="methods.pearl in command-line override .*: expected dict"):
        load_config(CONFIGS / "vlm_pearl.yaml", [NO_MODEL, "methods.pearl=true"])


NONFINITE = [  # found by fuzzing every methods: option of the shipped configs/vlm_*.yaml: nan / inf passed the
    # methods' own < / > range checks and trained on a threshold that never (or always) re-rolled, a cap that never
    # capped, ...
    ("vlm_cog_drift", "methods.cog_drift.threshold=nan"),
    ("vlm_hill", "methods.hill.threshold=inf"),
    ("vlm_hill", "methods.hill.hinter_temperature=nan"),
    ("vlm_scaf_grpo", "methods.scaf_grpo.threshold=-inf"),
    ("vlm_kdrl", "methods.kdrl.coef=inf"),
    ("vlm_kdrl", "methods.kdrl.coef_final=inf"),
    ("vlm_kdrl", "methods.kdrl.correct_at=nan"),
    ("vlm_dagrpo", "methods.dagrpo.min_distinct=inf"),
    ("vlm_microcoder", "methods.microcoder.min_clip_high=nan"),
    ("vlm_pearl", "methods.pearl.cap=nan"),
    ("vlm_pearl", "methods.pearl.checklist_weight=inf"),
    ("vlm_srpo", "methods.srpo.correct_at=inf"),
    ("vlm_tempsamp", "methods.tempsamp.anchor_factor=nan"),
]


@pytest.mark.parametrize("config, override", NONFINITE, ids=[o for _, o in NONFINITE])
def test_a_non_finite_method_option_fails_at_load_naming_the_key(config, override):
    key, _, value = override.partition("=")
    where = re.escape(f"command-line override '{override}'")  # the value came from it, not from the file
    with pytest.raises(UserError, match=rf"^{key}={value} in {where}: must be a finite number"):
        load_config(CONFIGS / f"{config}.yaml", [NO_MODEL, override])


@pytest.mark.parametrize(
    "config, override, match",
    [  # refused only in the first step's rollout (naming no key, the run directory left), or accepted
        ("vlm_dagrpo", "methods.dagrpo.position=-1", r"methods.dagrpo in .*: position=-1 is not a row of a group of"),
        ("vlm_dagrpo", "methods.dagrpo.position=first_row", r"methods.dagrpo in .*: position='first_row' is not"),
        ("vlm_microcoder", "methods.microcoder.min_clip_high=-1", r"methods.microcoder in .*: min_clip_high=-1.0"),
        ("vlm_hill", "methods.hill.mix_rows=0", r"methods.hill in .*: mix_rows=0 must be >= 1"),
        ("vlm_cog_drift", "methods.cog_drift.mix_rows=-1", r"methods.cog_drift in .*: mix_rows=-1 must be >= 1"),
    ],
)
def test_method_options_out_of_range_fail_at_load(config, override, match):
    with pytest.raises(UserError, match=match):
        load_config(CONFIGS / f"{config}.yaml", [NO_MODEL, override])


def test_a_method_for_another_recipe_and_bad_combinations_fail_at_load():
    with pytest.raises(UserError, match="applies to the vlm_reasoning recipe.*not pipeline 'vlm_grounding'"):
        load_config(CONFIGS / "shapes_grounding_medloc.yaml", [NO_MODEL, "methods.pearl={}"])
    with pytest.raises(UserError, match="not pipeline 'bandit'"):
        load_config(CONFIGS / "bandit.yaml", ["methods.mmupt={}"])
    with pytest.raises(UserError, match="rewards: lists none of \\['majority_vote'\\]"):
        load_config(CONFIGS / "vlm_reasoning_tiny.yaml", [NO_MODEL, "methods.mmupt={}"])
    with pytest.raises(UserError, match="position=5 is not a row of a group of 4"):
        load_config(CONFIGS / "vlm_tempsamp.yaml", [NO_MODEL, "methods.tempsamp.position=5"])
    with pytest.raises(UserError, match="pearl and tempsamp cannot be combined"):
        load_config(CONFIGS / "vlm_pearl.yaml", [NO_MODEL, "methods.tempsamp={}"])


def test_the_old_recipe_and_policy_switches_say_where_methods_went():
    data = read_yaml(CONFIGS / "vlm_reasoning_tiny.yaml")
    data["data"]["options"]["methods"] = {"pearl": {"enabled": True}}
    with pytest.raises(UserError, match=r"data.options.methods in the config: .*top-level methods: block"):
        load_config(None, base=data)
    with pytest.raises(UserError, match=r"policy.options.ground_truth_key .*methods: \{tempsamp: \{ground_truth_key"):
        load_config(CONFIGS / "vlm_reasoning_tiny.yaml", ["policy.options.ground_truth_key=label"])


def test_null_turns_a_method_off_and_listed_methods_give_their_parts_in_order():
    cfg = load_config(CONFIGS / "vlm_pearl.yaml", [NO_MODEL, "methods.pearl=null"])
    parts = method_parts(cfg)
    assert parts.wrappers == [] and parts.advantage_hooks == []
    cfg = load_config(CONFIGS / "vlm_pearl.yaml", [NO_MODEL, "methods.pearl.checklist_weight=0.25"])
    parts = method_parts(cfg)
    assert len(parts.wrappers) == 1 and len(parts.advantage_hooks) == 1
    wrapped = parts.wrap(object())
    assert isinstance(wrapped, PearlPolicy) and wrapped.checklist_weight == 0.25
    cfg = load_config(CONFIGS / "vlm_tempsamp.yaml", [NO_MODEL, "methods.tempsamp.anchor_factor=null"])
    assert len(method_parts(cfg).wrappers) == 1 and method_parts(cfg).advantage_hooks == []  # injection alone


# ------------------------------------------------------------------------------- a method from outside the library

PLUGIN = """
from dataclasses import dataclass

import torch

from mmgrpo.methods.registry import Method, PolicyWrapper


@dataclass
class ScaleOptions:
    factor: float = 2.0
    row_weight: float = 1.0


class Weighted(PolicyWrapper):
    def __init__(self, inner, w):
        super().__init__(inner)
        self._own("w", w)

    def rollout(self, batch, group_size, generator=None):
        out = self.inner.rollout(batch, group_size, generator)
        out.loss_weight = torch.full((out.num_rows,), self.w)
        return out


def scale_hook(factor):
    def hook(adv, rollout, cols, names):
        return adv * factor, {"scale/factor": factor}

    return hook


SCALE = Method(
    name="scale",
    paper="a test method: advantages x factor, every row weighs row_weight",
    options=ScaleOptions,
    pipelines=("bandit",),
    wrap_policy=lambda policy, o: Weighted(policy, o.row_weight),
    advantage_hooks=lambda o: [scale_hook(o.factor)],
)
"""


def bandit_trainer(tmp_path, name, methods):
    data = read_yaml(CONFIGS / "bandit.yaml")
    data["run"].update(name=name, output_dir=str(tmp_path))
    data["trainer"].update(progress=False, max_steps=1)
    data["methods"] = methods
    cfg = load_config(None, base=data)
    return Trainer(cfg, tmp_path / name)


def test_a_method_by_dotted_path_wraps_the_policy_and_hooks_the_advantages(tmp_path, monkeypatch):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"unknown key 'methods.my_methods.SCALE.factr'"):
        bandit_trainer(tmp_path, "bad", {"my_methods.SCALE": {"factr": 3.0}})
    torch.manual_seed(0)
    plain = bandit_trainer(tmp_path, "plain", {})
    torch.manual_seed(0)
    scaled = bandit_trainer(tmp_path, "scaled", {"my_methods.SCALE": {"factor": 3.0, "row_weight": 0.5}})
    assert isinstance(scaled.policy, PolicyWrapper) and isinstance(METHODS.get("my_methods.SCALE"), Method)
    # the wrapper is the recipe's policy for everything but rollout: the prepared model reached the inner policy
    assert scaled.policy.model is scaled.policy.inner.model
    assert scaled.policy.trainable_parameters() == scaled.policy.inner.trainable_parameters()
    r_plain, c_plain, _ = plain.collect(0)
    r_scaled, c_scaled, _ = scaled.collect(0)
    assert torch.equal(c_plain, c_scaled) and r_plain.loss_weight is None
    assert r_scaled.loss_weight.tolist() == [0.5] * r_scaled.num_rows
    a_plain, _, m_plain = plain.advantage(c_plain, r_plain, 0)
    a_scaled, _, metrics = scaled.advantage(c_scaled, r_scaled, 0)
    assert a_plain.abs().sum() > 0 and torch.allclose(a_scaled, 3.0 * a_plain) and metrics["scale/factor"] == 3.0
    # adv/* describe the advantages the loss uses, after the hooks (they were the estimator's)
    assert metrics["adv/abs_mean"] == pytest.approx(3.0 * m_plain["adv/abs_mean"]) and m_plain["adv/abs_mean"] > 0
    assert metrics["adv/mean"] == pytest.approx(3.0 * m_plain["adv/mean"], abs=1e-6)


def test_a_method_that_registers_itself_is_found_by_the_dotted_path_of_its_module(tmp_path, monkeypatch):
    """docs/extending.md's method calls ``register_method(Method(name="optimism", ...))`` and binds no attribute of
    that name, so ``methods: {pkg.module.optimism: ...}`` was "module has no attribute 'optimism'", against the
    page's "every kind of part ... by dotted path": importing the module registers the part, found under its name."""
    (tmp_path / "self_registering.py").write_text(
        textwrap.dedent("""
        from dataclasses import dataclass

        from mmgrpo.methods.registry import Method, register_method


        @dataclass
        class HalfOptions:
            factor: float = 0.5


        def half_hooks(opts):
            return [lambda adv, rollout, cols, names: (adv * opts.factor, {"half/factor": opts.factor})]


        register_method(Method(name="test_half_negatives", paper="test", options=HalfOptions,
                               advantage_hooks=half_hooks))
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    trainer = bandit_trainer(tmp_path, "half", {"self_registering.test_half_negatives": {"factor": 0.25}})
    rollout, cols, _ = trainer.collect(0)
    _, _, metrics = trainer.advantage(cols, rollout, 0)
    assert metrics["half/factor"] == 0.25
    with pytest.raises(UserError, match="module 'self_registering' has no attribute 'nothing_here'"):
        bandit_trainer(tmp_path, "none", {"self_registering.nothing_here": {}})
    # a part of a built-in's name is not taken for the module's: a module that fails to import, a typo in a module's
    # name, or a module that registers no such part is its error, never the built-in strata method
    (tmp_path / "broken_methods.py").write_text("import not_an_installed_package\n")
    cases = [
        ("broken_methods.strata", "No module named 'not_an_installed_package'"),
        ("self_registerin.strata", "cannot import module 'self_registerin'"),
        ("self_registering.strata", "module 'self_registering' has no attribute 'strata'"),
    ]
    for path, error in cases:
        with pytest.raises(UserError, match=error):
            METHODS.get(path)
