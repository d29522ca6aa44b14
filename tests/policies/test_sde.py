"""Tests for mmgrpo.policies.sde: each step against its formula written out again, Euler at noise 0, empirical
moments of many samples, log-prob recomputation, gradients, DDIM vs diffusers, closed-form KL."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from mmgrpo.core.errors import UserError
from mmgrpo.policies.sde import SDE_KINDS, StepOutput, ddim_step, gaussian_kl, step

KINDS = ["flow_grpo", "dance", "cps"]


def _xv(n=3, shape=(2, 4, 4)):
    torch.manual_seed(0)
    return torch.randn(n, *shape), torch.randn(n, *shape)


def _normal_lp(prev, mean, std):
    """Reference log-density: torch.distributions.Normal, averaged over non-batch dims."""
    lp = torch.distributions.Normal(mean, std).log_prob(prev)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def assert_gaussian_step(out: StepOutput, mean, std, eps, sample_atol: float = 1e-6) -> None:
    """The step's mean is ``mean``, its sample mean + std * eps, its log-prob the Normal's mean log-density
    (``std`` a float or a tensor broadcasting against ``mean``)."""
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert torch.allclose(out.prev_sample, mean + std * eps, atol=sample_atol)
    assert torch.allclose(out.log_prob, _normal_lp(out.prev_sample, mean, torch.as_tensor(std)), atol=1e-5)


# ------------------------------------------------------------------------------------- formulas by hand


def test_flow_grpo_matches_formula():
    x, v = _xv()
    eps = torch.randn_like(x)
    s, sn, a = 0.8, 0.6, 0.7
    out = step("flow_grpo", v, x, s, sn, a, noise=eps)
    dt = sn - s  # -0.2
    std_t = a * math.sqrt(s / (1 - s))  # 0.7 * sqrt(4) = 1.4
    mean = x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    # 1.96 * -0.2 / 1.6 = -0.245 -> x * 0.755;  1 + 1.96 * 0.2 / 1.6 = 1.245 -> v * 1.245 * -0.2
    assert torch.allclose(mean, 0.755 * x - 0.249 * v, atol=1e-6)
    std = std_t * math.sqrt(-dt)  # 1.4 * sqrt(0.2) = 0.62610
    assert torch.allclose(out.std, torch.full_like(out.std, 0.626099), atol=1e-6)
    assert out.log_prob.shape == (3,) and out.log_prob.dtype == torch.float32
    assert_gaussian_step(out, mean, std, eps, sample_atol=1e-5)


def test_flow_grpo_at_sigma_one_uses_sigma_next_in_denominator():
    x, v = _xv()
    out = step("flow_grpo", v, x, 1.0, 0.75, 0.5, noise=torch.zeros_like(x))
    std_t = 0.5 * math.sqrt(1.0 / (1 - 0.75))  # 0.5 * 2 = 1.0
    assert torch.allclose(out.std, torch.full_like(out.std, std_t * math.sqrt(0.25)), atol=1e-7)  # 0.5
    assert torch.isfinite(out.mean).all()


def test_dance_matches_formula():
    x, v = _xv()
    eps = torch.randn_like(x)
    s, sn, eta = 0.5, 0.25, 0.3
    out = step("dance", v, x, s, sn, eta, noise=eps)
    dt = sn - s  # -0.25
    x0 = x - s * v
    mean = x + dt * v + dt * (eta**2 / 2) * (x - (1 - s) * x0) / s**2
    std = eta * math.sqrt(-dt)  # 0.3 * 0.5 = 0.15
    assert torch.allclose(out.std, torch.full_like(out.std, 0.15), atol=1e-7)
    assert_gaussian_step(out, mean, std, eps)


def test_dance_with_eta_equal_to_flow_grpo_std_has_the_same_mean():
    # both drifts are x + dt v + dt s^2 / (2 sigma) (x + (1 - sigma) v); Flow-GRPO's s = a sqrt(sigma / (1 - sigma))
    x, v = _xv()
    s, sn, a = 0.6, 0.4, 0.5
    eta = a * math.sqrt(s / (1 - s))
    flow = step("flow_grpo", v, x, s, sn, a, noise=torch.zeros_like(x))
    dance = step("dance", v, x, s, sn, eta, noise=torch.zeros_like(x))
    assert torch.allclose(flow.mean, dance.mean, atol=1e-6)
    assert torch.allclose(flow.std, dance.std, atol=1e-7)


def test_cps_matches_formula():
    x, v = _xv()
    eps = torch.randn_like(x)
    s, sn, a = 0.7, 0.5, 0.5
    out = step("cps", v, x, s, sn, a, noise=eps)
    std = sn * math.sin(a * math.pi / 2)  # 0.5 * sin(pi / 4) = 0.353553
    x0 = x - s * v
    x1 = x + (1 - s) * v
    mean = (1 - sn) * x0 + math.sqrt(sn**2 - std**2) * x1  # sqrt(0.25 - 0.125) = 0.353553
    assert torch.allclose(out.std, torch.full_like(out.std, 0.353553), atol=1e-6)
    assert_gaussian_step(out, mean, std, eps)


def test_cps_last_step_is_deterministic_without_nan():
    x, v = _xv()
    out = step("cps", v, x, 0.2, 0.0, 1.0)  # sigma_next = 0 -> std = 0 for any noise level
    assert torch.equal(out.std, torch.zeros_like(out.std))
    assert torch.allclose(out.prev_sample, x - 0.2 * v, atol=1e-6)  # lands on x0
    assert torch.equal(out.prev_sample, out.mean)
    assert torch.equal(out.log_prob, torch.zeros(3))


def test_per_row_sigmas_match_row_by_row():
    x, v = _xv(n=3)
    s = torch.tensor([0.9, 0.6, 0.3])
    sn = torch.tensor([0.8, 0.4, 0.1])
    eps = torch.randn_like(x)
    for kind in KINDS:
        out = step(kind, v, x, s, sn, 0.6, noise=eps)
        for n in range(3):
            row = step(kind, v[n : n + 1], x[n : n + 1], float(s[n]), float(sn[n]), 0.6, noise=eps[n : n + 1])
            assert torch.allclose(out.mean[n], row.mean[0], atol=1e-6), kind
            assert torch.allclose(out.log_prob[n], row.log_prob[0], atol=1e-6), kind


# ------------------------------------------------------------------------------------- noise 0 == Euler


@pytest.mark.parametrize("kind", KINDS)
def test_noise_level_zero_is_the_euler_step_exactly(kind):
    x, v = _xv()
    s = torch.tensor([1.0, 0.7, 0.35])
    sn = torch.tensor([0.9, 0.45, 0.1])
    out = step(kind, v, x, s, sn, 0.0, generator=torch.Generator().manual_seed(1))
    dt = (sn - s).view(-1, 1, 1, 1)  # fp32 difference, as the step computes it
    euler = x + dt * v
    assert torch.equal(out.mean, euler)
    assert torch.equal(out.prev_sample, euler)
    assert torch.equal(out.log_prob, torch.zeros(3))


def test_bf16_inputs_are_computed_and_returned_in_fp32():
    x, v = _xv()
    out = step("flow_grpo", v.bfloat16(), x.bfloat16(), 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(0))
    ref = step("flow_grpo", v.bfloat16().float(), x.bfloat16().float(), 0.5, 0.4, 0.7, prev_sample=out.prev_sample)
    assert out.prev_sample.dtype == out.log_prob.dtype == out.mean.dtype == torch.float32
    assert torch.equal(out.log_prob, ref.log_prob)


# ------------------------------------------------------------------------------------- recompute, gradient


@pytest.mark.parametrize("kind", KINDS)
def test_recomputed_log_prob_equals_sampled(kind):
    x, v = _xv()
    gen = torch.Generator().manual_seed(3)
    sampled = step(kind, v, x, 0.8, 0.7, 0.7, generator=gen)
    again = step(kind, v, x, 0.8, 0.7, 0.7, prev_sample=sampled.prev_sample)
    assert torch.allclose(again.log_prob, sampled.log_prob, atol=1e-6)
    assert torch.equal(again.prev_sample, sampled.prev_sample)


def test_generator_reproducible_and_noise_argument_used():
    x, v = _xv()
    a = step("dance", v, x, 0.8, 0.7, 0.5, generator=torch.Generator().manual_seed(5))
    b = step("dance", v, x, 0.8, 0.7, 0.5, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    c = step("dance", v, x, 0.8, 0.7, 0.5, noise=eps)
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert torch.equal(a.prev_sample, c.prev_sample)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_flows_from_log_prob_to_model_output(kind):
    x, v = _xv(n=2, shape=(3,))
    prev = step(kind, v, x, 0.6, 0.5, 0.8, generator=torch.Generator().manual_seed(0)).prev_sample
    v2 = (v + 0.1).requires_grad_(True)  # a moved policy: the given action is not at the new mean
    out = step(kind, v2, x, 0.6, 0.5, 0.8, prev_sample=prev)
    out.log_prob.sum().backward()
    # d lp / d v = (prev - mean) / std^2 / D * d mean / d v, with d mean / d v a per-kind constant c
    dmean_dv = {
        "flow_grpo": (1 + (0.8**2 * 0.6 / 0.4) * 0.4 / 1.2) * -0.1,  # std_t^2 = 0.64 * 1.5 = 0.96 -> 1.32 * -0.1
        "dance": -0.1 + -0.1 * (0.64 / 2) * (0.4 * 0.6) / 0.36,  # x - (1 - s) x0 = s x + (1 - s) s v
        "cps": -0.1 + (math.sqrt(0.25 - (0.5 * math.sin(0.4 * math.pi)) ** 2) - 0.5) * 0.4,  # (keep - sn) * (1 - s)
    }[kind]
    expected = (prev - out.mean.detach()) / out.std**2 / 3 * dmean_dv
    assert v2.grad is not None and torch.allclose(v2.grad, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- empirical moments


@pytest.mark.parametrize("kind", KINDS)
def test_empirical_mean_std_and_log_prob(kind):
    torch.manual_seed(0)
    n = 20000
    x = torch.randn(1, 4).expand(n, 4)  # the same state in every row
    v = torch.randn(1, 4).expand(n, 4)
    out = step(kind, v, x, 0.7, 0.5, 0.8, generator=torch.Generator().manual_seed(0))
    std = out.std[0, 0]
    assert torch.allclose(out.mean, out.mean[:1].expand(n, 4))
    # standard error of the mean: std / sqrt(20000) = 0.0071 std; 5 sigma
    assert torch.allclose(out.prev_sample.mean(0), out.mean[0], atol=float(5 * std / math.sqrt(n)))
    # standard error of the std: std / sqrt(2 * 20000) = 0.005 std; 5 sigma -> 2.5 %
    assert torch.allclose(out.prev_sample.std(0), std.expand(4), rtol=0.025)
    assert torch.allclose(out.log_prob, _normal_lp(out.prev_sample, out.mean, std), atol=1e-5)


# ------------------------------------------------------------------------------------- errors, registry


def test_unknown_kind_lists_the_kinds():
    x, v = _xv()
    with pytest.raises(UserError, match="unknown sde kind 'flow-grpo'; known: cps, dance, flow_grpo"):
        step("flow-grpo", v, x, 0.5, 0.4, 0.7)
    assert SDE_KINDS.names() == ["cps", "dance", "flow_grpo"]
    assert all(SDE_KINDS.describe(k) for k in KINDS)


def test_bad_inputs_raise_user_errors():
    x, v = _xv()
    with pytest.raises(UserError, match="sigma_next must be < sigma"):
        step("dance", v, x, 0.4, 0.5, 0.7)
    with pytest.raises(UserError, match="sigma must be in"):
        step("dance", v, x, 1.5, 0.5, 0.7)
    with pytest.raises(UserError, match="noise_level for cps"):
        step("cps", v, x, 0.5, 0.4, 1.5)
    with pytest.raises(UserError, match="one value per row"):
        step("dance", v, x, torch.ones(5) * 0.5, 0.4, 0.7)
    with pytest.raises(UserError, match="noise has shape"):
        step("dance", v, x, 0.5, 0.4, 0.7, noise=torch.zeros(3, 2))
    with pytest.raises(UserError, match="prediction_type"):
        ddim_step(v, x, 0.5, 0.6, 0.0, prediction_type="sample")


# ------------------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_eta0_matches_diffusers(prediction_type, set_alpha_to_one):
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=False,
    )
    sched.set_timesteps(10)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for t in sched.timesteps:
        model_output = torch.randn_like(x)
        expected = sched.step(model_output, t, x, eta=0.0).prev_sample
        prev_t = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
        a = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        out = ddim_step(model_output, x, a, a_prev, 0.0, prediction_type=prediction_type)
        assert torch.allclose(out.prev_sample, expected, atol=1e-6), int(t)
        assert torch.equal(out.log_prob, torch.zeros(2))
        x = expected


def test_ddim_clip_sample_matches_diffusers():
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, clip_sample_range=1.0)
    sched.set_timesteps(5)
    torch.manual_seed(0)
    x, eps = 3 * torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = sched.timesteps[1]  # 600, prev 400
    expected = sched.step(eps, t, x, eta=0.0).prev_sample
    out = ddim_step(eps, x, sched.alphas_cumprod[600], sched.alphas_cumprod[400], 0.0, clip_sample=1.0)
    assert torch.allclose(out.prev_sample, expected, atol=1e-6)


def test_ddim_with_eta_formula_and_per_row_alphas():
    x, e = _xv(n=2, shape=(5,))
    a = torch.tensor([0.25, 0.5])
    a_prev = torch.tensor([0.5, 0.8])
    eps_noise = torch.randn_like(x)
    out = ddim_step(e, x, a, a_prev, 1.0, noise=eps_noise)
    # row 0: std = sqrt(0.5 / 0.75) * sqrt(1 - 0.5) = sqrt(1/3) = 0.57735; row 1: sqrt(0.2/0.5) * sqrt(1 - 0.625)
    std = torch.tensor([math.sqrt(1 / 3), math.sqrt(0.4 * 0.375)]).view(2, 1)
    x0 = (x - (1 - a).sqrt().view(2, 1) * e) / a.sqrt().view(2, 1)
    mean = a_prev.sqrt().view(2, 1) * x0 + (1 - a_prev.view(2, 1) - std**2).sqrt() * e
    assert torch.allclose(out.std, std.expand(2, 1), atol=1e-6)
    assert_gaussian_step(out, mean, std, eps_noise)
    again = ddim_step(e, x, a, a_prev, 1.0, prev_sample=out.prev_sample)
    assert torch.allclose(again.log_prob, out.log_prob, atol=1e-6)


def test_ddim_last_step_to_alpha_one_is_deterministic():
    x, e = _xv(n=2, shape=(5,))
    out = ddim_step(e, x, 0.9, 1.0, 1.0)  # std = (0 / 0.1) * (1 - 0.9) = 0 even at eta = 1
    assert torch.equal(out.log_prob, torch.zeros(2))
    assert torch.allclose(out.prev_sample, (x - math.sqrt(0.1) * e) / math.sqrt(0.9), atol=1e-6)  # x0


# ------------------------------------------------------------------------------------- KL


def test_gaussian_kl_numbers():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    kl = gaussian_kl(mean, ref, torch.tensor([0.5, 1.0]))
    # row 0: (1 + 4) / (2 * 0.25) / 2 = 5.0;  row 1: (0.25 + 0.25) / (2 * 1) / 2 = 0.125
    assert torch.allclose(kl, torch.tensor([5.0, 0.125]))
    assert torch.equal(gaussian_kl(mean, ref, 0.0), torch.zeros(2))  # deterministic steps: 0


def test_gaussian_kl_equals_expected_log_ratio():
    # KL = E_p[log p - log q]; with the same std the log-ratio is linear in the sample, so one draw at the mean
    # gives it exactly: log p(mean) - log q(mean) = (mean - mean_ref)^2 / (2 std^2)
    x, v = _xv()
    p = step("dance", v, x, 0.5, 0.4, 0.6, noise=torch.zeros_like(x))
    q = step("dance", v + 0.3, x, 0.5, 0.4, 0.6, prev_sample=p.mean)
    assert torch.allclose(gaussian_kl(p.mean, q.mean, p.std[:, 0, 0, 0]), p.log_prob - q.log_prob, atol=1e-5)


@pytest.mark.parametrize("kind", [*KINDS, "ddim"])
@pytest.mark.parametrize("scalars", ["float", "0-d", "per row"])
def test_a_step_with_host_scalars_reads_nothing_back_from_the_device(kind, scalars):
    """The schedule's values are checked where they are given (the host) before they move to the sample's device,
    so a step makes no host-device synchronisation: on the meta device, which has no values, any read-back
    (``bool(t)``, ``t.item()``) raises. On a GPU, tests/gpu counts the rollout's synchronisations."""
    # (sigma, sigma_next), or for ddim (alpha_bar, alpha_bar_prev): the next state is the less noisy one
    values = [(0.8, 0.6), (0.9, 0.5), (1.0, 0.0)] if kind != "ddim" else [(0.3, 0.5), (0.4, 0.6), (0.5, 1.0)]
    hi, lo = (torch.tensor(v) for v in zip(*values))
    if scalars != "per row":
        hi, lo = (hi[0], lo[0]) if scalars == "0-d" else (float(hi[0]), float(lo[0]))
    x, v = (t.to("meta") for t in _xv())
    if kind == "ddim":
        run = lambda **kw: ddim_step(v, x, hi, lo, 0.5, **kw)  # noqa: E731
    else:
        run = lambda **kw: step(kind, v, x, hi, lo, 0.7, **kw)  # noqa: E731
    for out in (run(), run(noise=torch.randn(x.shape, device="meta")), run(prev_sample=torch.empty_like(x))):
        assert out.prev_sample.is_meta and out.log_prob.is_meta and out.log_prob.shape == (3,)
    with pytest.raises(UserError, match="sigma_next must be < sigma|alpha_bar_prev"):  # still checked, on the host
        if kind == "ddim":
            ddim_step(v, x, 0.5, 0.4, 0.5)
        else:
            step(kind, v, x, 0.5, 0.6, 0.7)


def test_step_output_is_a_dataclass():
    x, v = _xv()
    out = step("cps", v, x, 0.5, 0.4, 0.5)
    assert isinstance(out, StepOutput)
    assert out.std.shape[0] == 3


def test_bad_sde_options_fail_when_the_config_loads_before_any_model(tmp_path):
    """policy.options are checked by the recipe's schema at load_config: the checkpoint path does not even exist,
    so reaching the model would be another error."""
    from mmgrpo.core.schema import from_dict
    from mmgrpo.policies.loading import GeneratorPolicyOptions
    from mmgrpo.train.config import dump_config, load_config

    base = {"pipeline": "text_to_image", "rewards": [{"name": "jpeg_incompressibility"}],
            "policy": {"options": {"family": "sd3", "path": str(tmp_path / "missing")}}}  # fmt: skip
    with pytest.raises(UserError, match=r"sde.noise_level=1.5 is out of range for sde.kind=cps: it must be in \[0"):
        load_config(None, ["policy.options.sde={kind: cps, noise_level: 1.5}"], base=base)
    for bad in ("inf", "nan", "-1", "1e30", "100"):  # inf (and 1e30, 2026-12-07) sampled NaN images
        with pytest.raises(UserError, match=r"noise_level=.* for sde.kind=flow_grpo: it must be in \[0, 5.0\]"):
            load_config(None, [f"policy.options.sde.noise_level={bad}"], base=base)
    with pytest.raises(UserError, match=r"noise_level=6.0 is out of range for sde.kind=dance: it must be in \[0, 5"):
        load_config(None, ["policy.options.sde={kind: dance, noise_level: 6}"], base=base)
    with pytest.raises(
        UserError,
        match="unknown key 'policy.options.sde.noise' in command-line override 'policy.options.sde.noise=0.3'; did",
    ):
        load_config(None, ["policy.options.sde.noise=0.3"], base=base)
    with pytest.raises(UserError, match="unknown sde kind 'danse'.*did you mean 'dance'"):
        load_config(None, ["policy.options.sde.kind=danse"], base=base)
    # the nested blocks round-trip through the run's config.yaml
    overrides = ["policy.options.objective={name: nft, beta: 0.5}", "policy.options.sde.noise_level=0.0",
                 "policy.options.exploration=full", "loss.name=nft", "loss.adv_clip=1.0"]  # fmt: skip
    cfg = load_config(None, overrides, base=base)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    again = load_config(tmp_path / "config.yaml")
    opts = from_dict(GeneratorPolicyOptions, again.policy.options, "x")
    assert (opts.objective.name, opts.objective.beta, opts.sde.noise_level) == ("nft", 0.5, 0.0)
