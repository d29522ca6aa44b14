"""KDRL: the per-token reverse-KL estimators, the annealed coefficient and reward-guided KD by hand; the teacher
scores the student's tokens like the policy; a 2-step VLM run with a tiny teacher of the same family."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.methods.kdrl import kd_coef, kd_per_token, kd_rows
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_5_vl, tiny_qwen2_vl
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import Trainer, prepare_run_dir

REPO = Path(__file__).resolve().parents[2]
SMALL = {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "micro_batch_size": 2, "lr": 0.05,
         "eval_every": 0, "checkpoint_every": 0, "progress": False}  # fmt: skip


def test_k2_and_k3_by_hand_and_the_k2_gradient_is_the_log_ratio():
    logp = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-1.0, -1.0, -1.0]])  # d = logp - teacher = [1, 0, -1]
    k2 = kd_per_token(logp, teacher, "k2")
    assert torch.allclose(k2, torch.tensor([[0.5, 0.0, 0.5]]))  # d^2 / 2
    k2.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[1.0, 0.0, -1.0]]))  # d: the RKL policy-gradient weight
    k3 = kd_per_token(logp.detach(), teacher, "k3")  # exp(-d) + d - 1: e^-1 = 0.367879, 0, e - 2 = 0.718282
    assert torch.allclose(k3, torch.tensor([[math.exp(-1), 0.0, math.e - 2]]), atol=1e-6)
    with pytest.raises(UserError, match="k2"):
        kd_per_token(logp, teacher, "k1")


def test_the_coefficient_anneals_linearly_then_stays():
    assert kd_coef(0, 0.005, 0.001, 10) == pytest.approx(0.005)
    assert kd_coef(5, 0.005, 0.001, 10) == pytest.approx(0.003)  # half way: 0.005 - 0.004 / 2
    assert kd_coef(30, 0.005, 0.001, 10) == pytest.approx(0.001)
    assert kd_coef(30, 0.005, None, 10) == 0.005


def test_reward_guided_kd_skips_the_correct_rows():
    cols = torch.tensor([[[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, float("nan"), 0.5]]])  # [V=1, R=2, N=4]
    assert kd_rows(cols, ["format", "accuracy"], "accuracy", 1.0).tolist() == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(UserError, match="skip_correct_reward"):
        kd_rows(cols, ["format", "accuracy"], "iou", 1.0)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kdrl")
    return {
        "student": save_tiny(*tiny_qwen2_vl(0), root / "student"),
        "teacher": save_tiny(*tiny_qwen2_vl(1), root / "teacher"),
        "other_family": save_tiny(*tiny_qwen2_5_vl(1), root / "other"),
    }


def kdrl_config(tmp_path, student, teacher, **kdrl):
    data = read_yaml(REPO / "configs" / "vlm_kdrl.yaml")
    data["run"].update(name="kdrl", output_dir=str(tmp_path))
    data["policy"]["options"].update(path=str(student), max_new_tokens=8, lora_rank=4)
    data["data"]["options"].update(num_examples=12, eval_examples=2)
    data["trainer"].update(SMALL)
    data["methods"]["kdrl"].update(teacher=str(teacher), **kdrl)
    return load_config(None, base=data)


def test_a_teacher_with_the_students_weights_scores_its_tokens_as_it_does(tmp_path, dirs):
    cfg = kdrl_config(tmp_path, dirs["student"], dirs["student"])
    cfg.trainer.logp_old = "rollout"
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    rollout, cols, _ = trainer.collect(0)
    (term,) = trainer.comp.loss_terms
    rows = torch.arange(rollout.num_rows)
    mask = rollout.train_mask
    t_logp = trainer.policy.frozen_log_prob(term.teacher, rollout, rows)  # [N, K]
    assert torch.allclose(t_logp[mask], rollout.logp_old[mask], atol=1e-5)  # same weights: KL 0 on every token
    # with units None the teacher forwards the completions up to the longest of the rows, not max_new_tokens (this
    # random student never stops early: its rows are cut 3 tokens short here); the columns after it are 0
    K = rollout.logp_old.shape[1]
    cut = copy.copy(rollout)
    cut.extras = {**rollout.extras, "completion_len": rollout.extras["completion_len"].clamp(max=K - 3)}
    widths = []
    record = lambda m, a, kw: widths.append(a[1].shape[1])  # noqa: E731  (the completions [n, L] forwarded)
    hook = term.teacher.module.register_forward_pre_hook(record, with_kwargs=True)
    short = trainer.policy.frozen_log_prob(term.teacher, cut, rows)
    hook.remove()
    assert widths == [K - 3] and short.shape == (rollout.num_rows, K) and (short[:, K - 3 :] == 0).all()
    assert torch.allclose(short[:, : K - 3], t_logp[:, : K - 3], atol=1e-6)
    trainer.advantage(cols, rollout, 0)  # the hook scores the rollout once, one group per teacher forward
    assert torch.allclose(rollout.extras["kdrl_teacher_logp"][mask], t_logp[mask], atol=1e-5)
    cfg_b = kdrl_config(tmp_path / "b", dirs["student"], dirs["teacher"])
    other = Trainer(cfg_b, prepare_run_dir(cfg_b))
    o_logp = other.policy.frozen_log_prob(other.comp.loss_terms[0].teacher, rollout, rows)
    assert (o_logp[mask] - rollout.logp_old[mask]).abs().max() > 1e-2  # another seed: another distribution


def test_a_teacher_of_another_family_is_refused(tmp_path, dirs):
    cfg = kdrl_config(tmp_path, dirs["student"], dirs["other_family"])
    with pytest.raises(UserError, match="must be of the policy's family"):
        Trainer(cfg, prepare_run_dir(cfg))


def test_two_kdrl_steps_train_the_lora_only_and_report_the_teacher(tmp_path, dirs):
    cfg = kdrl_config(tmp_path, dirs["student"], dirs["teacher"], skip_correct_reward=None)
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    teacher = trainer.comp.loss_terms[0].teacher
    frozen = {n: p.detach().clone() for n, p in teacher.module.named_parameters()}
    model = trainer.acc.unwrap_model(trainer.policy.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.equal(p, frozen[n]) for n, p in teacher.module.named_parameters())  # the teacher is untouched
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["loss/kdrl"] > 0 and m["kdrl/kl"] > 0  # a teacher of another seed: KL > 0 on every step
        assert m["loss/total"] == pytest.approx(m["loss/policy"] + m["loss/kdrl"], abs=1e-6)
        assert m["extra/kdrl_teacher/mib"] == pytest.approx(teacher.mib()) and m["extra/kdrl_teacher/mib"] > 0
        assert m["extra/kdrl_teacher/time_s"] > 0
    assert [m["kdrl/coef"] for m in lines] == pytest.approx([0.005, 0.005 - 0.004 / 20])  # annealed per step
