"""The non-finite update guard: a minibatch whose loss or gradient norm is not finite changes nothing and is logged;
``trainer.max_nonfinite_steps`` of them in a row stop the run with the last good checkpoint intact."""

import json
from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.policies.bandit import BanditPolicy
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer, prepare_run_dir

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "pipeline": "bandit",
    "data": {"options": {"num_prompts": 4, "num_arms": 3}},
    "rewards": [{"name": "bandit_arm_value"}],
    "trainer": {"prompts_per_step": 2, "group_size": 4, "lr": 0.1, "progress": False, "checkpoint_every": 1},
}


def nan_from(monkeypatch, steps):
    """Bandit log-probs are NaN while the trainer's step (0-based) is in ``steps``."""
    real = BanditPolicy.log_prob
    state = {"step": 0}

    def log_prob(self, rollout, rows, units=None):
        out = real(self, rollout, rows, units)
        if state["step"] in steps:
            out.logp = out.logp * float("nan")
        return out

    monkeypatch.setattr(BanditPolicy, "log_prob", log_prob)
    return state


def trainer(tmp_path, *overrides):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", *overrides], base=BASE)
    return Trainer(cfg, prepare_run_dir(cfg))


def params(t):
    return [p.detach().clone() for p in t.params]


@pytest.mark.parametrize("max_grad_norm", ["1.0", "null"])
def test_a_nan_loss_changes_nothing_and_k_in_a_row_stop_the_run(tmp_path, monkeypatch, max_grad_norm):
    t = trainer(tmp_path, "trainer.max_steps=10", f"trainer.max_grad_norm={max_grad_norm}", "trainer.ema_decay=0.9",
                "trainer.max_nonfinite_steps=3")  # fmt: skip
    state = nan_from(monkeypatch, steps=range(2, 100))
    real_update = t.update
    before = {}

    def update(rollout, adv, row_w, step):
        state["step"] = step
        if step == 2:  # the first NaN step: what every later state must equal
            before["params"], before["ema"] = params(t), [s.clone() for s in t.ema.shadow]
            before["adam"] = [v.clone() for st in t.optimizer.state.values() for v in st.values()]
        return real_update(rollout, adv, row_w, step)

    t.update = update
    with pytest.warns(UserWarning, match="skipped an optimizer step because the loss is not finite") as w:
        with pytest.raises(UserError, match=r"stopped at step 5: 3 optimizer steps in a row were skipped.*is intact"):
            t.train()
    assert sum("skipped an optimizer step" in str(x.message) for x in w) == 2  # the 3rd stops the run
    assert all(torch.equal(a, b) for a, b in zip(params(t), before["params"]))  # steps 3..5 changed nothing
    assert all(torch.equal(a, b) for a, b in zip(t.ema.shadow, before["ema"]))
    adam = [v for st in t.optimizer.state.values() for v in st.values()]
    assert all(torch.equal(a, b) for a, b in zip(adam, before["adam"]))
    assert all(p.grad is None for p in t.params)
    last = ckpt.latest_checkpoint(t.run_dir / "checkpoints")
    assert last.name == "step_000004"  # steps 3 and 4 were skipped: it holds the weights of step 2
    model = ckpt.load_checkpoint(last)["model"]
    assert all(torch.equal(a, b) for a, b in zip(model.values(), before["params"]))
    lines = [json.loads(x) for x in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["skipped/nonfinite"]) for m in lines] == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]


def test_one_nan_step_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    t = trainer(tmp_path, "trainer.max_steps=4", "trainer.epochs=2")
    state = nan_from(monkeypatch, steps={1})
    real_update = t.update

    def update(rollout, adv, row_w, step):
        state["step"] = step
        if step == 1:
            before = params(t)
            out = real_update(rollout, adv, row_w, step)
            assert all(torch.equal(a, b) for a, b in zip(params(t), before))
            return out
        return real_update(rollout, adv, row_w, step)

    t.update = update
    with pytest.warns(UserWarning, match="step 2: skipped an optimizer step"):
        t.train()
    lines = [json.loads(x) for x in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped/nonfinite"] for m in lines] == [0.0, 2.0, 0.0, 0.0]  # both epochs of step 2
    assert t.step == 4 and all(p.isfinite().all() for p in t.params)


def test_save_refuses_non_finite_weights(tmp_path):
    t = trainer(tmp_path, "trainer.max_steps=1")
    t.train()
    with torch.no_grad():
        t.params[0][0, 0] = float("inf")
    t.step = 2
    with pytest.raises(UserError, match="trainable tensor.* not finite.*no checkpoint was written"):
        t.save()
    assert ckpt.latest_checkpoint(t.run_dir / "checkpoints").name == "step_000001"


@pytest.mark.parametrize(
    "first, then", [(0, "fix it and run again"), (1, "fix it and restart it from step 0 with resume=")]
)
def test_the_stop_before_any_checkpoint_says_how_to_start_again(tmp_path, monkeypatch, first, then):
    # no checkpoint: there is nothing to continue from; a new run stopped in step 1 leaves no directory (train())
    t = trainer(tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every=0", "trainer.max_nonfinite_steps=1")
    state = nan_from(monkeypatch, steps=range(first, 100))
    real_update = t.update

    def update(rollout, adv, row_w, step):
        state["step"] = step
        return real_update(rollout, adv, row_w, step)

    t.update = update
    with pytest.raises(UserError, match=f"no checkpoint had been written yet .*; {then}"):
        t.train()


def test_a_diverged_generator_is_named_not_the_reward(tmp_path, capsys, monkeypatch):
    """The shapes model at lr 1e6 makes NaN images by its third step: the first reward refused them ("reward
    'shapes' returned non-finite values ... fix the reward") and the resume it advised diverged again. The rollout's
    samples are checked before any reward sees them."""
    from mmgrpo.train.cli import main

    monkeypatch.chdir(ROOT)
    code = main(["train", "configs/shapes_t2i_grpo.yaml", "trainer.lr=1e6", "trainer.max_steps=4",
                 "trainer.eval_every=0", "trainer.checkpoint_every=1", "trainer.progress=false",
                 f"run.output_dir={tmp_path}", "run.name=div"])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "the policy's samples of step " in err and "are not finite (NaN or inf in " in err, err
    assert "the generator diverged, not a reward" in err and "trainer.lr=1e+06" in err
    assert "returned non-finite values" not in err
