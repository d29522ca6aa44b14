"""The loop on the reference bandit: learning, resume, checkpoints, micro-batching, dynamic sampling."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmgrpo.core import losses as loss_lib
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.components import EvalResult
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer, train

BASE = {
    "pipeline": "bandit",
    "run": {"name": "b", "seed": 0},
    "data": {"options": {"num_prompts": 6, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}],
    "loss": {"options": {"clip_high": 0.28}},
    "trainer": {"max_steps": 150, "prompts_per_step": 3, "group_size": 8, "lr": 0.1, "progress": False},
}


def cfg_for(tmp_path, *overrides, base=BASE):
    return load_config(None, [f"run.output_dir={tmp_path}", *overrides], base=base)


def metrics(run_dir, drop_time=True):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    if drop_time:
        lines = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]
    return lines


SLOW = pytest.mark.slow  # 150 training steps each; `python -m pytest -m slow` runs them (pyproject.toml)


@pytest.mark.parametrize(
    "estimator,extra",
    [
        ("grpo", []),  # the one learning check of the loop in the default run; the estimators' maths is hand-checked
        pytest.param("dr_grpo", [], marks=SLOW),
        pytest.param("batch_std", [], marks=SLOW),
        pytest.param("mc_grpo", ["trainer.group_size=9"], marks=SLOW),  # G + 1 rollouts: the median pivot has none
        pytest.param("ngrpo", [], marks=SLOW),
        pytest.param("bnpo", [], marks=SLOW),
        pytest.param("stratified", ["advantage.options={alpha: 0.5}"], marks=SLOW),
    ],
)
def test_each_estimator_drives_bandit_to_best_arm(tmp_path, estimator, extra):
    cfg = cfg_for(tmp_path, f"advantage.estimator={estimator}", *extra)
    trainer = train(cfg)
    probs = trainer.policy.probs()  # [P, A]
    values = torch.tensor(trainer.comp.prompts.values)
    assert torch.equal(probs.argmax(-1), values.argmax(-1)), estimator
    # the best arm carries most of the mass for every prompt
    assert probs.gather(1, values.argmax(-1, keepdim=True)).min() > 0.6, probs


def test_ratio_is_one_after_rollout_for_any_micro_batch(tmp_path):
    trainer = Trainer(cfg_for(tmp_path), tmp_path / "r")
    batch = trainer.comp.prompts.get([0, 1, 2])
    batch.seeds = [1, 2, 3]
    rollout = trainer.policy.rollout(batch, 8)
    for micro in (1, 8):
        for lo in range(0, rollout.num_rows, micro):
            rows = torch.arange(lo, min(lo + micro, rollout.num_rows))
            lp = trainer.policy.log_prob(rollout, rows).logp
            ratio = torch.exp(lp - rollout.logp_old[rows])
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_micro_batching_does_not_change_the_update(tmp_path):
    common = ["trainer.max_steps=3", "trainer.minibatches=2", "trainer.epochs=2", "trainer.max_grad_norm=0.5"]
    a = train(cfg_for(tmp_path, "run.name=a", *common, "trainer.micro_batch_size=0"))
    b = train(cfg_for(tmp_path, "run.name=b", *common, "trainer.micro_batch_size=5"))
    la, lb = a.policy.model.logits.detach(), b.policy.model.logits.detach()
    assert not torch.equal(la, torch.zeros_like(la))
    assert torch.allclose(la, lb, atol=1e-6), (la - lb).abs().max()


@pytest.mark.parametrize("ema", [[], ["trainer.ema_every=3", "trainer.ema_warmup=true"]], ids=["ema", "flow_grpo_ema"])
def test_resume_writes_exactly_the_uninterrupted_metrics(tmp_path, ema):
    common = [
        "trainer.max_steps=8", "trainer.epochs=2", "trainer.minibatches=2", "trainer.lr_schedule=cosine",
        "trainer.warmup_steps=2", "trainer.ema_decay=0.9", "trainer.eval_every=3", "trainer.checkpoint_every=2",
        "loss.beta=0.01", *ema,
    ]  # fmt: skip
    full = train(cfg_for(tmp_path, "run.name=full", *common))
    # interrupted after 5 steps: the last complete checkpoint is step 5 (written at the stop)
    part = train(cfg_for(tmp_path, "run.name=part", *common, "trainer.stop_after_steps=5"))
    assert part.step == 5
    resumed = train(cfg_for(tmp_path, "run.name=part", *common, f"resume={part.run_dir}"))
    assert resumed.step == 8
    after = lambda ms: [m for m in ms if m["step"] > 5]  # noqa: E731
    assert after(metrics(part.run_dir)) == after(metrics(full.run_dir))
    assert len(after(metrics(full.run_dir))) >= 4
    assert torch.equal(resumed.policy.model.logits, full.policy.model.logits)
    assert torch.equal(resumed.ema.shadow[0], full.ema.shadow[0])
    assert resumed.ema.calls == full.ema.calls == 8 * 2 * 2  # one call per optimizer step (epochs x minibatches)


def test_resume_from_earlier_checkpoint_drops_later_metric_lines(tmp_path):
    common = ["trainer.max_steps=6", "trainer.checkpoint_every=2"]
    full = train(cfg_for(tmp_path, "run.name=full", *common))
    part = train(cfg_for(tmp_path, "run.name=part", *common))
    # simulate a crash after step 5: drop the step-6 checkpoint, keep metric lines up to step 6
    for d in ckpt.list_checkpoints(part.run_dir / "checkpoints"):
        if d.name == "step_000006":
            import shutil

            shutil.rmtree(d)
    train(cfg_for(tmp_path, "run.name=part", *common, f"resume={part.run_dir}"))
    assert metrics(part.run_dir) == metrics(full.run_dir)


def test_interrupted_checkpoint_write_leaves_previous_usable(tmp_path, monkeypatch):
    trainer = Trainer(cfg_for(tmp_path), tmp_path / "r")
    (tmp_path / "r").mkdir()
    trainer.step = 1
    good = trainer.save()
    before = trainer.policy.model.logits.detach().clone()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # half a file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with torch.no_grad():
        trainer.policy.model.logits.add_(1.0)
    trainer.step = 2
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path / "r" / "checkpoints") == good
    fresh = Trainer(cfg_for(tmp_path), tmp_path / "r")
    fresh.load(good)
    assert fresh.step == 1 and torch.equal(fresh.policy.model.logits.detach(), before)
    trainer.step = 3
    trainer.save()  # the next save cleans the stale temp folder
    assert not list((tmp_path / "r" / "checkpoints").glob(".tmp-*"))


def test_the_fp16_gradient_scalers_state_is_saved_and_restored(tmp_path):
    """fp16 mixed precision on a GPU has a gradient scaler whose scale and growth count follow the overflows seen; a
    resume restores them, or it would skip other steps than the uninterrupted run. accelerate makes no scaler on the
    CPU, so one is set here (tests/gpu checks accelerate's own, after fp16 training)."""
    (tmp_path / "r").mkdir()
    trainer = Trainer(cfg_for(tmp_path), tmp_path / "r")
    state = {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
             "_growth_tracker": 7}  # fmt: skip
    trainer.acc.scaler = torch.amp.GradScaler("cpu")
    trainer.acc.scaler.load_state_dict(state)
    trainer.step = 1
    path = trainer.save()
    fresh = Trainer(cfg_for(tmp_path), tmp_path / "r")
    fresh.acc.scaler = torch.amp.GradScaler("cpu")
    assert fresh.acc.scaler.state_dict()["scale"] == 2.0**16
    fresh.load(path)
    assert fresh.acc.scaler.state_dict() == state
    fresh.acc.scaler = None  # a run without one (bf16, fp32) reads the same checkpoint
    fresh.load(path)
    assert fresh.step == 1


def test_checkpoint_state_round_trips_nested_optimizer_state(tmp_path):
    state = {"step": 3, "opt": {"state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]}, "none": None}  # fmt: skip
    path = ckpt.save_checkpoint(tmp_path, 3, state)
    back = ckpt.load_checkpoint(path)
    assert back["opt"]["state"][0]["step"].item() == 3.0
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert back["none"] is None and back["step"] == 3
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "state.json", "tensors.safetensors"]


def _register_binary_reward():
    if "test_binary_best_arm" in REWARDS:
        return

    @register("test_binary_best_arm")
    def factory():
        """1 if the chosen arm is the best arm (test reward)."""

        def fn(samples, prompts, meta, ctx):
            return torch.tensor([float(int(a) == m["best_arm"]) for a, m in zip(samples, meta)])

        return fn


def test_dynamic_sampling_refills_zero_variance_groups(tmp_path):
    _register_binary_reward()
    # a policy that almost always picks arm 0: most groups are all-0 (zero variance)
    common = ["rewards=[{name: test_binary_best_arm}]", "trainer.max_steps=1", "trainer.lr=1e-9",
              "trainer.group_size=4", "trainer.prompts_per_step=3", "policy.options.init_std=3.0"]  # fmt: skip
    plain = train(cfg_for(tmp_path, "run.name=plain", *common))
    dyn = train(cfg_for(tmp_path, "run.name=dyn", *common, "advantage.dynamic_sampling=true",
                        "advantage.max_refill_rounds=20"))  # fmt: skip
    m_plain, m_dyn = metrics(plain.run_dir)[-1], metrics(dyn.run_dir)[-1]
    assert m_plain["adv/zero_variance_groups"] > 0
    assert m_dyn["adv/zero_variance_groups"] < m_plain["adv/zero_variance_groups"]
    assert m_dyn["dynamic/refill_rounds"] >= 1


def test_dynamic_sampling_refills_groups_whose_scored_rows_tie(tmp_path):
    """A reward that applies to every other row and scores the rows it applies to alike gives every group advantage 0;
    the rows it does not apply to counted as reward 0 in the tie test, so no group was refilled and none counted as
    zero-variance (adv/zero_variance_groups 0, adv/abs_mean 0)."""

    if "test_every_other_row_scores_one" not in REWARDS:

        @register("test_every_other_row_scores_one")
        def factory():
            return lambda samples, prompts, meta, ctx: [1.0 if i % 2 == 0 else None for i in range(len(meta))]

    run = train(cfg_for(tmp_path, "rewards=[{name: test_every_other_row_scores_one}]", "trainer.max_steps=1",
                        "advantage.dynamic_sampling=true", "advantage.max_refill_rounds=2"))  # fmt: skip
    m = metrics(run.run_dir)[-1]
    assert m["adv/abs_mean"] == 0.0 and m["adv/zero_variance_groups"] == 3  # every group, counted
    assert m["dynamic/refill_rounds"] == 2 and m["dynamic/unfilled_groups"] == 3  # refilled, and no refill helped


def test_prompts_are_layout_independent(tmp_path):
    trainer = Trainer(cfg_for(tmp_path), tmp_path / "r")
    batch = trainer.prompts_for(step=2, base=6)
    assert isinstance(batch, PromptBatch) and len(batch) == 3
    again = trainer.prompts_for(step=2, base=6)
    assert batch.prompts == again.prompts and batch.seeds == again.seeds
    other_step = trainer.prompts_for(step=3, base=6)
    assert other_step.seeds != batch.seeds


def test_run_dir_exists_is_a_user_error(tmp_path):
    train(cfg_for(tmp_path, "trainer.max_steps=1"))
    with pytest.raises(UserError, match="already exists; continue it with resume="):
        train(cfg_for(tmp_path, "trainer.max_steps=1"))


def test_run_directory_is_complete(tmp_path):
    t = train(cfg_for(tmp_path, "trainer.max_steps=4", "trainer.eval_every=2"))
    names = {p.name for p in t.run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "report.html", "reward_curve.png"} <= names
    resolved = load_config(t.run_dir / "config.yaml")
    assert resolved.trainer.max_steps == 4 and resolved.rewards[0].name == "bandit_arm_value"
    m = metrics(t.run_dir, drop_time=False)
    assert [x["step"] for x in m if "reward/mean" in x] == [1, 2, 3, 4]
    assert {"reward/bandit_arm_value", "loss/policy", "time/sample_s", "lr"} <= set(m[1])
    assert "eval/expected_reward" in m[0]


def test_chunked_rollout_scoring_gives_the_same_run(tmp_path):
    common = ["trainer.max_steps=3", "trainer.prompts_per_step=4", "trainer.dump_advantages=true"]
    a = train(cfg_for(tmp_path, "run.name=a", *common))
    b = train(cfg_for(tmp_path, "run.name=b", *common, "trainer.rollout_chunks=3"))
    assert torch.equal(a.policy.model.logits, b.policy.model.logits)
    mb = metrics(b.run_dir, drop_time=False)
    assert all("time/score_wait_s" in m for m in mb if "reward/mean" in m)


class _ThreadRecordingReward:
    """The bandit's arm value, recording the thread each call runs in; ``uses_policy`` as the factory says."""

    def __init__(self, uses_policy: bool):
        self.uses_policy, self.threads = uses_policy, []

    def __call__(self, samples, prompts, meta, ctx):
        import threading

        self.threads.append(threading.current_thread().name)
        return [float(ctx.policy.values[int(s)]) if hasattr(ctx.policy, "values") else float(s) for s in samples]


_MADE: list[_ThreadRecordingReward] = []


@pytest.mark.parametrize("wrapped", ["alone", "streams", "prs stage"])
@pytest.mark.parametrize("uses_policy", [False, True])
def test_chunked_scoring_of_a_reward_that_runs_the_policy_stays_in_the_main_thread(tmp_path, uses_policy, wrapped):
    """With trainer.rollout_chunks > 1, chunk c is scored in a thread while chunk c+1 is sampled, except a reward that
    runs the policy itself (``uses_policy``, ACRE's re-asking): it is scored between the chunks in the main thread,
    so the model never runs in two threads at once (under FSDP its collectives would interleave). Also when it is
    wrapped: given ``streams:`` (the stream filter) or as a stage of the ``prs`` composition. The run's first chunk is
    scored in the main thread by every reward: a reward's first call loads its model, which sets the process's
    default dtype meanwhile (transformers), so sampling beside it would make tensors of the model's dtype."""
    import threading

    name = f"test_thread_recording_{uses_policy}"
    if name not in REWARDS:
        register(name)(lambda: _MADE.append(_ThreadRecordingReward(uses_policy)) or _MADE[-1])
    stage = f"{{name: {name}, threshold: 0.0}}"
    spec = {"alone": f"{{name: {name}}}", "streams": f"{{name: {name}, streams: [a]}}",
            "prs stage": f"{{name: prs, options: {{stages: [{stage}]}}}}"}[wrapped]  # fmt: skip
    t = Trainer(cfg_for(tmp_path, f"rewards=[{spec}]", "trainer.max_steps=1", "trainer.prompts_per_step=3",
                        "trainer.rollout_chunks=3"), tmp_path / "run")  # fmt: skip
    t.collect(0)
    fn = _MADE[-1]  # the instance this trainer built
    main = threading.current_thread().name
    assert len(fn.threads) == 3 and (set(fn.threads) == {main}) == uses_policy, fn.threads
    # the run's first chunk is scored in the main thread whatever the reward (its first call may load a model)
    assert fn.threads[0] == main


class _CountingReward:
    """A stateful reward: bandit value plus a bonus that grows with the number of calls (a toy curriculum)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, samples, prompts, meta, ctx):
        if ctx.update_state:
            self.calls += 1
        return torch.tensor([m["arm_values"][int(a)] + 0.01 * self.calls for a, m in zip(samples, meta)])

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]

    def last_metrics(self):
        return {"counting/calls": float(self.calls)}


def test_stateful_reward_is_checkpointed_and_resumes_exactly(tmp_path):
    if "test_counting" not in REWARDS:
        register("test_counting")(lambda: _CountingReward())
    common = ["rewards=[{name: test_counting}]", "trainer.max_steps=6", "trainer.checkpoint_every=2"]
    full = train(cfg_for(tmp_path, "run.name=full", *common))
    part = train(cfg_for(tmp_path, "run.name=part", *common, "trainer.stop_after_steps=3"))
    train(cfg_for(tmp_path, "run.name=part", *common, f"resume={part.run_dir}"))
    assert metrics(part.run_dir) == metrics(full.run_dir)
    assert metrics(full.run_dir)[-1]["counting/calls"] == 6.0


def test_reward_restricted_to_streams_gives_nan_elsewhere():
    from mmgrpo.core.types import RewardContext
    from mmgrpo.train.config import RewardSpec
    from mmgrpo.train.scoring import build_rewards

    ((_, _, fn),) = build_rewards([RewardSpec(name="bandit_arm_value", streams=["reasoning"])])
    meta = [{"arm_values": [0.5, 1.0], "stream": s} for s in ("reasoning", "checklist", "reasoning")]
    out = fn(torch.tensor([1, 1, 0]), None, meta, RewardContext(group_size=3))
    assert out[0] == 1.0 and torch.isnan(out[1]) and out[2] == 0.5


def test_evaluation_images_give_a_before_after_picture(tmp_path):
    """The bandit's evaluation draws no images; give it some (a colour per step) to exercise the trainer."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    trainer = Trainer(cfg_for(tmp_path, "trainer.max_steps=4", "trainer.eval_every=2"), run_dir)
    bandit_eval, seen = trainer.comp.evaluate, []
    picture = run_dir / "samples" / "before_after.png"

    def evaluate(policy, step):
        seen.append((step, picture.is_file()))
        result = bandit_eval(policy, step)
        colour = torch.tensor([1.0, 0.0, 0.0]) if step == 0 else torch.tensor([0.0, 0.0, step / 4])
        images = colour.view(1, 3, 1, 1).expand(3, 3, 8, 8).clone()
        return EvalResult(result.metrics, images, captions=[f"prompt {i}" for i in range(3)])

    trainer.comp.evaluate = evaluate
    trainer.train()
    assert seen == [(0, False), (2, False), (4, True)]  # written from the second evaluation on
    arr = np.asarray(Image.open(picture).convert("RGB"))
    s = 8 * 16  # 8 px images enlarged as save_samples does (128 // 8)
    assert (arr == (255, 0, 0)).all(-1).sum() == 3 * s * s  # before: the step-0 evaluation
    assert (arr == (0, 0, 255)).all(-1).sum() == 3 * s * s  # after: the latest (step 4), overwriting step 2's
    assert trainer.first_eval[0] == 0 and trainer.first_eval[3].keys() == {"expected_reward", "best_arm_rate"}
    assert "samples/before_after.png" in (run_dir / "report.html").read_text()
    assert {p.name for p in (run_dir / "samples").iterdir()} == {
        "step_000000.png", "step_000002.png", "step_000004.png", "before_after.png", "first_eval.safetensors"
    }  # fmt: skip


def test_evaluations_without_images_draw_no_before_after(tmp_path):
    t = train(cfg_for(tmp_path, "trainer.max_steps=2", "trainer.eval_every=1"))  # bandit: metrics, no images
    assert t.first_eval is None and not (t.run_dir / "samples" / "before_after.png").exists()


def test_min_advantage_clamps_the_group_advantages(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}"], base={
        "pipeline": "bandit", "rewards": [{"name": "bandit_arm_value"}], "advantage": {"min_advantage": 0.0},
        "trainer": {"group_size": 3, "prompts_per_step": 1, "progress": False}})  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "r")
    rollout = trainer.policy.rollout(PromptBatch(prompts=[0], seeds=[1]), 3)
    # rewards [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3) -> GRPO [1.1547, -0.57735, -0.57735]; clamped at 0
    adv, _, metrics = trainer.advantage(torch.tensor([[[1.0, 0.0, 0.0]]]), rollout, step=0)
    assert torch.allclose(adv, torch.tensor([1.1547, 0.0, 0.0]), atol=1e-4)
    assert metrics["adv/mean"] == pytest.approx(1.1547 / 3, abs=1e-4)


def test_progress_bar_counts_the_time_budget_when_there_is_one(tmp_path):
    steps = Trainer(cfg_for(tmp_path, "trainer.progress=true"), tmp_path / "a")._progress()
    assert steps.total == 150 and steps.unit == "step"
    budget = Trainer(cfg_for(tmp_path, "trainer.progress=true", "trainer.time_budget_s=30"), tmp_path / "b")
    bar = budget._progress()
    assert bar.total == 30.0 and bar.unit == "s" and "time budget" in bar.bar_format
    steps.close()
    bar.close()


@pytest.mark.parametrize("clock", ["wall", "process"])
def test_time_budget_counts_its_clock_and_checkpoints_where_it_stops(tmp_path, monkeypatch, clock):
    """trainer.time_budget_clock: the budget reads time.perf_counter (wall) or time.process_time (CPU seconds of
    this process, unaffected by sharing the machine or being paused); the step that crosses it finishes, then the
    run saves and stops. A fake clock that advances 10 s per reading makes the stopping step exact."""
    ticks = iter(range(0, 10_000, 10))
    monkeypatch.setattr("time." + ("perf_counter" if clock == "wall" else "process_time"), lambda: float(next(ticks)))
    cfg = cfg_for(tmp_path, "trainer.time_budget_s=25", f"trainer.time_budget_clock={clock}")
    trainer = train(cfg)
    assert 1 <= trainer.step < 150  # stopped by the budget, not max_steps
    assert ckpt.latest_checkpoint(trainer.run_dir / "checkpoints").name == ckpt.step_dir_name(trainer.step)
    if clock == "process":  # only the budget reads process_time: start 0, then one reading per step (10, 20, 30)
        assert trainer.step == 3


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_mask_zero_adv_runs_in_the_trainer_and_its_normaliser(tmp_path, monkeypatch, aggregation):
    """loss.mask_zero_adv: the trainer drops zero-advantage rows from the mask (losses.mask_zero_advantages, the one
    implementation) before the aggregation counts its normaliser, so loss and denominator see the same units."""
    opts = ["loss.mask_zero_adv=true", f"loss.aggregation={aggregation}", "trainer.shuffle=false",
            "trainer.skip_zero_advantage=false"]  # every row reaches the loss, masked or not  # fmt: skip
    trainer_opts = {**BASE["trainer"], "prompts_per_step": 1, "group_size": 4}
    cfg = load_config(None, [f"run.output_dir={tmp_path}", *opts], base={**BASE, "trainer": trainer_opts})
    trainer = Trainer(cfg, tmp_path / "r")
    rollout = trainer.policy.rollout(PromptBatch(prompts=[0], seeds=[1]), 4)
    seen = []
    real = loss_lib.policy_loss
    monkeypatch.setattr(loss_lib, "policy_loss", lambda *a, **k: seen.append((a[3], k["denom"])) or real(*a, **k))
    adv = torch.tensor([1.0, 0.0, -1.0, 0.0])
    trainer.update(rollout, adv, torch.ones(4), step=0)
    ((mask, denom),) = seen
    assert mask.tolist() == [[True], [False], [True], [False]]  # K = 1 unit per bandit row
    # token_mean counts the 2 remaining units; seq_mean counts rows (all 4: a masked-out row still counts in n)
    assert denom == {"token_mean": 2.0, "seq_mean": 4.0}[aggregation]


def test_adamw_is_fused_on_plain_parameters_and_equals_the_loop_within_rounding(tmp_path):
    """optimizer_kernel: AdamW's fused kernel for plain parameters (torch's CPU default is the single-tensor loop),
    torch's default under FSDP (DTensors come later); five steps of both agree within float32 rounding."""
    from mmgrpo.train.accelerator import optimizer_kernel

    trainer = Trainer(cfg_for(tmp_path), tmp_path / "r")
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    params = [torch.nn.Parameter(torch.ones(3))]
    assert optimizer_kernel(params, "NO") == {"fused": True} and optimizer_kernel(params, "FSDP") == {}
    assert optimizer_kernel([torch.nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)], "NO") == {}
    torch.manual_seed(0)
    start, grads = torch.randn(1000), [torch.randn(1000) for _ in range(5)]
    out = []
    for kernel in ({}, optimizer_kernel(params, "NO")):
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=1e-4, **kernel)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach())
    assert not torch.equal(out[0], start) and torch.allclose(out[0], out[1], atol=1e-6, rtol=0)
