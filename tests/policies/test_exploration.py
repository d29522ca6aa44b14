"""Tests for mmgrpo.policies.exploration: hand-computed plans, coarse schedules and G²RPO advantages."""

import re

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.policies.exploration import (
    EXPLORATION,
    ExplorationPlan,
    FullExploration,
    SingularExploration,
    WindowExploration,
    coarse_schedule,
    full,
    multi_granularity_advantages,
    per_row_steps,
    singular,
    window,
    window_start,
)
from mmgrpo.policies.strategy import resolve_options


def _steps(mask):
    return torch.nonzero(mask).flatten().tolist()


# ------------------------------------------------------------------------------------- full


def test_full_all_steps():
    plan = full(6)
    assert plan.sde_mask.all() and plan.train_mask.all() and plan.branch_step is None
    assert plan.sde_mask.dtype == torch.bool and plan.num_steps == 6


def test_full_first_fraction():
    plan = full(10, timestep_fraction=0.3, selection="first")  # int(0.3 * 10) = 3 -> steps 0, 1, 2
    assert plan.train_steps == [0, 1, 2]
    assert plan.sde_mask.all()


def test_full_rounds_down_as_the_papers_code_and_trains_at_least_one_step():
    # Flow-GRPO's num_train_timesteps = int(sample.num_steps * train.timestep_fraction): 0.99 of 10 -> the first 9
    assert full(10, 0.99, "first").train_steps == list(range(9))
    assert len(full(16, 0.6).train_steps) == 9  # DanceGRPO's int(16 * 0.6) = int(9.6)
    assert len(full(10, 0.35, "first").train_steps) == 3  # int(3.5000000000000004)
    assert full(10, 0.01, "first").train_steps == [0]  # int(0.1) = 0 -> at least 1


def test_full_random_per_row_leaves_the_draw_to_each_row():
    """DanceGRPO's code draws a randperm of the T steps for every row and trains the first int(fraction x T)."""
    plan = full(16, 0.6, "random_per_row", generator=torch.Generator().manual_seed(0))
    assert plan.train_mask.all() and plan.sde_mask.all() and plan.per_row == 9  # int(9.6)
    assert full(8, 1.0, "random_per_row").per_row is None  # every step of every row: nothing to draw
    assert full(8, 0.5, "random").per_row is None and full(8, 0.5, "first").per_row is None
    with pytest.raises(UserError, match="per_row=5 steps a row, but 4 steps are trainable"):
        ExplorationPlan(torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool), per_row=5)


def test_per_row_steps_are_each_rows_own_seeded_and_uniform():
    plan = full(10, 0.3, "random_per_row")
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    mask = per_row_steps(plan, gens(5, 6), G=4)
    assert mask.shape == (8, 10) and mask.dtype == torch.bool
    assert (mask.sum(1) == 3).all()  # int(0.3 x 10) a row
    assert len({tuple(_steps(r)) for r in mask}) > 1  # rows draw their own subsets
    # a row's subset depends on its prompt's seed and its place in the group only, not on the batch around it
    assert torch.equal(per_row_steps(plan, gens(6), G=4), mask[4:])
    assert torch.equal(per_row_steps(plan, gens(9, 5), G=4)[4:], mask[:4])
    # the plan's trainable steps bound the draw
    window_plan = ExplorationPlan(torch.ones(6, dtype=torch.bool), torch.tensor([0, 1, 1, 0, 1, 0]).bool(), per_row=2)
    drawn = per_row_steps(window_plan, gens(1, 2, 3), G=2)
    assert (drawn.sum(1) == 2).all() and not drawn[:, [0, 3, 5]].any()
    counts = per_row_steps(plan, gens(*range(500)), G=4).float().sum(0)  # 2000 rows
    # each step with probability 3 / 10 -> 600 of 2000 (binomial sd ~ 20.5)
    assert ((counts - 600).abs() < 100).all(), counts
    assert torch.equal(per_row_steps(full(10, 0.3, "first"), gens(1), G=2), full(10, 0.3, "first").train_mask[None]
                       .expand(2, -1))  # fmt: skip


def test_full_random_is_sorted_seeded_and_uniform():
    a = full(10, 0.3, generator=torch.Generator().manual_seed(0))
    b = full(10, 0.3, generator=torch.Generator().manual_seed(0))
    assert a.train_steps == b.train_steps and len(a.train_steps) == 3
    assert a.train_steps == sorted(a.train_steps)
    counts = torch.zeros(10)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2000):
        counts += full(10, 0.3, generator=gen).train_mask.float()
    # each step is trained with probability 3 / 10 -> 600 of 2000 (binomial sd ~ 20.5)
    assert ((counts - 600).abs() < 100).all(), counts


def test_full_bad_values():
    with pytest.raises(UserError, match="timestep_fraction"):
        full(10, 0.0)
    with pytest.raises(UserError, match="unknown selection 'last'"):
        full(10, 0.5, selection="last")
    with pytest.raises(UserError, match="num_steps"):
        full(0)


# ------------------------------------------------------------------------------------- window


def test_window_progressive_hand_computed():
    # T = 10, w = 3, the window moves 2 steps every 2 training steps; last start T - w = 7
    plan = window(10, 3, training_step=0, shift_every=2, stride=2)
    assert _steps(plan.sde_mask) == [0, 1, 2] and _steps(plan.train_mask) == [0, 1, 2]
    assert _steps(window(10, 3, training_step=3, shift_every=2, stride=2).sde_mask) == [2, 3, 4]  # 3 // 2 = 1 -> 2
    assert _steps(window(10, 3, training_step=9, shift_every=2, stride=2).sde_mask) == [7, 8, 9]  # min(8, 7) = 7
    assert _steps(window(10, 3, training_step=99, shift_every=2, stride=2).sde_mask) == [7, 8, 9]  # sticks


def test_window_start_wrap_cycles_through_the_stick_positions():
    # last = 7, stride 2: stick visits 0, 2, 4, 6, 7 (then stays); wrap repeats that cycle of 5
    stick = [window_start(10, 3, s, stride=2) for s in range(7)]
    wrap = [window_start(10, 3, s, stride=2, at_end="wrap") for s in range(12)]
    assert stick == [0, 2, 4, 6, 7, 7, 7]
    assert wrap == [0, 2, 4, 6, 7, 0, 2, 4, 6, 7, 0, 2]
    with pytest.raises(UserError, match="unknown at_end"):
        window_start(10, 3, 0, at_end="bounce")


def test_window_random_starts_are_contiguous_and_cover_all_positions():
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        plan = window(6, 2, mode="random", generator=gen)
        steps = _steps(plan.sde_mask)
        assert len(steps) == 2 and steps[1] == steps[0] + 1
        assert torch.equal(plan.sde_mask, plan.train_mask)
        starts.add(steps[0])
    assert starts == {0, 1, 2, 3, 4}  # uniform over [0, T - w]


def test_window_bad_values():
    with pytest.raises(UserError, match="window_size"):
        window(5, 6)
    with pytest.raises(UserError, match="unknown window mode"):
        window(5, 2, mode="sliding")
    with pytest.raises(UserError, match="shift_every"):
        window(5, 2, shift_every=0)


# ------------------------------------------------------------------------------------- singular


def test_singular_one_branch_step():
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        plan = singular(10, [2, 5, 7], generator=gen)
        assert plan.branch_step in (2, 5, 7)
        assert _steps(plan.sde_mask) == [plan.branch_step]
        assert _steps(plan.train_mask) == [plan.branch_step]
        seen.add(plan.branch_step)
    assert seen == {2, 5, 7}
    with pytest.raises(UserError, match="branch_steps"):
        singular(10, [10])
    with pytest.raises(UserError, match="branch_steps"):
        singular(10, [])


def test_plan_rejects_trained_ode_steps():
    with pytest.raises(UserError, match=r"steps \[1\] are trained but deterministic"):
        ExplorationPlan(torch.tensor([True, False]), torch.tensor([True, True]))


def test_registry():
    assert EXPLORATION.names() == ["full", "singular", "window"]
    assert EXPLORATION.get("window") is WindowExploration
    assert "MixGRPO" in EXPLORATION.describe("window")
    assert "G²RPO" in EXPLORATION.describe("singular")
    assert "DanceGRPO" in EXPLORATION.describe("full")
    with pytest.raises(UserError, match="unknown exploration 'windows'.*did you mean 'window'"):
        EXPLORATION.get("windows")


def test_registered_schedules_plan_with_their_planners_and_own_their_options():
    """The policy only calls schedule.plan(T, training_step, generator); each schedule runs its planner."""
    opts = resolve_options(EXPLORATION, {"name": "window", "size": 3, "shift_every": 2}, "exploration")
    plan = EXPLORATION.get("window")(opts).plan(10, 5, None)
    assert torch.equal(plan.sde_mask, window(10, 3, 5, "progressive", 2).sde_mask)  # start 5 // 2 = 2
    assert plan.train_steps == [2, 3, 4]
    assert EXPLORATION.get("window")(WindowExploration.Options(size=20)).plan(4, 0, None).train_steps == [0, 1, 2, 3]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    full_plan = FullExploration(FullExploration.Options(timestep_fraction=0.5)).plan(8, 0, g1)
    assert torch.equal(full_plan.train_mask, full(8, 0.5, "random", g2).train_mask)
    branch = SingularExploration(SingularExploration.Options(branch_steps=[1, 9], granularities=[1, 3]))
    plan = branch.plan(4, 0, None)  # steps >= T are dropped
    assert plan.branch_step == 1 and plan.granularities == (1, 3)


@pytest.mark.parametrize(
    "block, match",
    [
        ({"name": "full", "timestep_fraction": 0.0}, r"timestep_fraction must be in \(0, 1\]"),
        ({"name": "full", "selection": "last"}, "selection"),
        ({"name": "window", "size": 0}, "size and shift_every must be >= 1"),
        ({"name": "window", "window_size": 2}, "did you mean 'exploration.size'"),
        ({"name": "singular", "granularities": [0, 1]}, "granularities must be >= 1"),
        ({"name": "singular", "timestep_fraction": 0.5}, "it is an option of full"),
        ({"name": "windows"}, "did you mean 'window'"),
        ({"size": 2}, r"gives options \(size\) but no exploration name: add exploration.name=window;"),
        ({"size": 2, "bogus": 1}, r"gives options \(size, bogus\) but no exploration name: no exploration takes all"),
        (["full"], r"expected a name or a mapping with its name and options, e.g. \{name: full\}"),
    ],
)
def test_schedule_options_are_checked_when_built(block, match):
    with pytest.raises(UserError, match=match):
        resolve_options(EXPLORATION, block, "exploration")


# ------------------------------------------------------------------------------------- coarse schedule


def test_coarse_schedule_t10():
    sigmas = torch.linspace(1, 0, 11)  # T = 10: 1.0, 0.9, ..., 0.1, 0.0
    # k = 2, lambda = 3: indices 3, 6, 9, then the final 10
    assert torch.allclose(coarse_schedule(sigmas, 2, 3), torch.tensor([0.7, 0.4, 0.1, 0.0]))
    # k = 2, lambda = 2: indices 3, 5, 7, 9, 10
    assert torch.allclose(coarse_schedule(sigmas, 2, 2), torch.tensor([0.7, 0.5, 0.3, 0.1, 0.0]))
    # k = 1, lambda = 4: indices 2, 6, 10 (already ends at the final sigma: no duplicate)
    assert torch.allclose(coarse_schedule(sigmas, 1, 4), torch.tensor([0.8, 0.4, 0.0]))
    # lambda = 1 is the original schedule after the branch step; lambda larger than the rest: k + 1 then 0
    assert torch.equal(coarse_schedule(sigmas, 2, 1), sigmas[3:])
    assert torch.allclose(coarse_schedule(sigmas, 2, 50), torch.tensor([0.7, 0.0]))
    assert torch.equal(coarse_schedule(sigmas, 9, 3), torch.tensor([0.0]))  # last branch step: nothing left


def test_coarse_schedule_bad_values():
    sigmas = torch.linspace(1, 0, 11)
    with pytest.raises(UserError, match="branch step k"):
        coarse_schedule(sigmas, 10, 2)
    with pytest.raises(UserError, match="granularity"):
        coarse_schedule(sigmas, 2, 0)


# ------------------------------------------------------------------------------------- G²RPO advantages


def test_multi_granularity_advantages_hand_computed():
    rewards = torch.tensor(
        [
            [[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]],  # granularity 1, groups b = 0, 1
            [[0.0, 0.0, 6.0], [1.0, 2.0, 3.0]],  # granularity 2
        ]
    )  # [L=2, B=2, G=3]
    adv = multi_granularity_advantages(rewards)
    # b=0, l=1: mean 2, unbiased std 1 -> [-1, 0, 1]
    #      l=2: mean 2, std sqrt((4 + 4 + 16) / 2) = sqrt(12) = 3.4641 -> [-0.57735, -0.57735, 1.15470]
    #      sum  -> [-1.57735, -0.57735, 2.15470]
    # b=1, l=1: all equal -> exactly 0; l=2: [-1, 0, 1]; sum -> [-1, 0, 1]
    expected = torch.tensor([[-1.57735, -0.57735, 2.15470], [-1.0, 0.0, 1.0]])
    assert adv.shape == (2, 3)
    assert torch.allclose(adv, expected, atol=1e-5)


def test_multi_granularity_with_estimator_fn_and_core_estimator():
    rewards = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 6.0]]])  # [L=2, B=1, G=3]
    centred = multi_granularity_advantages(rewards, estimator_fn=lambda r: r - r.mean(-1, keepdim=True))
    # l=1: [-1, 0, 1]; l=2: mean 2 -> [-2, -2, 4]; sum [-3, -2, 5]
    assert torch.allclose(centred, torch.tensor([[-3.0, -2.0, 5.0]]))
    pytest.importorskip("mmgrpo.core.advantages")
    assert torch.allclose(multi_granularity_advantages(rewards, "dr_grpo"), torch.tensor([[-3.0, -2.0, 5.0]]))
    with pytest.raises(UserError, match="unknown estimator 'nope'"):
        multi_granularity_advantages(rewards, "nope")


def test_multi_granularity_needs_groups():
    with pytest.raises(UserError, match="G >= 2"):
        multi_granularity_advantages(torch.ones(2, 3, 1))
    with pytest.raises(UserError, match=r"\[L, B, G\]"):
        multi_granularity_advantages(torch.ones(3, 2))


def test_a_schedule_that_does_not_fit_the_sampling_steps_is_named_at_load():
    """A MixGRPO window as long as the sampling slid nowhere (capped silently: the run was Flow-GRPO's full
    exploration); G2RPO branch steps all past the sampling were an error at the first rollout, after the models
    loaded, naming an empty list."""
    import warnings

    from mmgrpo.train.config import load_config

    sde = ["policy.options.num_steps=4", "policy.options.objective={name: sde}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("configs/shapes_t2i_grpo.yaml", [*sde, "policy.options.exploration={name: window, size: 3}"])
        load_config("configs/shapes_t2i_grpo.yaml", [*sde, "policy.options.exploration={name: singular}"])
    with pytest.raises(UserError, match=r"branch_steps=\[4, 6\]: every branch step is past the 4 sampling steps"):
        load_config("configs/shapes_t2i_grpo.yaml",
                    [*sde, "policy.options.exploration={name: singular, branch_steps: [4, 6]}"])  # fmt: skip


def test_a_window_that_never_slides_is_warned_about_when_training_starts_not_at_every_load():
    """The warning fired at every load of the run's config: `mmgrpo sample --run` and `mmgrpo export` too, where it
    says nothing about what they do; now when the trainer builds its components (once per training process)."""
    import warnings

    from mmgrpo.train.components import build_components
    from mmgrpo.train.config import load_config

    over = ["policy.options.num_steps=4", "policy.options.objective={name: sde}",
            "policy.options.exploration={name: window, size: 4}", "loss={name: grpo}"]  # fmt: skip
    with warnings.catch_warnings(record=True) as at_load:
        warnings.simplefilter("always")
        cfg = load_config("configs/shapes_t2i_grpo.yaml", over)  # what sample, export and a resume read
    assert [str(w.message) for w in at_load] == []
    with warnings.catch_warnings(record=True) as at_start:
        warnings.simplefilter("always")
        build_components(cfg)
    said = [str(w.message) for w in at_start if "exploration.size" in str(w.message)]
    assert len(said) == 1 and re.search(r"size=4 covers all 4 sampling steps .*never slides.*size=1", said[0]), said
