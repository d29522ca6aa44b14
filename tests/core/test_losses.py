"""Policy losses: hand-computed surrogate values, gradients, aggregations, KL and micro-batch invariance."""

import math

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.losses import (
    AGGREGATIONS,
    LOSSES,
    aggregate,
    get_loss,
    k3_kl,
    loss_options,
    make_aggregation,
    mask_zero_advantages,
    policy_loss,
)

E03 = math.exp(0.3)  # 1.3498588
EM03 = math.exp(-0.3)  # 0.7408182


def _three_ratios():
    """logp_old = 0, logp = [0.3, 0, -0.3] -> ratio [e^0.3, 1, e^-0.3] = [1.3499, 1, 0.7408]; one row, k = 3."""
    logp = torch.tensor([[0.3, 0.0, -0.3]], requires_grad=True)
    return logp, torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)


def test_registries_hold_the_variants():
    assert LOSSES.names() == ["grpo", "gspo", "nft", "pacs", "pg"]
    assert AGGREGATIONS.names() == ["constant", "seq_mean", "token_mean"]
    assert get_loss("grpo") is LOSSES.get("grpo")


def test_grpo_positive_advantage_clip_higher():
    logp, old, mask = _three_ratios()
    loss, stats = get_loss("grpo")(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    # A = +1: -min(r, clip(r, 0.8, 1.28))
    # e^0.3 = 1.3499 > 1.28 -> clipped to 1.28;  1 -> 1;  e^-0.3 = 0.7408: min(0.7408, 0.8) = 0.7408 (not clipped)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -1.0, -EM03]]))
    torch.testing.assert_close(stats["clipped"], torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(stats["ratio"], torch.tensor([[E03, 1.0, EM03]]))
    loss.sum().backward()
    # d(-r A)/d logp = -r A on unclipped units, 0 where the clip is active
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.0, -EM03]]))


def test_grpo_negative_advantage():
    logp, old, mask = _three_ratios()
    loss, stats = get_loss("grpo")(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    # A = -1: -min(-r, -clip(r)) = max(r, clip(r))
    # e^0.3: max(1.3499, 1.28) = 1.3499 (not clipped);  1 -> 1;  e^-0.3: max(0.7408, 0.8) = 0.8 (clipped)
    torch.testing.assert_close(loss, torch.tensor([[E03, 1.0, 0.8]]))
    torch.testing.assert_close(stats["clipped"], torch.tensor([[0.0, 0.0, 1.0]]))
    loss.sum().backward()
    # grad = -r A = r on unclipped units: [1.3499, 1, 0]
    torch.testing.assert_close(logp.grad, torch.tensor([[E03, 1.0, 0.0]]))


def test_grpo_dual_clip():
    logp, old, mask = _three_ratios()
    fn = get_loss("grpo")
    loss, stats = fn(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28, dual_clip=1.3)
    # A = -1, c = 1.3: losses [1.3499, 1, 0.8] capped at -c A = 1.3 -> [1.3, 1, 0.8]; the first unit is dual-clipped
    torch.testing.assert_close(loss, torch.tensor([[1.3, 1.0, 0.8]]))
    torch.testing.assert_close(stats["clipped"], torch.tensor([[1.0, 0.0, 1.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.0, 0.0]]))
    # A = -2: 2 * 1.3499 = 2.6997 capped at 2 * 1.3 = 2.6; others 2 * [1, 0.8]
    loss2, _ = fn(logp, old, torch.tensor([-2.0]), mask, clip_low=0.2, clip_high=0.28, dual_clip=1.3)
    torch.testing.assert_close(loss2, torch.tensor([[2.6, 2.0, 1.6]]))
    # A > 0: the dual clip never acts -> same as without it
    pos, _ = fn(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28, dual_clip=1.3)
    torch.testing.assert_close(pos, torch.tensor([[-1.28, -1.0, -EM03]]))
    with pytest.raises(UserError, match="dual_clip=0.9"):
        fn(logp, old, torch.tensor([1.0]), mask, dual_clip=0.9)


def test_clip_fraction_per_side_by_hand():
    """TRL's clip_ratio/low_mean and high_mean: low = r < 1 - clip_low with A < 0, high = r > 1 + clip_high with
    A > 0; verl's dual-clip fraction: A < 0 capped at -c A. The sides are disjoint and sum to clip_frac."""
    logp = torch.tensor([[0.3, 0.0, -0.3], [0.3, 0.0, -0.3]])  # both rows: r = [1.3499, 1, 0.7408]
    old, mask, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, -1.0])
    opts = {"clip_low": 0.2, "clip_high": 0.28}  # DAPO clip-higher: [0.8, 1.28]
    _, stats = get_loss("grpo")(logp, old, adv, mask, **opts)
    # row 0 (A = +1): 1.3499 > 1.28 -> high; 0.7408 < 0.8 but A > 0 -> not a clip (the min keeps r A)
    # row 1 (A = -1): 0.7408 < 0.8 -> low; 1.3499 > 1.28 but A < 0 -> not a clip (the max keeps r)
    torch.testing.assert_close(stats["clipped_high"], torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
    torch.testing.assert_close(stats["clipped_low"], torch.tensor([[0.0, 0, 0], [0, 0, 1]]))
    assert "clipped_dual" not in stats
    _, m = policy_loss(logp, old, adv, mask, options=opts)
    assert (m["loss/clip_frac_low"], m["loss/clip_frac_high"], m["loss/clip_frac"]) == pytest.approx(
        (1 / 6, 1 / 6, 2 / 6)
    )
    assert "loss/clip_frac_dual" not in m
    # fractions are over the masked units only: without row 1's last unit, 1 high of 5 units and no low
    part = mask.clone()
    part[1, 2] = False
    _, m = policy_loss(logp, old, adv, part, options=opts)
    assert (m["loss/clip_frac_low"], m["loss/clip_frac_high"], m["loss/clip_frac"]) == pytest.approx((0, 1 / 5, 1 / 5))
    # dual clip c = 1.3: row 1's first unit, max(1.3499, 1.28) = 1.3499 > 1.3 -> capped: the third side
    _, m = policy_loss(logp, old, adv, mask, options={**opts, "dual_clip": 1.3})
    sides = (m["loss/clip_frac_low"], m["loss/clip_frac_high"], m["loss/clip_frac_dual"], m["loss/clip_frac"])
    assert sides == pytest.approx((1 / 6, 1 / 6, 1 / 6, 3 / 6))
    # nothing masked: zeros, not NaN
    _, m = policy_loss(logp, old, adv, torch.zeros(2, 3, dtype=torch.bool), options=opts)
    assert (m["loss/clip_frac_low"], m["loss/clip_frac_high"]) == (0.0, 0.0)


def test_gspo_clip_sides_are_decided_per_sequence():
    logp, old, mask, adv = _gspo_example()  # s0 = e^0.2 = 1.2214 (A = +1), s1 = e^-0.15 = 0.8607 (A = -1)
    # clip [0.87, 1.2]: row 0 s0 > 1.2 with A > 0 -> high on its 3 units; row 1 s1 < 0.87 with A < 0 -> low on its 2
    _, m = policy_loss(logp, old, adv, mask, loss="gspo", options={"clip_low": 0.13, "clip_high": 0.2})
    assert (m["loss/clip_frac_low"], m["loss/clip_frac_high"], m["loss/clip_frac"]) == pytest.approx((2 / 5, 3 / 5, 1))
    # clip [0.8, 1.25]: s1 = 0.8607 and s0 = 1.2214 are both inside -> no side clips
    _, m = policy_loss(logp, old, adv, mask, loss="gspo", options={"clip_low": 0.2, "clip_high": 0.25})
    assert (m["loss/clip_frac_low"], m["loss/clip_frac_high"], m["loss/clip_frac"]) == (0.0, 0.0, 0.0)


def test_unclipped_losses_report_no_clip_sides():
    logp, old, mask = _three_ratios()
    _, m = policy_loss(logp, old, torch.tensor([1.0]), mask, loss="pg")
    assert m["loss/clip_frac"] == 0.0 and not any(k.startswith("loss/clip_frac_") for k in m)


def test_pg_is_unclipped_importance_weighted():
    logp, old, mask = _three_ratios()
    loss, stats = get_loss("pg")(logp, old, torch.tensor([2.0]), mask)  # pg declares no clip options at all
    # -A r with A = 2: [-2 * 1.3499, -2, -2 * 0.7408] = [-2.6997, -2, -1.4816]; no clipping at all
    torch.testing.assert_close(loss, torch.tensor([[-2 * E03, -2.0, -2 * EM03]]))
    assert stats["clipped"].sum() == 0
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 * E03, -2.0, -2 * EM03]]))


def _gspo_example():
    # row 0: log-ratios [0.1, 0.2, 0.3], mean 0.2 -> s0 = e^0.2 = 1.2214
    # row 1: log-ratios [0, -0.3, pad], mean over 2 masked units -0.15 -> s1 = e^-0.15 = 0.8607
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.3, -math.inf]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, old, mask, torch.tensor([1.0, -1.0])


def test_gspo_sequence_ratio_and_gradient():
    logp, old, mask, adv = _gspo_example()
    s0, s1 = math.exp(0.2), math.exp(-0.15)
    per_unit, stats = get_loss("gspo")(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(stats["ratio"], torch.tensor([[s0, s0, s0], [s1, s1, s1]]))
    # row 0: A = +1, s0 = 1.2214 > 1.2 -> clipped, loss -1.2 per unit; row 1: A = -1, s1 in [0.8, 1.2] -> loss s1
    torch.testing.assert_close(stats["clipped"], torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(per_unit[:, :2], torch.tensor([[-1.2, -1.2], [s1, s1]]))
    total = aggregate("seq_mean", per_unit, mask)
    # seq_mean: (-1.2 + 0.8607) / 2 = -0.16965
    torch.testing.assert_close(total, torch.tensor(-0.1696460))
    total.backward()
    # GSPO-token: d/d logp_t = -A s_i / |y_i| / n -> row 0: 0 (clipped); row 1: 0.8607 / 2 / 2 = 0.21518; pad: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [s1 / 4, s1 / 4, 0.0]]))
    assert torch.isfinite(logp.grad).all()


def test_gspo_token_form_equals_sequence_objective():
    """GSPO eq.: J = 1/n sum_i min(s_i A_i, clip(s_i) A_i) with s_i differentiated through the mean."""
    torch.manual_seed(0)
    logp = (0.1 * torch.randn(3, 4)).requires_grad_()
    old = torch.zeros(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 2.0])
    ours = aggregate("seq_mean", get_loss("gspo")(logp, old, adv, mask, clip_low=0.05, clip_high=0.05)[0], mask)
    (g_ours,) = torch.autograd.grad(ours, logp)
    log_s = (logp * mask).sum(-1) / mask.sum(-1)  # [n], with gradient
    s = log_s.exp()
    ref = -torch.minimum(s * adv, s.clamp(0.95, 1.05) * adv).mean()
    (g_ref,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


# x = [[1, 2, 3], [4, 5, 6]], mask = [[1, 1, 0], [1, 0, 0]], row weights [1, 2]
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
W = torch.tensor([1.0, 2.0])


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        ("token_mean", {}, 7 / 3),  # (1 + 2 + 4) / 3 masked units
        ("token_mean", {"row_weight": W}, 11 / 3),  # (1 + 2 + 2*4) / 3
        ("token_mean", {"row_weight": W, "denom": 10.0}, 1.1),  # 11 / 10
        ("seq_mean", {}, 2.75),  # row means [1.5, 4] -> (1.5 + 4) / 2
        ("seq_mean", {"row_weight": W}, 4.75),  # (1.5 + 2*4) / 2
        ("seq_mean", {"row_weight": W, "denom": 5.0}, 1.9),  # 9.5 / 5
        ("constant", {"constant": 4.0}, 0.875),  # 7 / (2 rows * 4)
        ("constant", {"constant": 4.0, "row_weight": W}, 1.375),  # 11 / 8
        ("constant", {"constant": 4.0, "row_weight": W, "denom": 5.0}, 0.55),  # 11 / (5 * 4)
    ],
)
def test_aggregations_hand_values(name, kwargs, expected):
    torch.testing.assert_close(aggregate(name, X, M, **kwargs), torch.tensor(expected))


@pytest.mark.parametrize("name", ["token_mean", "seq_mean", "constant"])
def test_zero_row_weight_removes_a_row(name):
    """MC-GRPO's pivot row has weight 0: neither its values nor its gradient matter."""
    x = X.clone().requires_grad_()
    w = torch.tensor([1.0, 0.0])
    opts = {"constant": 4.0} if name == "constant" else {}  # only constant takes it (an option is never ignored)
    out = aggregate(name, x, M, row_weight=w, **opts)
    # token_mean: (1 + 2) / 3 = 1 (the pivot's unit still counts in sum(mask)); seq_mean: 1.5 / 2; constant: 3 / 8
    expected = {"token_mean": 1.0, "seq_mean": 0.75, "constant": 0.375}[name]
    torch.testing.assert_close(out, torch.tensor(expected))
    other = X.clone()
    other[1] = 100.0
    torch.testing.assert_close(aggregate(name, other, M, row_weight=w, **opts), out.detach())
    out.backward()
    assert x.grad[1].abs().sum() == 0 and x.grad[0, 0] > 0


def test_empty_rows_contribute_zero_not_nan():
    x = X.clone()
    x[1] = float("nan")  # garbage under an all-zero mask row
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(aggregate("token_mean", x, mask), torch.tensor(1.5))  # (1 + 2) / 2
    torch.testing.assert_close(aggregate("seq_mean", x, mask), torch.tensor(0.75))  # (1.5 + 0) / 2 rows
    torch.testing.assert_close(aggregate("constant", x, mask, constant=3.0), torch.tensor(0.5))  # 3 / (2 * 3)
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    for name in ("token_mean", "seq_mean"):
        assert aggregate(name, x, nothing).item() == 0.0


def test_constant_aggregation_needs_constant():
    with pytest.raises(UserError, match="loss.aggregation.options.constant"):
        aggregate("constant", X, M)
    with pytest.raises(UserError, match="unknown aggregation 'token_man'.*did you mean 'token_mean'"):
        aggregate("token_man", X, M)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
@pytest.mark.parametrize("loss", ["grpo", "gspo"])
def test_micro_batches_with_global_denom_match_full_batch(aggregation, loss):
    torch.manual_seed(0)
    n, k = 6, 5
    logp = (0.3 * torch.randn(n, k)).requires_grad_()
    old = 0.3 * torch.randn(n, k)
    ref = 0.3 * torch.randn(n, k)
    adv = torch.randn(n)
    mask = torch.rand(n, k) > 0.3
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0])
    agg = make_aggregation(aggregation, {"constant": 5.0} if aggregation == "constant" else {})
    opts = dict(loss=loss, aggregation=agg, beta=0.1, options={"clip_low": 0.2, "clip_high": 0.28})

    full, _ = policy_loss(logp, old, adv, mask, kl=k3_kl(logp, ref), row_weight=w, **opts)
    (g_full,) = torch.autograd.grad(full, logp)

    denom = float(mask.sum()) if aggregation == "token_mean" else float(n)  # units or rows of the whole minibatch
    assert float(agg.local_count(mask[:2]) + agg.local_count(mask[2:])) == denom  # the aggregation counts it
    g_parts = torch.zeros(n, k)
    for rows in (slice(0, 2), slice(2, 6)):  # unequal halves on purpose
        lp = logp[rows]
        part, _ = policy_loss(
            lp, old[rows], adv[rows], mask[rows], kl=k3_kl(lp, ref[rows]), row_weight=w[rows], denom=denom, **opts
        )
        (g,) = torch.autograd.grad(part, logp)
        g_parts += g
    torch.testing.assert_close(g_parts, g_full)
    assert g_full.abs().sum() > 0


def test_k3_kl_and_beta_weighting():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.5, -0.5]])
    kl = k3_kl(logp, ref)
    # d = ref - logp: e^0.5 - 0.5 - 1 = 0.1487213;  e^-0.5 + 0.5 - 1 = 0.1065307
    torch.testing.assert_close(kl, torch.tensor([[0.1487213, 0.1065307]]))
    total, metrics = policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), beta=0.1, kl=kl)
    # A = 0 -> policy term 0; kl token mean (0.1487 + 0.1065) / 2 = 0.1276260; total 0.1 * 0.1276260
    assert metrics["loss/policy"] == 0.0
    assert metrics["loss/kl"] == pytest.approx(0.1276260, abs=1e-6)
    assert metrics["loss/total"] == pytest.approx(0.0127626, abs=1e-7)
    total.backward()
    # d k3 / d logp = 1 - e^d: [1 - 1.6487, 1 - 0.6065] = [-0.6487, 0.3935], times beta / 2 units
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.0324361, 0.0196735]]))
    torch.manual_seed(0)
    a, b = torch.randn(4, 7), torch.randn(4, 7)
    assert (k3_kl(a, b) >= 0).all() and k3_kl(a, a).abs().max() == 0


def test_beta_without_kl_raises():
    logp, old, mask = _three_ratios()
    with pytest.raises(UserError, match="supplies no reference KL; set loss.beta=0 or enable a reference"):
        policy_loss(logp, old, torch.ones(1), mask, beta=0.04)


def test_adv_clip():
    logp = torch.zeros(2, 1, requires_grad=True)
    mask = torch.ones(2, 1)
    adv = torch.tensor([3.0, -0.5])
    # ratio 1: loss = -mean(A); clipped A = [1, -0.5] -> -(1 - 0.5) / 2 = -0.25; unclipped: -(3 - 0.5) / 2 = -1.25
    _, m = policy_loss(logp, logp.detach(), adv, mask, adv_clip=1.0)
    assert m["loss/policy"] == pytest.approx(-0.25) and m["loss/adv_mean"] == pytest.approx(0.25)
    _, m = policy_loss(logp, logp.detach(), adv, mask)
    assert m["loss/policy"] == pytest.approx(-1.25)
    with pytest.raises(UserError, match="adv_clip=0"):
        policy_loss(logp, logp.detach(), adv, mask, adv_clip=0.0)


def test_mask_zero_adv():
    logp = torch.zeros(4, 2, requires_grad=True)
    mask = torch.ones(4, 2, dtype=torch.bool)
    adv = torch.tensor([2.0, 0.0, 0.0, -1.0])
    # ratio 1, token mean of -A: all 8 units: -(2*2 + 0 + 0 - 1*2) / 8 = -0.25
    _, m = policy_loss(logp, logp.detach(), adv, mask)
    assert m["loss/policy"] == pytest.approx(-0.25) and m["loss/adv_mean"] == pytest.approx(0.25)
    # zero-advantage rows leave the mask: -(4 - 2) / 4 = -0.5; adv mean (2 + 2 - 1 - 1) / 4 = 0.5
    total, m = policy_loss(logp, logp.detach(), adv, mask_zero_advantages(mask, adv))
    assert m["loss/policy"] == pytest.approx(-0.5) and m["loss/adv_mean"] == pytest.approx(0.5)
    total.backward()
    # d/d logp = -A r / 4 -> rows [-0.5, 0, 0, 0.25]
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5], [0, 0], [0, 0], [0.25, 0.25]]))


@pytest.mark.parametrize("loss", ["grpo", "gspo", "pg"])
def test_ratio_one_gives_minus_mean_advantage(loss):
    logp = torch.tensor([[0.1, -2.0, 0.4], [1.0, 0.3, -0.7], [0.0, 0.5, 0.2]], requires_grad=True)
    total, m = policy_loss(logp, logp.detach(), torch.tensor([0.5, -1.5, 2.0]), torch.ones(3, 3), loss=loss)
    # r = 1 everywhere -> loss = -mean(A) = -(0.5 - 1.5 + 2) / 3 = -1/3; nothing clipped
    assert total.item() == pytest.approx(-1 / 3)
    assert m["loss/clip_frac"] == 0.0 and m["loss/ratio_mean"] == 1.0 and m["loss/ratio_max"] == 1.0
    assert m["loss/adv_mean"] == pytest.approx(1 / 3)
    # per-unit advantages [n, k] broadcast the same way: -mean([1, 2, 3]) = -2
    total2, _ = policy_loss(logp[:1], logp[:1].detach(), torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), loss=loss)
    assert total2.item() == pytest.approx(-2.0)


def test_policy_loss_metrics_and_fp32():
    logp = torch.tensor([[0.3, 0.0, -0.3]], dtype=torch.bfloat16, requires_grad=True)
    old = torch.zeros(1, 3, dtype=torch.bfloat16)
    total, m = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), options={"clip_high": 0.28})
    assert total.dtype == torch.float32 and total.dim() == 0
    assert all(isinstance(v, float) for v in m.values())
    assert set(m) == {
        "loss/policy",
        "loss/total",
        "loss/ratio_mean",
        "loss/ratio_max",
        "loss/clip_frac",
        "loss/clip_frac_low",
        "loss/clip_frac_high",
        "loss/adv_mean",
    }
    # bf16(0.3) = 0.30078125 -> ratio e^0.30078 = 1.3509 > 1.28 clipped: 1 of 3 units
    assert m["loss/clip_frac"] == pytest.approx(1 / 3)
    assert m["loss/ratio_max"] == pytest.approx(math.exp(0.30078125), rel=1e-6)
    total.backward()
    assert logp.grad is not None and logp.grad.dtype == torch.bfloat16


def test_padding_with_minus_inf_is_safe():
    logp = torch.tensor([[0.1, -math.inf]], requires_grad=True)
    total, m = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1, 0]]))
    # only unit 0: r = e^0.1 = 1.1052 within [0.8, 1.2] -> loss -1.1052
    assert total.item() == pytest.approx(-math.exp(0.1), rel=1e-6)
    total.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-math.exp(0.1), 0.0]]))


def test_unknown_loss_lists_known():
    logp, old, mask = _three_ratios()
    with pytest.raises(UserError, match="unknown loss 'gpso'; known: grpo, gspo, nft, pacs, pg"):
        policy_loss(logp, old, torch.ones(1), mask, loss="gpso")


def test_nft_maps_the_clamped_advantage_to_r_and_mixes_the_two_errors():
    """Hand-computed: c = adv_clip = 2, r = 1/2 + A/(2c) after clamping A to [-c, c]; per unit
    c (r (-logp) + (1 - r) (-neg_logp)); token mean over the 4 units."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]], requires_grad=True)
    neg = torch.tensor([[-3.0, -1.0], [-2.0, -4.0]], requires_grad=True)
    adv = torch.tensor([1.0, -5.0])  # r = 0.75; -5 clamps to -2: r = 0
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, m = policy_loss(logp, logp.detach(), adv, mask, loss="nft", adv_clip=2.0, neg_logp=neg)
    # row 0: 2 (0.75 * 1 + 0.25 * 3) = 3.0, 2 (0.75 * 2 + 0.25 * 1) = 3.5; row 1: 2 * 2 = 4, 2 * 4 = 8
    assert loss.item() == pytest.approx((3.0 + 3.5 + 4.0 + 8.0) / 4)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.375, -0.375], [0.0, 0.0]]))
    assert torch.allclose(neg.grad, torch.tensor([[-0.125, -0.125], [-0.5, -0.5]]))
    assert m["loss/ratio_mean"] == 1.0 and m["loss/clip_frac"] == 0.0


def test_mask_zero_advantages_per_unit():
    """Per-unit advantages [n, k] drop single units; per-row [n] whole rows; the mask's own zeros stay."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    per_unit = torch.tensor([[0.5, 0.0, 1.0], [0.0, -1.0, 2.0]])
    assert mask_zero_advantages(mask, per_unit).tolist() == [[True, False, False], [False, True, True]]
    assert mask_zero_advantages(mask, torch.tensor([0.0, 3.0])).tolist() == [[False] * 3, [True] * 3]


def test_loss_options_are_declared_by_the_signature():
    """An option the chosen loss does not take is a did-you-mean error naming loss.options.x, never ignored."""
    assert loss_options("grpo", {"clip_high": 0.28, "dual_clip": 3}) == {"clip_high": 0.28, "dual_clip": 3.0}
    with pytest.raises(UserError, match=r"loss.options.clip_hgh.*did you mean 'loss.options.clip_high'"):
        loss_options("grpo", {"clip_hgh": 0.28})
    with pytest.raises(UserError, match=r"unknown option 'loss.options.clip_low'.*loss 'pg' takes no options"):
        loss_options("pg", {"clip_low": 0.2})
    with pytest.raises(UserError, match=r"loss.options.clip_low in here: expected float"):
        loss_options("grpo", {"clip_low": "wide"}, where="here")
    with pytest.raises(UserError, match="dual_clip=0.5"):  # the loss's own value check runs at load time
        loss_options("grpo", {"dual_clip": 0.5})
    with pytest.raises(UserError, match="set it"):  # nft declares adv_clip as an input it needs
        loss_options("nft", {})
    assert loss_options("nft", {}, adv_clip=1.0) == {}
    logp, old, mask = _three_ratios()
    with pytest.raises(UserError, match="loss 'pg' takes no options"):  # the same check guards direct calls
        policy_loss(logp, old, torch.ones(1), mask, loss="pg", options={"clip_high": 0.28})
    with pytest.raises(UserError, match=r"loss.aggregation.options.constnt.*did you mean"):
        make_aggregation("constant", {"constnt": 4})


def test_a_plugin_loss_by_dotted_path_receives_its_declared_inputs():
    """A loss outside the registry (dotted path) declares ``adv_clip`` and an option; it gets exactly those."""
    logp = torch.zeros(2, 1, requires_grad=True)
    adv = torch.tensor([3.0, -0.5])
    total, _ = policy_loss(logp, logp.detach(), adv, torch.ones(2, 1), loss=f"{__name__}.scaled_pg",
                           options={"scale": 2.0}, adv_clip=1.0)  # fmt: skip
    # clamped A = [1, -0.5]; per unit -scale * A / adv_clip = [-2, 1]; token mean -0.5
    assert total.item() == pytest.approx(-0.5)
    with pytest.raises(UserError, match="loss.options.scal"):
        policy_loss(logp, logp.detach(), adv, torch.ones(2, 1), loss=f"{__name__}.scaled_pg", options={"scal": 2.0})


def scaled_pg(logp, logp_old, adv, mask, *, adv_clip=None, scale: float = 1.0):
    """Test plug-in loss: -scale * A / adv_clip * ratio."""
    ratio = torch.exp(logp - logp_old)
    return -scale * adv / adv_clip * ratio, {"ratio": ratio.detach()}


@pytest.mark.gpu
def test_policy_loss_on_cuda_bf16_matches_cpu():
    """The loss maths is fp32 whatever the device and the log-probs' dtype: CUDA bf16 inputs give the CPU value."""
    torch.manual_seed(0)
    logp, old = (0.3 * torch.randn(4, 6)).bfloat16(), (0.3 * torch.randn(4, 6)).bfloat16()
    adv, mask = torch.randn(4), torch.rand(4, 6) > 0.3
    for loss in ("grpo", "gspo", "pg"):
        cpu, _ = policy_loss(logp, old, adv, mask, loss=loss)
        gpu, _ = policy_loss(logp.cuda(), old.cuda(), adv.cuda(), mask.cuda(), loss=loss)
        assert gpu.dtype == torch.float32
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
