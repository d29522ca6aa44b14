"""The methods' runtime parts: extra models (memory, time) and loss terms, through the trainer on the bandit."""

import textwrap

import pytest
import torch

from mmgrpo.core.extra import ExtraModel
from mmgrpo.core.losses import policy_loss
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer, prepare_run_dir

BASE = {
    "pipeline": "bandit",
    "run": {"name": "b", "seed": 0},
    "data": {"options": {"num_prompts": 6, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}],
    "trainer": {"max_steps": 1, "prompts_per_step": 2, "group_size": 4, "lr": 0.1, "progress": False},
}

PLUGIN = """
import torch
from dataclasses import dataclass
from mmgrpo.core.extra import ExtraModel
from mmgrpo.methods.registry import Method, MethodRuntime


@dataclass
class Opts:
    value: float = 0.5
    replace: bool = False


class Const:
    name = "const"

    def __init__(self, value, replace, extra):
        self.value, self.replaces_surrogate, self.extra = value, replace, extra

    def __call__(self, x):
        with self.extra.timed():
            out = self.value * torch.exp(x.lp.logp - x.lp.logp.detach())  # value: self.value; grad: value * grad logp
        return out, {"const/rows": float(len(x.rows))}


def setup(policy, opts, cfg):
    extra = ExtraModel("probe", torch.nn.Linear(256, 256, bias=False))  # 256 * 256 fp32 = 0.25 MiB
    return MethodRuntime(extra_models=[extra], loss_terms=[Const(opts.value, opts.replace, extra)])


CONST = Method(name="const", paper="a test method: a constant loss term", options=Opts, setup=setup)
"""


def trainer_for(tmp_path, monkeypatch, name, methods, **loss):
    (tmp_path / "const_method.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {**BASE, "methods": methods, "loss": loss} if loss else {**BASE, "methods": methods}
    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"run.name={name}"], base=base)
    torch.manual_seed(0)
    return Trainer(cfg, prepare_run_dir(cfg))


def test_an_extra_model_is_frozen_and_reports_its_memory_and_time():
    extra = ExtraModel("teacher", torch.nn.Linear(512, 512))  # (512 * 512 + 512) fp32 = 1 MiB + 2 KiB
    assert not any(p.requires_grad for p in extra.module.parameters()) and not extra.module.training
    assert extra.mib() == pytest.approx((512 * 512 + 512) * 4 / 2**20)
    with extra.timed():
        sum(range(10000))
    m = extra.metrics()
    assert m["extra/teacher/time_s"] > 0 and m["extra/teacher/mib"] == pytest.approx(1.001953125)
    assert extra.metrics()["extra/teacher/time_s"] == 0.0  # time since the previous report
    trained = ExtraModel("probe", torch.nn.Linear(2, 1), frozen=False)
    assert all(p.requires_grad for p in trained.module.parameters())


def test_a_loss_term_is_aggregated_like_the_policy_loss_and_added(tmp_path, monkeypatch):
    plain = trainer_for(tmp_path, monkeypatch, "plain", {})
    const = trainer_for(tmp_path, monkeypatch, "const", {"const_method.CONST": {"value": 0.5}})
    m_plain, m_const = plain.train(), const.train()
    assert m_const["loss/const"] == pytest.approx(0.5)  # token_mean of 0.5 on every trained unit
    assert m_const["loss/total"] == pytest.approx(m_plain["loss/total"] + 0.5, abs=1e-6)
    assert m_const["loss/policy"] == pytest.approx(m_plain["loss/policy"], abs=1e-6)
    assert m_const["extra/probe/mib"] == pytest.approx(0.25) and m_const["extra/probe/time_s"] > 0
    assert m_const["const/rows"] == 8.0  # one micro-batch of the B * G = 8 rows


def test_a_term_that_replaces_the_surrogate_is_the_whole_objective(tmp_path, monkeypatch):
    t = trainer_for(tmp_path, monkeypatch, "only", {"const_method.CONST": {"value": 0.5, "replace": True}})
    m = t.train()
    assert m["loss/policy"] == 0.0 and m["loss/const"] == pytest.approx(0.5) and m["loss/total"] == pytest.approx(0.5)
    assert "loss/ratio_mean" in m  # the surrogate's metrics are still reported


def test_policy_loss_without_surrogate_keeps_the_kl_and_has_no_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    kl = torch.tensor([[0.2, 0.4]])
    loss, m = policy_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), beta=0.5,
                          kl=kl, surrogate=False)  # fmt: skip
    assert m["loss/policy"] == 0.0 and loss.item() == pytest.approx(0.5 * 0.3)  # beta * token_mean(kl)
    assert not loss.requires_grad  # nothing but the (given, constant) KL: no gradient path to logp


def test_zero_advantage_rows_are_not_skipped_when_a_method_term_trains_them(tmp_path, monkeypatch):
    plain = trainer_for(tmp_path, monkeypatch, "plain0", {})
    const = trainer_for(tmp_path, monkeypatch, "const0", {"const_method.CONST": {"value": 0.5}})
    rows, adv, mask = torch.arange(4), torch.zeros(4), torch.ones(4, 1, dtype=torch.bool)
    assert plain.rows_with_gradient(rows, adv, mask).tolist() == [0]  # GRPO alone: zero advantage, zero gradient
    assert const.rows_with_gradient(rows, adv, mask).tolist() == [0, 1, 2, 3]  # the term's gradient is not zero
