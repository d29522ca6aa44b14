"""objective=flow_matching (advantage-weighted matching, AWM / on-policy DiffusionNFT) on tiny real checkpoints."""

import pytest
import torch
import yaml

from mmgrpo.core.errors import UserError
from mmgrpo.core.seeding import generator_for
from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.testing.checks import assert_ratio_one
from mmgrpo.testing.tiny_flux import tiny_flux_adapter
from mmgrpo.testing.tiny_sd import tiny_sd_adapter
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3, tiny_sd3_adapter
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

FM = dict(objective={"name": "flow_matching", "timesteps": 3}, sde={"noise_level": 0.0})


def fm(num_steps=3, **objective):
    """AWM with 3 draws per sample on ODE rollouts."""
    return DiffusionPolicyOptions(num_steps=num_steps, sde={"noise_level": 0.0},
                                  objective={"name": "flow_matching", "timesteps": 3, **objective})  # fmt: skip


def batch(seeds=(11, 12)):
    return PromptBatch(prompts=["a red circle", "two blue squares"], seeds=list(seeds))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("make", [tiny_sd3_adapter, tiny_flux_adapter], ids=["sd3", "flux"])
def test_units_are_the_draws_and_ratio_is_one(make, shared):
    policy = DiffusionPolicy(make(), fm(shared_draws=shared))
    r = policy.rollout(batch(), group_size=3)
    assert r.logp_old.shape == (6, 3) and r.train_mask.all()
    seeds = r.extras["fm_seeds"].view(2, 3)
    assert (seeds[:, 1:] == seeds[:, :1]).all() == shared and seeds[0, 0] != seeds[1, 0]
    assert (r.logp_old < 0).all()  # minus a squared error
    assert_ratio_one(policy, r)  # micro-batches 1 and G regenerate the same (sigma, noise) draws


@pytest.mark.parametrize("weighting", ["x0", "v"])
def test_log_prob_is_minus_the_flow_matching_error_of_the_documented_draws(weighting):
    """Rebuild unit u of row r by hand: sigma = lo + (hi - lo) U, eps ~ N(0, I) from the row's seed, in that
    order; x_t = (1 - sigma) x0 + sigma eps; logp = -w mean((transformer(x_t, 1000 sigma) - (eps - x0))^2) with
    w = sigma^2 (x0 weighting) or 1 (v)."""
    opts = fm(sigma_range=[0.2, 0.6], weighting=weighting)
    policy = DiffusionPolicy(tiny_sd3_adapter(), opts)
    r = policy.rollout(batch(), group_size=2)
    row = 3
    g = generator_for(int(r.extras["fm_seeds"][row]))
    sig = 0.2 + 0.4 * torch.rand(3, generator=g)
    eps = torch.randn((3, *policy.adapter.latent_shape()), generator=g)
    assert ((sig >= 0.2) & (sig <= 0.6)).all()
    x0 = r.extras["latents"][row, -1]
    cond = {k: v[row : row + 1].expand(3, *v.shape[1:]) for k, v in r.extras["cond"].items()}
    xt = (1 - sig[:, None, None, None]) * x0 + sig[:, None, None, None] * eps
    with torch.no_grad():
        v = policy.adapter.denoiser(
            hidden_states=xt, timestep=sig * 1000, encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"], return_dict=False,
        )[0]  # fmt: skip
    want = -((v - (eps - x0)) ** 2).flatten(1).mean(1) * (sig**2 if weighting == "x0" else 1.0)
    assert torch.allclose(r.logp_old[row], want, atol=1e-6), (r.logp_old[row], want)
    # the final samples are the ODE's (noise_level 0): same images as generate() at the same seeds
    again = policy.generate(["two blue squares"], [12])
    assert torch.allclose(r.samples[2], again[0], atol=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_positive_advantage_lowers_the_error_and_a_negative_one_raises_it(sign):
    policy = DiffusionPolicy(tiny_sd3_adapter(), fm())
    r = policy.rollout(batch(), group_size=2)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.01)
    rows = torch.arange(4)
    loss = -(sign * policy.log_prob(r, rows).logp).mean()  # the policy-gradient surrogate at ratio 1
    loss.backward()
    opt.step()
    with torch.no_grad():
        delta = (policy.log_prob(r, rows).logp - r.logp_old).mean()  # change of minus the weighted error
    assert sign * delta > 0, delta  # a small gradient step moves the surrogate the way its advantage says


def test_reference_kl_is_the_velocity_gap_to_the_adapter_disabled():
    opts = DiffusionPolicyOptions(num_steps=2, lora_rank=2, reference_kl=True, **FM)
    policy = DiffusionPolicy(tiny_sd3_adapter(), opts)
    r = policy.rollout(batch(), group_size=2)
    assert torch.allclose(policy.log_prob(r, torch.arange(4)).kl, torch.zeros(4, 3), atol=1e-10)
    with torch.no_grad():
        for name, p in policy.unwrapped().named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert (policy.log_prob(r, torch.arange(4)).kl > 0).all()


@pytest.mark.parametrize(
    "make, opts, match",
    [
        (tiny_sd_adapter, dict(sde={"kind": "ddim"}), "needs a flow-matching family"),
        (None, dict(exploration="window"), "set exploration=full"),
        (None, dict(objective={"name": "flow_matching", "sigma_range": [0.5, 0.2]}), r"sigma_range must be \[lo, hi"),
        (None, dict(objective={"name": "flow_matching", "timesteps": 0}), "objective.timesteps must be >= 1"),
        (
            None,
            dict(objective={"name": "flow_matching", "rollout_guidance_scale": 0.5}),
            "rollout_guidance_scale must be >= 1",
        ),
        (None, dict(objective={"name": "sde", "rollout_guidance_scale": 2.0}), "use objective=flow_matching"),
        (
            None,
            dict(objective={"name": "flow_matching", "rollout_guidance_scale": float("nan")}),
            "rollout_guidance_scale must be >= 1 and finite",
        ),
        (
            None,
            dict(objective={"name": "flow_matching", "rollout_guidance_scale": float("inf")}),
            "rollout_guidance_scale must be >= 1 and finite",
        ),
    ],
)
def test_bad_options_are_one_clear_error(make, opts, match):
    """make None: the options alone are wrong, checked when they are built (at config load) with no model."""
    with pytest.raises(UserError, match=match):
        options = DiffusionPolicyOptions(**{**FM, **opts})
        DiffusionPolicy(make(), options)


def test_rollout_guidance_guides_the_training_samples_only():
    """rollout_guidance_scale: rollouts are sampled with that CFG (the samples of a policy whose guidance_scale
    is that value), generate() -- the evaluation -- keeps guidance_scale, and the loss trains the unguided
    velocity (the same draws' error as without it)."""
    seeds, prompts = [21, 22], ["a red circle", "two blue squares"]
    torch.manual_seed(0)
    adapter = tiny_sd3_adapter()
    mixed = DiffusionPolicy(adapter, fm(rollout_guidance_scale=4.0))
    r = mixed.rollout(PromptBatch(prompts=prompts, seeds=seeds), group_size=1)
    guided = DiffusionPolicy(adapter, DiffusionPolicyOptions(num_steps=3, guidance_scale=4.0, **FM))
    plain = DiffusionPolicy(adapter, fm())
    assert torch.allclose(r.samples, guided.generate(prompts, seeds), atol=1e-6)
    assert not torch.allclose(r.samples, plain.generate(prompts, seeds), atol=1e-3)  # guidance changed them
    assert torch.equal(mixed.generate(prompts, seeds), plain.generate(prompts, seeds))
    r_plain = plain.rollout(PromptBatch(prompts=prompts, seeds=seeds), group_size=1)
    r_plain.extras["latents"] = r.extras["latents"]  # same x0 and draws: the trained error is the same function
    assert torch.allclose(plain.log_prob(r_plain, torch.arange(2)).logp, r.logp_old, atol=1e-6)
    assert_ratio_one(mixed, r)


def test_two_training_steps_through_the_recipe(tmp_path):
    ckpt = save_tiny_sd3(tmp_path / "ckpt")
    cfg = {
        "pipeline": "text_to_image",
        "policy": {"options": {"family": "sd3", "path": ckpt, "num_steps": 3, **FM}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "trainer": {"max_steps": 2, "prompts_per_step": 2, "group_size": 3, "lr": 1e-3, "progress": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from mmgrpo.policies.models.sd3 import SD3Adapter

    before = SD3Adapter.from_pretrained(ckpt).denoiser.state_dict()
    trainer = train(load_config(path, [f"run.output_dir={tmp_path}"]))
    after = trainer.policy.unwrapped().state_dict()
    assert trainer.step == 2 and any(not torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("objective", ["sde", "flow_matching"])
def test_full_fine_tuning_reference_is_a_frozen_copy_of_the_initial_denoiser(objective):
    objective = {"name": "flow_matching", "timesteps": 3} if objective == "flow_matching" else objective
    opts = DiffusionPolicyOptions(num_steps=2, reference_kl=True, objective=objective)  # sde.noise_level 0.7
    policy = DiffusionPolicy(tiny_sd3_adapter(), opts)
    r = policy.rollout(batch(), group_size=2)
    rows = torch.arange(4)
    kl0 = policy.log_prob(r, rows).kl
    assert torch.allclose(kl0, torch.zeros_like(kl0), atol=1e-10)  # policy == its initial weights
    frozen = {k: v.clone() for k, v in policy._frozen_reference.state_dict().items()}
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.05)
    lp = policy.log_prob(r, rows)
    (-lp.logp.mean() + lp.kl.mean()).backward()
    opt.step()
    assert (policy.log_prob(r, rows).kl > 0).all()  # the policy moved, the reference did not
    assert all(torch.equal(v, policy._frozen_reference.state_dict()[k]) for k, v in frozen.items())
    assert not any(p.requires_grad for p in policy._frozen_reference.parameters())


def test_old_policy_ema_samples_awm_rollouts_and_logp_old_stays_the_trained_weights():
    """objective=flow_matching with old_policy_ema: the EMA samples, the trained weights are scored (ratio 1)."""
    d = 0.5
    policy = DiffusionPolicy(tiny_sd3_adapter(), fm(old_policy_ema=d))
    init = [p.detach().clone() for p in policy.trainable_parameters()]
    policy.rollout(PromptBatch(prompts=["a red circle"], seeds=[1], step=0), group_size=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    r = policy.rollout(PromptBatch(prompts=["a red circle", "two blue squares"], seeds=[11, 12], step=1), 2)
    twin = DiffusionPolicy(tiny_sd3_adapter(), fm())
    with torch.no_grad():
        for p, a, m in zip(twin.trainable_parameters(), init, policy.trainable_parameters()):
            p.copy_(d * a + (1 - d) * m)
    assert torch.allclose(r.samples, twin.rollout(batch(), group_size=2).samples, atol=1e-6)
    assert_ratio_one(policy, r)
