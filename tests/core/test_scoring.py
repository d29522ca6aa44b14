"""Phase 2's guards: a non-finite, non-numeric or raising reward stops the run with one paragraph naming it."""

import math

import numpy as np
import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.rewards.registry import register
from mmgrpo.train.cli import main
from mmgrpo.train.scoring import call_reward, to_column


def test_numbers_none_and_arrays_make_a_column():
    col = to_column("r", [1, 2.5, None, np.float32(0.5), torch.tensor(3.0)], 5)
    assert col.dtype == torch.float32 and col[:2].tolist() == [1.0, 2.5] and math.isnan(col[2])
    assert col[3:].tolist() == [0.5, 3.0]
    assert to_column("r", np.array([1, 2]), 2).tolist() == [1.0, 2.0]
    assert to_column("r", torch.tensor([[1.0], [2.0]]), 2).tolist() == [1.0, 2.0]  # a reward model's [N, 1] logits
    assert to_column("r", torch.tensor([[1.0, 2.0]]), 2).tolist() == [1.0, 2.0]  # CLIP's logits_per_text [1, N]
    assert to_column("r", np.ones((2, 1, 1)), 2).tolist() == [1.0, 1.0]
    # a 2-D table was flattened in memory order: a [G, B] one scored every row with another row's reward
    with pytest.raises(UserError, match=r"a tensor of shape \[2, 3\] for 6 rows; expected \[6\] \(or \[6, 1\]"):
        to_column("r", torch.zeros(2, 3), 6)


@pytest.mark.parametrize(
    "value, match",
    [
        (torch.tensor([0.0, math.inf, 1.0]), r"reward 'r' returned non-finite values \(row 1: inf"),
        ([0.0, 1.0, -math.inf], r"row 2: -inf; 1 of 3 rows"),
        ([float("nan"), 1.0, 0.0], r"row 0: nan"),
        (torch.tensor([math.nan] * 3), r"3 of 3 rows"),
        (["111", 1.0, 0.0], r"returned '111' \(str\) among its values"),
        ([{"score": 1}, 1.0, 0.0], r"\(dict\) among its values"),
        ({"a": 1}, r"returned dict; expected Tensor\[N\] or a list"),
        ("111", r"returned str"),
        (torch.tensor([True, False, True]), r"torch.bool tensor"),
        ([1.0, 2.0], r"returned 2 values for 3 rows"),
        # finite values fp32 cannot hold were "non-finite (row 0: inf)"; an int beyond any float and a list of
        # multi-element tensors were OverflowError / ValueError tracebacks
        ([1e39, 0.0, 1.0], r"values too large for fp32 \(row 0: 1e\+39; 1 of 3 rows\)"),
        (torch.tensor([0.0, -1e300, 1.0], dtype=torch.float64), r"too large for fp32 \(row 1: -1e\+300"),
        ([0, 10**400, 1], r"returned 1000.* for row 1: too large for a float"),
        ([torch.tensor([1.0, 2.0])] * 3, r"a tensor of shape \[2\] as row 0's value; a reward gives one number"),
    ],
)
def test_bad_reward_values_are_user_errors_naming_the_reward(value, match):
    with pytest.raises(UserError, match=match):
        to_column("r", value, 3)


def test_groups_whose_scored_rows_tie_are_uninformative_whatever_the_unscored_rows():
    """Rows a reward does not apply to (NaN) are left out of the tie test as the estimators leave them out of their
    statistics: counted as 0, group 0 below ([1, -, 1] under the one reward) looked spread, so DAPO's dynamic
    sampling kept a group whose advantages are all 0. Under normalize_then_sum each reward's scored rows are tested
    alone (group 0: [1, -, 1] and [.5, .5, -] tie each, though their sums 1.5, .5, 1 do not)."""
    from mmgrpo.train.scoring import uninformative_groups

    nan = math.nan
    one = [("a", 1.0, None)]
    cols = torch.tensor([[1.0, nan, 1.0, 0.0, 1.0, nan]])  # groups of 3: [1, -, 1] and [0, 1, -]
    assert uninformative_groups(cols, one, [3, 3], "sum_then_normalize").tolist() == [True, False]
    two = [("a", 1.0, None), ("b", 1.0, None)]
    cols = torch.tensor([[1.0, nan, 1.0, 0.0, 1.0, nan], [0.5, 0.5, nan, nan, nan, nan]])
    assert uninformative_groups(cols, two, [3, 3], "sum_then_normalize").tolist() == [False, False]
    assert uninformative_groups(cols, two, [3, 3], "normalize_then_sum").tolist() == [True, False]
    none = torch.full((1, 4), nan)  # no row scored: nothing to learn from
    assert uninformative_groups(none, one, [2, 2], "sum_then_normalize").tolist() == [True, True]


def test_under_the_posterior_combiner_a_group_of_wrong_answers_is_uninformative_whatever_their_process_rewards():
    """Posterior-GRPO hands its estimator the gated sum: a group whose answers are all wrong has process rewards
    gated to 0 and ties (advantages all 0), though its plain sum is spread: DAPO's dynamic sampling kept it and
    adv/zero_variance_groups missed it."""
    from mmgrpo.train.scoring import uninformative_groups

    two = [("accuracy", 1.0, None), ("reasoning", 0.5, None)]
    kinds = ["outcome", "process"]
    cols = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 1.0], [0.2, 0.9, 0.5, 0.3, 0.3, 0.3]])  # groups of 3
    assert uninformative_groups(cols, two, [3, 3], "posterior", kinds).tolist() == [True, False]
    assert uninformative_groups(cols, two, [3, 3], "sum_then_normalize", kinds).tolist() == [False, False]
    # this step's weights (dynamic reward weighting) decide, not the configured ones: reasoning weighted 0 here
    now = torch.tensor([1.0, 0.0])
    assert uninformative_groups(cols, two, [3, 3], "sum_then_normalize", kinds, weights=now).tolist() == [True, False]


def test_nan_is_not_applicable_only_when_the_reward_declares_it():
    def judge(samples, prompts, meta, ctx):
        return torch.tensor([1.0, math.nan])

    with pytest.raises(UserError, match="nan_means_not_applicable"):
        call_reward("judge", judge, None, ["a", "b"], [{}, {}], RewardContext(group_size=2))
    judge.nan_means_not_applicable = True
    col = call_reward("judge", judge, None, ["a", "b"], [{}, {}], RewardContext(group_size=2))
    assert col[0] == 1.0 and math.isnan(col[1])
    judge_inf = lambda *a: torch.tensor([1.0, math.inf])  # noqa: E731
    judge_inf.nan_means_not_applicable = True  # declaring NaN does not excuse inf
    with pytest.raises(UserError, match="row 1: inf"):
        call_reward("judge", judge_inf, None, ["a", "b"], [{}, {}], RewardContext(group_size=2))


def test_a_raising_reward_is_named_with_a_capped_message():
    def broken(samples, prompts, meta, ctx):
        raise KeyError("x" * 5000)

    with pytest.raises(
        UserError, match=r"reward 'broken' raised KeyError in step 8 \(ctx.step 7\): .*\(\d+ characters\)"
    ) as e:
        call_reward("broken", broken, None, ["a"], [{}], RewardContext(group_size=1, step=7))
    assert len(str(e.value)) < 600 and isinstance(e.value.__cause__, KeyError)


_calls = {"n": 0}


@register("test_inf_at_step_2")
def _inf_at_step_2():
    """Test-only: the bandit's arm value, but +inf for one row at step 2."""

    def fn(samples, prompts, meta, ctx):
        _calls["n"] += 1
        out = [float(m["arm_values"][int(a)]) for a, m in zip(samples, meta)]
        if ctx.step == 2:
            out[3] = math.inf
        return out

    return fn


@register("test_never_applies")
def _never_applies():
    """Test-only: None for every row."""
    return lambda samples, prompts, meta, ctx: [None] * len(meta)


BANDIT = [
    "pipeline=bandit", "data.options={num_prompts: 4, num_arms: 3}", "trainer.max_steps=4",
    "trainer.prompts_per_step=2", "trainer.group_size=3", "trainer.progress=false", "trainer.checkpoint_every=1",
]  # fmt: skip


def test_an_inf_reward_stops_the_run_non_zero_with_the_checkpoints_before_it_intact(tmp_path, capsys):
    """The probe of the issue: one inf used to turn every later loss NaN and the run exited 0."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rewards: [{name: test_inf_at_step_2}]\n")
    code = main(["train", str(cfg), *BANDIT, f"run.output_dir={tmp_path}", "run.name=r"])
    err = capsys.readouterr().err
    assert code == 2 and "reward 'test_inf_at_step_2' returned non-finite values (row 3: inf" in err
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["step_000001", "step_000002"]  # steps 0 and 1 finished; step 2 (the third) never updated


def test_a_reward_that_applies_to_no_row_warns(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rewards: [{name: test_never_applies}]\n")
    code = main(["train", str(cfg), *BANDIT, "trainer.max_steps=1", f"run.output_dir={tmp_path}", "run.name=w"])
    assert code == 0  # a warning, not an error: the step trains nothing (all advantages 0) and the run goes on
    err = " ".join(capsys.readouterr().err.split())  # the CLI prints mmgrpo's warnings as "warning: ..."
    assert "warning: reward 'test_never_applies' applies to none of the 6 rows of step 1" in err
    assert (tmp_path / "w" / "metrics.jsonl").read_text().count("\n") == 1


def test_two_rewards_of_one_name_keep_their_own_metrics(tmp_path, capsys):
    """The same reward twice (here with other streams: the second applies to no row): the second logs
    reward/<name>_<i> (one key overwrote the other: the first's mean was replaced by the second's null)."""
    import json

    cfg = tmp_path / "c.yaml"
    cfg.write_text("rewards: [{name: bandit_arm_value}, {name: bandit_arm_value, streams: [nowhere]}]\n")
    assert main(["train", str(cfg), *BANDIT, "trainer.max_steps=1", f"run.output_dir={tmp_path}", "run.name=d"]) == 0
    assert "applies to none" in " ".join(capsys.readouterr().err.split())
    line = json.loads((tmp_path / "d" / "metrics.jsonl").read_text())
    assert isinstance(line["reward/bandit_arm_value"], float) and line["reward/bandit_arm_value_1"] is None


def test_a_reward_that_changes_its_inputs_reaches_no_later_reward_or_update():
    """A reward zeroing the samples in place made the update train on other actions (the bandit's log-probs are of
    the sample tensor) and `mmgrpo sample` save black pictures; one clearing the prompts gave the next reward
    none. The lists are the reward's own copies; a changed sample tensor is a UserError."""
    ctx = RewardContext(group_size=2, step=3)
    prompts, meta = ["a", "b"], [{"answer": 1}, {"answer": 2}]

    def clears(samples, prompts, meta, ctx):
        prompts.clear()
        meta[0]["answer"] = 9
        meta.append({})
        return [1.0, 2.0]

    assert call_reward("clears", clears, torch.zeros(2), prompts, meta, ctx).tolist() == [1.0, 2.0]
    assert prompts == ["a", "b"] and meta == [{"answer": 1}, {"answer": 2}]

    def zeroes(samples, prompts, meta, ctx):
        out = samples.float().clone()
        samples[0].zero_()  # through a view: the base's version counter moves too
        return out

    samples = torch.ones(2, 3, 4, 4)
    with pytest.raises(
        UserError, match=r"reward 'zeroes' changed the samples it scores in place in step 4 \(ctx.step 3\).*clone"
    ):
        call_reward("zeroes", zeroes, samples, prompts, meta, ctx)
    videos = [torch.ones(2, 3, 4, 4), torch.ones(3, 3, 4, 4)]  # ragged videos: a list of tensors
    with pytest.raises(UserError, match="changed the samples"):
        call_reward("v", lambda s, p, m, c: [float(s[1].mul_(2).mean()), 0.0], videos, prompts, meta, ctx)
    assert call_reward("reads", lambda s, p, m, c: s.mul(255).mean((1, 2, 3)), samples, prompts, meta, ctx).shape == (
        2,
    )


def test_a_reward_calling_sys_exit_is_named():
    """sys.exit() in a reward ended `mmgrpo train` with its code and no message, its run directory removed."""

    def quits(samples, prompts, meta, ctx):
        raise SystemExit(3)

    with pytest.raises(
        UserError, match=r"reward 'quits' called sys.exit\(3\) in step 6 \(ctx.step 5\); a reward returns its scores"
    ):
        call_reward("quits", quits, None, ["a"], [{}], RewardContext(group_size=1, step=5))


def test_a_reward_on_streams_is_named_as_configured(tmp_path, capsys):
    """With streams: set, errors named the inner function ("reward 'fn' returned non-finite values")."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rewards: [{name: test_inf_at_step_2, streams: [main]}]\n")
    code = main(["train", str(cfg), *BANDIT, "trainer.checkpoint_every=0", f"run.output_dir={tmp_path}", "run.name=s"])
    err = capsys.readouterr().err
    assert code == 2 and "reward 'test_inf_at_step_2' returned non-finite values" in err, err


@register("test_scaled_arm_value")
def _scaled_arm_value(scale: float = 1.0):
    """Test-only: the bandit's arm value times ``scale``."""
    return lambda samples, prompts, meta, ctx: [scale * float(m["arm_values"][int(a)]) for a, m in zip(samples, meta)]


@pytest.mark.parametrize(
    "reward, named",
    [
        ("{name: test_scaled_arm_value, options: {scale: 1.0e+20}}", "reward 'test_scaled_arm_value' returned "),
        (
            "{name: test_scaled_arm_value, weight: 1.0e+12, options: {scale: 1.0e+9}}",
            "the weighted sum of the rewards",
        ),
    ],
)
def test_rewards_whose_squares_overflow_fp32_stop_the_run(tmp_path, capsys, reward, named):
    """Rewards of ~1e20 (or a weight making them so) squared to inf in the group std: every advantage 0, the run
    trained nothing and exited 0 (`reward/mean` null in metrics.jsonl)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"rewards: [{reward}]\n")
    code = main(["train", str(cfg), *BANDIT, "trainer.checkpoint_every=0", f"run.output_dir={tmp_path}", "run.name=h"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and named in err and "beyond 1e+15 in size" in err, err
    assert "in step 1 (ctx.step 0)" in err, err  # counted as the rest of the paragraph counts
    assert not (tmp_path / "h").exists()  # nothing trained: the new run directory is removed
