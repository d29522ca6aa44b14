"""MedLoc-R1 IoU curriculum (mmgrpo/methods/medloc.py): hand-computed transitions, resume exactness, the reward."""

import json

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.methods.medloc import IoUCurriculum, cosine_delta, pass_thresholds, step_delta
from mmgrpo.rewards import registry


def test_tables_switch_at_their_boundaries():
    # (P, S): (0.80, 0.20) below 0.6, (0.75, 0.35) below 0.75, else (0.55, 0.40)
    assert pass_thresholds(0.3) == (0.80, 0.20)
    assert pass_thresholds(0.5999) == (0.80, 0.20)
    assert pass_thresholds(0.6) == (0.75, 0.35)
    assert pass_thresholds(0.7499) == (0.75, 0.35)
    assert pass_thresholds(0.75) == (0.55, 0.40)
    # delta: 0.15 below 0.55, 0.10 below 0.75, then 0.05
    assert [step_delta(t) for t in (0.3, 0.5499, 0.55, 0.7499, 0.75, 0.8)] == [0.15, 0.15, 0.10, 0.10, 0.05, 0.05]
    # cosine: 0.15 * (1 + cos(pi * (0.45 - 0.3) / 0.5)) / 2 = 0.075 * (1 + cos(0.3 pi)) = 0.075 * 1.587785 = 0.119084
    assert cosine_delta(0.3, 0.3, 0.8) == pytest.approx(0.15)
    assert cosine_delta(0.45, 0.3, 0.8) == pytest.approx(0.119084, abs=1e-6)
    assert cosine_delta(0.7, 0.3, 0.8) == 0.05  # 0.075 * (1 + cos(0.8 pi)) = 0.0143 -> floor 0.05


def test_no_raise_at_29_entries_raise_at_30_and_keep_newest_15():
    cur = IoUCurriculum()  # tau0 0.3, window 30, margin 0.1
    ious = [0.50 + i / 100 for i in range(30)]  # entry i has IoU 0.50 + i/100: identifies it in the window
    for i in range(29):
        assert cur.update([1.0], [ious[i]]) is False  # window not full yet
    assert len(cur.rewards) == 29 and cur.tau == 0.3
    # entry 30: mean r 1 >= 0.8, std 0 <= 0.2, mean IoU (0.50 + 0.79) / 2 = 0.645 - 0.3 = 0.345 >= 0.1 -> raise
    assert cur.update([1.0], [ious[29]]) is True
    assert cur.tau == 0.45  # 0.3 + 0.15 (tau < 0.55), rounded: no 0.44999999999999996
    assert cur.ious == pytest.approx(ious[15:])  # the newest N/2 = 15 entries
    assert cur.last_metrics() == {"curriculum/tau": 0.45, "curriculum/window": 15}
    # refill: 14 more entries -> 29, no raise; the 15th -> 30: mean IoU 0.6 - 0.45 = 0.15 >= 0.1 -> 0.45 + 0.15 = 0.6
    for _ in range(14):
        assert cur.update([1.0], [0.6]) is False
    assert cur.update([1.0], [0.6]) is True and cur.tau == 0.6


def test_one_update_pushes_one_entry_per_group():
    cur = IoUCurriculum(window=4)
    assert cur.update([1.0, 1.0, 1.0], [0.9, 0.9, 0.9]) is False  # 3 groups -> 3 entries
    assert cur.update([1.0, 1.0], [0.9, 0.9]) is True  # 5 pushed, the window keeps the newest 4 -> full -> raise
    assert len(cur.rewards) == 2  # 4 // 2


def test_each_condition_blocks_the_raise():
    # rewards: 24 groups at 1.0 and 6 at 0.0: mean 0.8 >= 0.8 but std sqrt(0.8 * 0.2) = 0.4 > 0.2 -> no raise
    cur = IoUCurriculum()
    assert cur.update([1.0] * 24 + [0.0] * 6, [0.9] * 30) is False
    # alternating 0.75 / 0.85: mean 0.8, std 0.05 -> raise
    cur = IoUCurriculum()
    assert cur.update([0.75, 0.85] * 15, [0.9] * 30) is True
    # mean 0.79 < 0.8 -> no raise
    cur = IoUCurriculum()
    assert cur.update([0.79] * 30, [0.9] * 30) is False
    # margin: mean IoU 0.35 - 0.3 = 0.05 < 0.1 -> no raise; 0.45 - 0.3 = 0.15 -> raise
    cur = IoUCurriculum()
    assert cur.update([1.0] * 30, [0.35] * 30) is False
    cur = IoUCurriculum()
    assert cur.update([1.0] * 30, [0.45] * 30) is True


def test_std_is_the_population_std():
    # window 4, rewards [1, 1, 0.55, 1]: mean 0.8875; squared deviations 3 * 0.1125^2 + 0.3375^2 = 0.151875
    # population std sqrt(0.151875 / 4) = 0.1949 <= 0.2 -> raise; the sample std sqrt(0.151875 / 3) = 0.225 would not
    cur = IoUCurriculum(window=4)
    assert cur.update([1.0, 1.0, 0.55, 1.0], [0.9] * 4) is True


@pytest.mark.parametrize(
    "tau0, reward, raised, new_tau",
    [
        (0.55, 0.79, False, 0.55),  # P(0.55) = 0.80: 0.79 fails
        (0.55, 0.80, True, 0.65),  # delta(0.55) = 0.10
        (0.5, 0.80, True, 0.65),  # delta(0.5) = 0.15
        (0.6, 0.76, True, 0.7),  # P(0.6) = 0.75: 0.76 passes; delta 0.10
        (0.5999, 0.76, False, 0.5999),  # still P = 0.80 just below 0.6
        (0.75, 0.56, True, 0.8),  # P(0.75) = 0.55; delta 0.05 -> 0.8
        (0.7499, 0.56, False, 0.7499),  # P = 0.75 just below 0.75
    ],
)
def test_thresholds_switch_in_transitions(tau0, reward, raised, new_tau):
    cur = IoUCurriculum(tau0=tau0, window=2)
    assert cur.update([reward, reward], [1.0, 1.0]) is raised  # std 0, IoU margin 1 - tau0 >= 0.1
    assert cur.tau == new_tau


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("step", [0.45, 0.6, 0.7, 0.8]),  # +0.15 (0.3 < 0.55), +0.15 (0.45 < 0.55), +0.10, +0.10 -> capped at 0.8
        ("linear", [0.4, 0.5, 0.6, 0.7, 0.8]),  # +0.1 each
        # cosine: +0.15, +0.119084, +0.075 (1 + cos(pi 0.538168)) = 0.066028, then the 0.05 floor, capped at 0.8
        ("cosine", [0.45, 0.569084, 0.635112, 0.685112, 0.735112, 0.785112, 0.8]),
    ],
)
def test_schedules_until_the_cap(schedule, expected):
    cur = IoUCurriculum(window=2, schedule=schedule)
    cur.update([1.0], [1.0])  # half a window
    taus = []
    for _ in range(10):  # window 2 keeps 1 entry after a raise, so each further entry can raise again
        if cur.update([1.0], [1.0]):
            taus.append(cur.tau)
    assert taus == pytest.approx(expected, abs=1e-9)
    assert cur.tau == 0.8 and cur.update([1.0], [1.0]) is False  # no raise past tau_max


def _sequence(n: int) -> list[tuple[list[float], list[float]]]:
    torch.manual_seed(0)
    r = (0.8 + 0.2 * torch.rand(n, 3)).tolist()  # 3 groups per step, group-mean rewards in [0.8, 1]
    iou = (0.6 + 0.4 * torch.rand(n, 3)).tolist()
    return list(zip(r, iou))


def test_resume_mid_window_is_exact():
    steps = _sequence(40)
    full = IoUCurriculum()
    trace_full = [(full.update(r, i), full.tau, list(full.rewards)) for r, i in steps]
    assert sum(raised for raised, _, _ in trace_full) >= 2  # the run does raise, so the test can fail

    first = IoUCurriculum()
    trace = [(first.update(r, i), first.tau, list(first.rewards)) for r, i in steps[:17]]
    assert 0 < len(first.rewards) < first.window  # stopped mid-window
    state = json.loads(json.dumps(first.state_dict()))  # plain data: survives the checkpoint's JSON
    resumed = IoUCurriculum()
    resumed.load_state_dict(state)
    trace += [(resumed.update(r, i), resumed.tau, list(resumed.rewards)) for r, i in steps[17:]]
    assert trace == trace_full


def _box(x2: float) -> str:
    return f"<think>look</think><answer>[0, 0, {x2}, 10]</answer>"


def test_reward_scores_threshold_and_feeds_the_window():
    fn = registry.get("iou_curriculum", family="absolute", window=2)
    assert fn.group_aware
    gt = {"box": [0, 0, 10, 10]}
    # IoU with [0, 0, 10, 10]: x2 = 10 -> 1.0, 5 -> 0.5, 2 -> 0.2, no box -> 0.0
    samples = [_box(10), _box(5), _box(2), "no box", _box(10), _box(5)]
    meta = [gt, gt, gt, gt, gt, {}]  # the last row has no ground truth: None, left out of the group mean
    ctx = RewardContext(group_size=2)
    out = fn(samples, None, meta, ctx)
    assert out == [1.0, 1.0, 0.0, 0.0, 1.0, None]  # 1[IoU >= 0.3]
    # window (newest 2 of 3 groups): group 2 -> (0, 0.1), group 3 -> (1.0, 1.0) (only row 4 counts)
    assert fn.curriculum.rewards == [0.0, 1.0] and fn.curriculum.ious == pytest.approx([0.1, 1.0])
    assert fn.curriculum.tau == 0.3  # mean r 0.5 < 0.8
    assert fn.last_metrics() == {"curriculum/tau": 0.3, "curriculum/window": 2}
    # two perfect groups: raise to 0.45; the next call thresholds at 0.45, so IoU 0.5 still passes and 0.2 fails
    fn([_box(10)] * 4, None, [gt] * 4, ctx)
    assert fn.curriculum.tau == 0.45
    assert fn([_box(5), _box(2)], None, [gt, gt], ctx) == [1.0, 0.0]


def test_reward_state_dict_round_trip():
    a = registry.get("iou_curriculum", family="absolute", window=4)
    gt = {"box": [0, 0, 10, 10]}
    ctx = RewardContext(group_size=2)
    for _ in range(3):
        a([_box(10), _box(9)], None, [gt, gt], ctx)
    b = registry.get("iou_curriculum", family="absolute", window=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for x2 in (10, 8, 6, 10, 10):
        assert a([_box(x2), _box(10)], None, [gt, gt], ctx) == b([_box(x2), _box(10)], None, [gt, gt], ctx)
        assert a.state_dict() == b.state_dict()
    assert a.curriculum.tau > 0.3


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="step, linear, cosine"):
        registry.get("iou_curriculum", schedule="exp")
    with pytest.raises(UserError, match="tau0"):
        IoUCurriculum(tau0=0.9, tau_max=0.8)
    with pytest.raises(UserError, match="window"):
        IoUCurriculum(window=1)
