"""Reward streams (outcome vs process): set per reward in YAML, handed to combiners and method hooks that declare
``kinds``, ignored by the built-in combiners (a config without kinds computes what it always did); Posterior-GRPO's
``posterior`` combiner gates the process rewards on the outcome (hand-computed)."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mmgrpo.core import advantages as adv
from mmgrpo.core.errors import UserError
from mmgrpo.methods.registry import METHODS, Method
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

BASE = {
    "pipeline": "bandit",
    "run": {"name": "s", "seed": 0},
    "data": {"options": {"num_prompts": 6, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}, {"name": "bandit_arm_value", "weight": 0.5}],
    "trainer": {"max_steps": 3, "prompts_per_step": 3, "group_size": 4, "lr": 0.1, "progress": False},
}


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path}", "trainer.checkpoint_every=0", *overrides], base=BASE)


def metrics(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def test_the_kind_of_a_reward_defaults_to_outcome_and_is_checked_at_load(tmp_path):
    cfg = cfg_for(tmp_path)
    assert [r.kind for r in cfg.rewards] == ["outcome", "outcome"]
    cfg = cfg_for(tmp_path, "rewards.1.kind=process")
    assert [r.kind for r in cfg.rewards] == ["outcome", "process"]
    with pytest.raises(UserError, match=r"rewards.1.kind"):
        cfg_for(tmp_path, "rewards.1.kind=reasoning")


def test_builtin_combiners_ignore_the_kinds():
    r = torch.tensor([[[1.0, 0.0, 1.0, 0.0]], [[0.2, 0.9, 0.4, 0.4]]])  # [R=2, B=1, G=4]
    w = torch.tensor([1.0, 0.5])
    for name in ("sum_then_normalize", "normalize_then_sum"):
        a = adv.combine(name, r, w, "grpo", {})
        b = adv.combine(name, r, w, "grpo", {}, kinds=["outcome", "process"])
        assert torch.equal(a, b)


def test_a_combiner_that_declares_kinds_receives_them_and_its_options(monkeypatch):
    seen = {}

    def probe(rewards, weights, estimator, options, *, kinds=None, scale: float = 1.0):
        seen["kinds"], seen["scale"] = kinds, scale
        return adv.sum_then_normalize(rewards, weights, estimator, options) * scale

    monkeypatch.setitem(adv.COMBINERS._items, "test_probe_kinds", probe)  # registered for this test only
    r = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    out = adv.combine("test_probe_kinds", r, torch.ones(2), "dr_grpo", {}, ["outcome", "process"], {"scale": 2.0})
    assert seen == {"kinds": ["outcome", "process"], "scale": 2.0}
    assert torch.allclose(out, torch.tensor([[1.0, -1.0]]))  # dr_grpo of [1.5, 0.5] = [0.5, -0.5], x 2
    assert adv.combine("test_probe_kinds", r, torch.ones(2), "dr_grpo", {}) is not None
    assert seen["kinds"] == ["outcome", "outcome"]  # no kinds given: every reward is an outcome reward
    with pytest.raises(UserError, match="one of"):
        adv.combine("test_probe_kinds", r, torch.ones(2), "dr_grpo", {}, ["outcome", "reasoning"])


@dataclass
class _NoOpts:
    pass


SEEN: list = []


def _kinds_hook_factory(opts):
    def hook(adv_, rollout, cols, names, kinds):
        SEEN.append(list(kinds))
        return adv_, {}

    return [hook]


def test_a_run_hands_the_kinds_to_hooks_and_marking_kinds_changes_nothing_by_itself(tmp_path, monkeypatch):
    probe = Method(name="test_kinds_probe", paper="test: a hook that reads the reward kinds", options=_NoOpts,
                   advantage_hooks=_kinds_hook_factory)  # fmt: skip
    monkeypatch.setitem(METHODS._items, "test_kinds_probe", probe)  # registered for this test only
    SEEN.clear()
    a = train(cfg_for(tmp_path / "a", "run.name=a", "rewards.1.kind=process", "methods.test_kinds_probe={}"))
    assert SEEN == [["outcome", "process"]] * 3
    b = train(cfg_for(tmp_path / "b", "run.name=b"))
    assert metrics(a.run_dir) == metrics(b.run_dir)  # the built-in combiner ignores kinds: bit-identical
