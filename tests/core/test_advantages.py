"""Advantage estimators, shaping and combiners against hand-computed numbers (arithmetic in the comments)."""

import math

import pytest
import torch

from mmgrpo.core.advantages import (
    COMBINERS,
    ESTIMATORS,
    SHAPERS,
    combine,
    get_estimator,
    get_row_weights,
    get_shaping,
    zero_variance_groups,
)
from mmgrpo.core.errors import UserError

NAN = float("nan")


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, t(b), atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------ registry


def test_registries_list_names_and_descriptions():
    assert ESTIMATORS.names() == [
        "batch_std", "bnpo", "dr_grpo", "grpo", "mapo", "mc_grpo", "ngrpo", "pacs", "spo", "stratified",
        "weighted_grpo",
    ]  # fmt: skip
    assert SHAPERS.names() == ["none", "tempsamp_soft"]
    assert COMBINERS.names() == ["normalize_then_sum", "posterior", "sum_then_normalize"]
    for name in ESTIMATORS:
        assert ESTIMATORS.describe(name), f"{name} has no one-line description"


def test_unknown_estimator_lists_known_names():
    with pytest.raises(UserError) as e:
        get_estimator("mc_grpo2")
    msg = str(e.value)
    assert "unknown estimator 'mc_grpo2'" in msg
    assert "known: batch_std, bnpo, dr_grpo, grpo, mapo, mc_grpo, ngrpo, pacs, spo, stratified, weighted_grpo" in msg
    assert "did you mean 'mc_grpo'" in msg
    with pytest.raises(UserError, match="known: batch_std"):
        get_row_weights("nope")
    with pytest.raises(UserError, match="unknown shaping 'tempsamp'"):
        get_shaping("tempsamp")
    with pytest.raises(UserError, match="unknown combine 'sum'"):
        combine("sum", torch.zeros(1, 1, 2), t([1.0]), "grpo", {})


def test_unknown_option_is_user_error_with_hint():
    with pytest.raises(UserError, match="no option 'unbaised'.*did you mean 'unbiased'"):
        get_estimator("grpo")(t([[1.0, 0.0]]), unbaised=False)
    with pytest.raises(UserError, match="no option 'alpha'"):
        get_shaping("tempsamp_soft")(t([1.0]), alpha=1.0)


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match=r"\[B, G\].*\(4,\)"):
        get_estimator("grpo")(t([1.0, 0.0, 0.0, 1.0]))
    with pytest.raises(UserError, match="2 weights for 1 reward columns"):
        combine("sum_then_normalize", torch.zeros(1, 1, 2), t([1.0, 1.0]), "grpo", {})


def test_inputs_not_modified_and_output_fp32():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    before = r.clone()
    for name in ESTIMATORS:
        inputs = {"stratified": {"keys": [[0, 1, 0, 1]]}, "spo": {"baseline": torch.tensor([[0.5]])},
                  "weighted_grpo": {"roles": torch.tensor([[1.0]])}}  # fmt: skip
        opts = inputs.get(name, {})
        out = get_estimator(name)(r, **opts)
        assert out.dtype == torch.float32 and out.shape == (1, 4)
        assert torch.equal(r, before)
    ints = torch.tensor([[1, 0, 0, 1]])
    close(get_estimator("dr_grpo")(ints), [[0.5, -0.5, -0.5, 0.5]])


# -------------------------------------------------------------------------------------- estimators


def test_grpo_unbiased_vs_biased():
    r = t([[1.0, 0.0, 0.0, 1.0]])
    # mean 0.5, deviations +-0.5, sum of squares 1
    # unbiased: var 1/3, std 0.577350 -> A = +-0.5/0.577350 = +-0.866025
    close(get_estimator("grpo")(r), [[0.866025, -0.866025, -0.866025, 0.866025]])
    # biased: var 1/4, std 0.5 -> A = +-0.5/(0.5 + 1e-6) = +-0.999998
    close(get_estimator("grpo")(r, unbiased=False), [[0.999998, -0.999998, -0.999998, 0.999998]])
    # scale=False: r - mean
    close(get_estimator("grpo")(r, scale=False), [[0.5, -0.5, -0.5, 0.5]])


def test_grpo_ignores_nan_rows():
    # valid 1, 3, 5: mean 3, unbiased std sqrt((4+0+4)/2) = 2 -> A = [-1, 0(NaN), 0, 1]
    close(get_estimator("grpo")(t([[1.0, NAN, 3.0, 5.0]])), [[-1.0, 0.0, 0.0, 1.0]])


def test_dr_grpo():
    # mean (1+2+6)/3 = 3 -> [-2, -1, 3]
    close(get_estimator("dr_grpo")(t([[1.0, 2.0, 6.0]])), [[-2.0, -1.0, 3.0]])


def test_batch_std():
    r = t([[0.0, 2.0], [4.0, 6.0]])
    # group means 1, 5 -> centred [-1, 1, -1, 1]
    # batch mean 3, deviations [-3, -1, 1, 3], sum sq 20, unbiased var 20/3, std 2.581989 -> +-1/2.581989
    close(get_estimator("batch_std")(r), [[-0.387298, 0.387298], [-0.387298, 0.387298]])


def test_zero_variance_groups_and_exact_zero_advantages():
    # fp32: mean([.9, .9, .9]) differs from .9 by an ulp; unforced, (r - mean)/(0 + 1e-6) would give 0.0555
    r = t([[0.9, 0.9, 0.9], [0.0, 1.0, 0.5], [NAN, 0.7, 0.7]])
    assert zero_variance_groups(r).tolist() == [True, False, True]
    assert zero_variance_groups(t([[NAN, NAN]])).tolist() == [True]
    for name in ["grpo", "dr_grpo", "batch_std", "mc_grpo", "bnpo"]:
        adv = get_estimator(name)(r)
        assert torch.equal(adv[0], torch.zeros(3)), name
        assert torch.equal(adv[2], torch.zeros(3)), name
        assert adv[1].abs().sum() > 0, name


def test_mc_grpo_scales_on_binary_group():
    r = t([[0.0, 1.0, 1.0, 0.0, 1.0]])  # G+1 = 5; sorted [0,0,1,1,1] -> median 1, first index attaining it: 1
    mc = get_estimator("mc_grpo")
    # none: r - 1
    close(mc(r, scale="none"), [[-1.0, 0.0, 0.0, -1.0, 0.0]])
    # std: mean 0.6, unbiased var (2*0.36 + 3*0.16)/4 = 0.3, std 0.547723 -> -1/0.547723 = -1.825742
    close(mc(r, scale="std"), [[-1.825742, 0.0, 0.0, -1.825742, 0.0]])
    # mad: |r - 1| = [1,0,0,1,0], median 0 -> MAD 0 < eps -> falls back to std (not |A| = 1e6)
    close(mc(r, scale="mad"), [[-1.825742, 0.0, 0.0, -1.825742, 0.0]])
    close(mc(r), [[-1.825742, 0.0, 0.0, -1.825742, 0.0]])  # default scale is "mad"
    # eps = 0.6: MAD 0 < 0.6 and std 0.547723 < 0.6 -> unscaled r - median (spread 1 > 0.6: not zero-variance)
    close(mc(r, eps=0.6), [[-1.0, 0.0, 0.0, -1.0, 0.0]])
    # pivot (index 1) has loss weight 0, the other G = 4 rows 1
    assert get_row_weights("mc_grpo")(r).tolist() == [[1.0, 0.0, 1.0, 1.0, 1.0]]
    with pytest.raises(UserError, match="scale='iqr'"):
        mc(r, scale="iqr")


def test_mc_grpo_mad_and_lower_median():
    r = t([[0.0, 1.0, 2.0, 3.0, 10.0]])
    # median 2; |r - 2| = [2,1,0,1,8] -> sorted [0,1,1,2,8] -> MAD 1 -> A = r - 2
    close(get_estimator("mc_grpo")(r), [[-2.0, -1.0, 0.0, 1.0, 8.0]])
    # consistent MAD 1.4826: -2/1.4826 = -1.348981, -1/1.4826 = -0.674490, 8/1.4826 = 5.395926
    close(get_estimator("mc_grpo")(r, mad_consistency=True), [[-1.348981, -0.674490, 0.0, 0.674490, 5.395926]])
    even = t([[3.0, 1.0, 4.0, 2.0]])  # sorted [1,2,3,4]: lower median 2, at index 3
    close(get_estimator("mc_grpo")(even, scale="none"), [[1.0, -1.0, 2.0, 0.0]])
    assert get_row_weights("mc_grpo")(even).tolist() == [[1.0, 1.0, 1.0, 0.0]]
    # sorted [0,1,1,1,1,2,2]: median 1; the pivot is the FIRST 1 (index 2; torch.median's own index is 4 on CPU)
    ties = t([[0.0, 2.0, 1.0, 1.0, 1.0, 2.0, 1.0]])
    assert get_row_weights("mc_grpo")(ties).tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]]


def test_ngrpo_all_wrong_group_is_negative():
    # 8 zeros + virtual 1: mean 1/9; unbiased var (8/81 + 64/81)/8 = 1/9, std 1/3 -> A = (-1/9)/(1/3) = -1/3
    close(get_estimator("ngrpo")(torch.zeros(1, 8), r_max=1.0), [[-1.0 / 3.0] * 8])
    # [1, 0] + virtual 1: mean 2/3; var ((1/3)^2*2 + (2/3)^2)/2 = 1/3, std 0.577350
    # -> A = (1/3)/0.577350 = 0.577350, (-2/3)/0.577350 = -1.154701
    close(get_estimator("ngrpo")(t([[1.0, 0.0]])), [[0.577350, -1.154701]])


def _beta_pdf(p, a, b):
    return p ** (a - 1) * (1 - p) ** (b - 1) * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))


def test_bnpo_two_groups_by_hand():
    r = t([[0.0, 2.0, 4.0, 4.0], [0.0, 0.0, 1.0, 0.0]])
    # batch min 0, max 4 -> x1 = [0, .5, 1, 1], p1 = 2.5/4 = .625; x2 = [0, 0, .25, 0], p2 = .0625
    x1, x2, p1, p2 = [0.0, 0.5, 1.0, 1.0], [0.0, 0.0, 0.25, 0.0], 0.625, 0.0625
    mu = (p1 + p2) / 2  # .34375
    var = (p1 - mu) ** 2 + (p2 - mu) ** 2  # unbiased over 2 groups: 2 * .28125^2 = .158203125
    k = mu * (1 - mu) / var - 1  # .2255859375 / .158203125 - 1 = 77/54 - 1 = 23/54
    a = max(1 + k * mu / 3, 1.0)  # 1.048804
    b = max(1 + k * (1 - mu) / 3, 1.0)  # 1.093171
    assert abs(a - 1.048804) < 1e-6 and abs(b - 1.093171) < 1e-6
    w1, w2 = 1 / _beta_pdf(p1, a, b), 1 / _beta_pdf(p2, a, b)
    expected = [[(x - p1) * w1 for x in x1], [(x - p2) * w2 for x in x2]]
    close(get_estimator("bnpo")(r), expected)


def test_bnpo_degenerate_cases():
    # one group: moments undefined -> uniform Beta (pdf 1): x = [0, .5, .5, 1], p = .5 -> x - p
    close(get_estimator("bnpo")(t([[0.0, 1.0, 1.0, 2.0]])), [[-0.5, 0.0, 0.0, 0.5]])
    # equal group means -> var 0 -> uniform. fixed bounds 0..10: x = [0, .2], [.2, 0]; p = .1 both
    close(get_estimator("bnpo")(t([[0.0, 2.0], [2.0, 0.0]]), r_min=0.0, r_max=10.0), [[-0.1, 0.1], [0.1, -0.1]])
    # max == min over the batch -> all 0
    assert torch.equal(get_estimator("bnpo")(torch.full((2, 3), 0.4)), torch.zeros(2, 3))
    with pytest.raises(UserError, match="r_max=0.0 must be greater than r_min=1.0"):
        get_estimator("bnpo")(t([[0.0, 1.0]]), r_min=1.0, r_max=0.0)


def test_stratified_alpha_one_and_half():
    r = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    keys = torch.tensor([[0, 1, 0], [1, 0, 1]])
    # stratum 0: 1, 3, 5 -> mean 3, std sqrt((4+0+4)/2) = 2 -> -1, 0, 1
    # stratum 1: 2, 4, 6 -> mean 4, std 2                    -> -1, 0, 1
    a_strata = [[-1.0, -1.0, 0.0], [0.0, 1.0, 1.0]]
    close(get_estimator("stratified")(r, keys=keys), a_strata)
    # global grpo: each group mean 2 (5), std 1 -> [-1, 0, 1]; 0.5*strata + 0.5*global
    close(get_estimator("stratified")(r, keys=keys, alpha=0.5), [[-1.0, -0.5, 0.5], [-0.5, 0.5, 1.0]])
    # keys as a nested list of labels give the same strata
    close(get_estimator("stratified")(r, keys=[["a", "b", "a"], ["b", "a", "b"]]), a_strata)


def test_stratified_single_row_stratum_and_missing_keys():
    # stratum 0: 1, 2 -> mean 1.5, std sqrt(0.5) = 0.707107 -> -0.707107, 0.707107; stratum 1 has one row -> 0
    close(get_estimator("stratified")(t([[1.0, 2.0, 3.0]]), keys=[[0, 0, 1]]), [[-0.707107, 0.707107, 0.0]])
    with pytest.raises(UserError, match="no per-row strata .* methods: {strata: {meta_key: <field>}} gives them"):
        get_estimator("stratified")(t([[1.0, 2.0]]))
    with pytest.raises(UserError, match="got 3 keys"):
        get_estimator("stratified")(t([[1.0, 2.0]]), keys=[0, 1, 2])


def test_a_stratified_run_without_strata_is_refused_when_its_config_loads(tmp_path):
    """advantage.estimator: stratified alone (as docs/architecture.md's table reads) failed at the first step, after
    the model loaded, with a message about an option 'keys' no config can set: the config load names methods.strata.
    The bandit's rows carry their prompt as stratum, so it runs as it is."""
    from mmgrpo.train.config import load_config

    out = f"run.output_dir={tmp_path}"
    with pytest.raises(UserError, match=r"nothing gives the rows strata .*add methods: {strata: {meta_key: "):
        load_config("configs/shapes_t2i_grpo.yaml", [out, "advantage.estimator=stratified"])
    strata = "methods={strata: {meta_key: shape}}"
    assert load_config("configs/shapes_t2i_grpo.yaml", [out, "advantage.estimator=stratified", strata]).methods
    assert load_config("configs/bandit.yaml", [out, "advantage.estimator=stratified"]).advantage.estimator
    # a plug-in estimator taking optional keys (or a plug-in recipe / method, which may give strata) is not refused
    if "test_optional_strata" not in ESTIMATORS:

        @ESTIMATORS.register("test_optional_strata")
        def optional_strata(rewards, *, keys=None):
            return get_estimator("grpo")(rewards)

    assert not ESTIMATORS.builtin("test_optional_strata") and ESTIMATORS.builtin("stratified")
    loaded = load_config("configs/shapes_t2i_grpo.yaml", [out, "advantage.estimator=test_optional_strata"])
    assert loaded.advantage.estimator == "test_optional_strata"


# ----------------------------------------------------------------------------------------- shaping


def test_tempsamp_soft_values():
    f = get_shaping("tempsamp_soft")
    # 1   -> .8 + .01 ln(1.2)                 = .8 + .0018232 = .8018232
    # .8  -> .8 + .01 ln(1)                   = .8
    # .5  -> .8 - (e^.3 - 1)/(e - 1) = .8 - .3498588/1.7182818 = .8 - .2036091 = .5963909
    # 0   -> .8 - (e^.8 - 1)/(e - 1) = .8 - 1.2255409/1.7182818 = .8 - .7132358 = .0867642
    close(f(t([1.0, 0.8, 0.5, 0.0])), [0.80182, 0.8, 0.59639, 0.08676], tol=1e-5)
    r = t([[0.3, NAN]])
    close(get_shaping("none")(r)[:, :1], [[0.3]])
    assert f(r)[0, 1].isnan()


# --------------------------------------------------------------------------------------- combiners


def test_normalize_then_sum_differs_from_sum_then_normalize():
    rewards = t([[[0.0, 0.0, 3.0]], [[0.0, 1.0, 2.0]]])  # R=2, B=1, G=3
    w = t([1.0, 1.0])
    # sum: [0, 1, 5], mean 2, std sqrt((4+1+9)/2) = sqrt(7) = 2.645751 -> [-2, -1, 3]/2.645751
    close(combine("sum_then_normalize", rewards, w, "grpo", {}), [[-0.755929, -0.377964, 1.133893]])
    # col 1: mean 1, std sqrt((1+1+4)/2) = sqrt(3) -> [-1, -1, 2]/1.732051 = [-.577350, -.577350, 1.154701]
    # col 2: mean 1, std 1 -> [-1, 0, 1]; sum -> [-1.577350, -0.577350, 2.154701]
    close(combine("normalize_then_sum", rewards, w, "grpo", {}), [[-1.577350, -0.577350, 2.154701]])
    # dr_grpo is linear: without NaN both combiners agree. weights [2, -1]: 2*[-1,-1,2] - [-1,0,1] = [-1,-2,3]
    w2 = t([2.0, -1.0])
    for name in ["sum_then_normalize", "normalize_then_sum"]:
        close(combine(name, rewards, w2, "dr_grpo", {}), [[-1.0, -2.0, 3.0]])


def test_combiners_nan_means_does_not_apply():
    rewards = t([[[1.0, 0.0, NAN, NAN]], [[NAN, NAN, 2.0, 0.0]]])  # each reward applies to half the rows
    w = t([1.0, 1.0])
    # normalize_then_sum: col 1 over rows 0,1: mean .5 -> [.5, -.5, 0, 0]; col 2 over rows 2,3: mean 1 -> [0,0,1,-1]
    close(combine("normalize_then_sum", rewards, w, "dr_grpo", {}), [[0.5, -0.5, 1.0, -1.0]])
    # sum_then_normalize: NaN -> 0: [1, 0, 2, 0], mean .75 -> [.25, -.75, 1.25, -.75]
    close(combine("sum_then_normalize", rewards, w, "dr_grpo", {}), [[0.25, -0.75, 1.25, -0.75]])
    # row 3 with no reward at all: left out of the statistics and gets 0: [1, 0, 2, -], mean 1 -> [0, -1, 1, 0]
    sparse = t([[[1.0, 0.0, NAN, NAN]], [[NAN, NAN, 2.0, NAN]]])
    close(combine("sum_then_normalize", sparse, w, "dr_grpo", {}), [[0.0, -1.0, 1.0, 0.0]])
    # estimator options pass through: grpo biased on [1, 0, 2] (mean 1, std sqrt(2/3) = .816497) -> +-1.224744
    close(combine("sum_then_normalize", sparse, w, "grpo", {"unbiased": False}), [[0.0, -1.224744, 1.224744, 0.0]])


def test_default_row_weights_are_ones():
    r = t([[1.0, 0.0, 2.0]])
    assert torch.equal(get_row_weights("grpo")(r), torch.ones(1, 3))
