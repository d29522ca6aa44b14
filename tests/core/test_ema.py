"""The trainer's EMA (mmgrpo/core/ema.py): plain decay, and Flow-GRPO's warm-up and update interval, by hand."""

import pytest
import torch

from mmgrpo.core.ema import EMA
from mmgrpo.core.errors import UserError


def _walk(ema: EMA, param: torch.nn.Parameter, values: list[float]) -> list[float]:
    """Set the parameter to each value, call update(), and record the shadow after each call."""
    out = []
    for v in values:
        with torch.no_grad():
            param.fill_(v)
        ema.update()
        out.append(float(ema.shadow[0]))
    return out


def test_plain_decay_moves_at_every_call():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([p], 0.9)
    # s1 = 0.9 * 0 + 0.1 * 1 = 0.1; s2 = 0.9 * 0.1 + 0.1 * 2 = 0.29
    assert _walk(ema, p, [1.0, 2.0]) == pytest.approx([0.1, 0.29], abs=1e-7)
    assert ema.calls == 2


def test_flow_grpo_warmup_and_interval_by_hand():
    """Flow-GRPO's SD3 recipe: decay 0.9, every 8, warm-up min(0.9, (1 + n) / (10 + n)) at call n."""
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([p], 0.9, warmup=True, every=8)
    seen = _walk(ema, p, [float(n) for n in range(1, 24)])  # the parameter equals n at call n
    assert seen[:6] == [0.0] * 6  # calls 1-6: (n + 1) % 8 != 0, the shadow stays at the initial 0
    d7 = 8 / 17  # call 7: min(0.9, 8 / 17 = 0.4706)
    s7 = d7 * 0.0 + (1 - d7) * 7.0  # 3.7059
    assert seen[6] == pytest.approx(s7, rel=1e-6)
    assert seen[7:14] == pytest.approx([s7] * 7, rel=1e-6)  # calls 8-14 leave it
    d15 = 16 / 25  # call 15: min(0.9, 0.64)
    s15 = d15 * s7 + (1 - d15) * 15.0  # 7.7718
    assert seen[14] == pytest.approx(s15, rel=1e-6)
    d23 = 24 / 33  # call 23: min(0.9, 0.7273)
    assert seen[22] == pytest.approx(d23 * s15 + (1 - d23) * 23.0, rel=1e-6)
    # late in a run the warm-up no longer binds: (1 + n) / (10 + n) > 0.9 from n = 82
    ema.calls = 86  # the next call is 87 = 8 * 11 - 1, a moving one
    with torch.no_grad():
        p.fill_(100.0)
    before = float(ema.shadow[0])
    ema.update()
    assert float(ema.shadow[0]) == pytest.approx(0.9 * before + 0.1 * 100.0, rel=1e-6)


def test_the_call_count_survives_a_state_round_trip():
    """A resumed EMA moves at the same calls and with the same decay as one that never stopped."""
    values = [float(n) for n in range(1, 17)]
    p = torch.nn.Parameter(torch.zeros(1))
    whole = _walk(EMA([p], 0.9, warmup=True, every=4), p, values)
    q = torch.nn.Parameter(torch.zeros(1))
    first = EMA([q], 0.9, warmup=True, every=4)
    head = _walk(first, q, values[:5])
    second = EMA([q], 0.9, warmup=True, every=4)
    second.load_state_dict(first.state_dict())
    assert second.calls == 5
    assert head + _walk(second, q, values[5:]) == whole
    old = {"decay": 0.9, "shadow": [torch.zeros(1)]}  # a checkpoint written before the count was saved
    second.load_state_dict(old)
    assert second.calls == 0


def test_bad_interval_is_a_user_error():
    with pytest.raises(UserError, match="moves every 0 steps"):
        EMA([torch.nn.Parameter(torch.zeros(1))], 0.9, every=0)


def test_a_loaded_state_lands_on_the_parameters_device():
    """A checkpoint is read onto the host while the parameters may be on a GPU: the shadows follow the parameters
    (here the parameters stand on the meta device and the state on the CPU; kept on the CPU, the next update would
    add a meta tensor into a CPU one and fail, as a CUDA one did), and a state of another length is refused instead
    of silently pairing the wrong tensors."""
    params = [torch.nn.Parameter(torch.ones(3, device="meta")), torch.nn.Parameter(torch.zeros(2, device="meta"))]
    ema = EMA(params, 0.5)
    ema.load_state_dict({"shadow": [torch.ones(3), torch.zeros(2)], "calls": 4})
    assert all(s.is_meta for s in ema.shadow) and ema.calls == 4
    ema.update()
    with pytest.raises(ValueError):
        ema.load_state_dict({"shadow": [torch.zeros(3)]})
