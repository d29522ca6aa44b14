"""The diffusion adapter contract, checked once for every model family (as diffusers' model tester mixins do).

Every family -- SD3, FLUX.1 (dev, schnell), SD 1.5 / SDXL (DDIM), Wan (T2V, I2V, Wan 2.2), HunyuanVideo -- passes the
same tests: right after a rollout the recomputed log-probs give ratio = 1 at micro-batch 1 and G, for every SDE
dynamics x exploration schedule; samples do not depend on the batch layout; the KL to the LoRA-disabled reference is 0
at init, then positive with gradient to the LoRA weights only; noise 0 is the diffusers pipeline's ODE sampler. That
a training step moves only the trainable tensors is checked per family x schedule (and paper setting) in
``test_family_matrix.py``. Family-specific behaviour (packing, schedules, chat templates, first frames, loading) is
tested in ``test_diffusion_<family>.py``. Tiny real models from ``mmgrpo.testing``, built with a fixed seed.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.policies.models.flux import pack_latents, unpack_latents
from mmgrpo.testing.checks import assert_ratio_one
from mmgrpo.testing.tiny_flux import tiny_flux_adapter, tiny_flux_components
from mmgrpo.testing.tiny_hunyuan_video import TINY_SIZE, tiny_hunyuan_video_adapter, tiny_hunyuan_video_components
from mmgrpo.testing.tiny_sd import tiny_sd_adapter, tiny_sd_pipeline
from mmgrpo.testing.tiny_sd3 import tiny_sd3_adapter, tiny_sd3_components
from mmgrpo.testing.tiny_wan import SIZE, euler_on_unipc_grid, tiny_wan_adapter, tiny_wan_components

PROMPTS = ["a red circle", "two blue squares"]
DDIM = {"kind": "ddim", "noise_level": 1.0}  # the sd family's only dynamics, at DDPO's eta


@dataclass(frozen=True)
class Family:
    make: Callable[..., object]
    """tiny adapter factory (same seed -> same weights as the family's diffusers components)"""
    sample: tuple[int, ...]
    """one row's sample: [3, H, W] images or [F, 3, H, W] videos"""
    sde: dict
    """the family's default dynamics"""
    steps: int = 4
    """T of the ratio tests"""


FAMILIES = {
    "sd3": Family(tiny_sd3_adapter, (3, 16, 16), {}),
    "flux": Family(tiny_flux_adapter, (3, 16, 16), {}),
    "sd": Family(tiny_sd_adapter, (3, 16, 16), DDIM),
    "wan": Family(tiny_wan_adapter, (5, 3, 32, 32), {}),
    "hunyuan_video": Family(tiny_hunyuan_video_adapter, (5, 3, 32, 32), {}, steps=3),
}


def frame(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8))


def batch(i2v=False, seeds=(11, 12), prompts=PROMPTS, frames=(1, 2)) -> PromptBatch:
    """B prompts; image-to-video rows carry their first frame in meta."""
    meta = [{"image": frame(s)} for s in frames[: len(prompts)]] if i2v else []
    return PromptBatch(prompts=list(prompts), meta=meta, seeds=list(seeds)[: len(prompts)])


def options(family: str, **kw) -> DiffusionPolicyOptions:
    """The family's dynamics, updated by ``sde`` in kw."""
    return DiffusionPolicyOptions(**{**kw, "sde": {**FAMILIES[family].sde, **kw.get("sde", {})}})


FULL, WINDOW = {"name": "full", "timestep_fraction": 0.5}, {"name": "window", "size": 2}
G2RPO = {"name": "singular", "branch_steps": [1], "granularities": [1, 2]}
FLOW_CASES = [  # (adapter kwargs, policy options): every flow SDE x every exploration schedule, and CFG + LoRA
    ({}, dict(sde={"kind": "flow_grpo"}, exploration="full")),
    ({}, dict(sde={"kind": "dance"}, exploration=FULL, shared_init_noise=True)),
    ({}, dict(sde={"kind": "cps"}, exploration=WINDOW)),
    ({}, dict(sde={"kind": "flow_grpo"}, exploration=G2RPO)),
    ({}, dict(sde={"kind": "flow_grpo"}, exploration="full", guidance_scale=3.0, lora_rank=2)),
]
RATIO_CASES = {
    "sd3": FLOW_CASES,
    "flux": [
        FLOW_CASES[0],
        (
            {},
            dict(
                sde={"kind": "dance", "noise_level": 0.3},
                exploration={"name": "full", "timestep_fraction": 0.6},
                shared_init_noise=True,
            ),
        ),  # fmt: skip
        FLOW_CASES[2],
        ({}, dict(sde={"kind": "dance"}, exploration={**G2RPO, "granularities": [1, 2, 3]})),
        FLOW_CASES[4],  # true CFG
    ],
    "sd": [
        ({}, dict(exploration="full")),
        ({}, dict(exploration=FULL, shared_init_noise=True, sde={"noise_level": 0.3})),
        ({"prediction_type": "v_prediction"}, dict(exploration=WINDOW)),
        ({}, dict(exploration={**G2RPO, "granularities": [1]})),  # DDIM has no sigma schedule to coarsen
        ({}, dict(exploration="full", guidance_scale=7.5, lora_rank=2)),
        ({"xl": True}, dict(exploration="full", guidance_scale=5.0, lora_rank=2)),
    ],
    "wan": [
        *FLOW_CASES,
        ({"image_to_video": True}, dict(sde={"kind": "flow_grpo"}, guidance_scale=3.0, lora_rank=2)),
        (
            {"image_to_video": True, "clip": False, "two_experts": True},
            dict(sde={"kind": "dance"}, guidance_scale=3.0),
        ),
    ],
    "hunyuan_video": FLOW_CASES,
}


def ids(case) -> str:
    model, opts = case
    exploration = opts.get("exploration", "full")
    parts = [*(k for k, v in model.items() if v is True), opts.get("sde", {}).get("kind", ""),
             exploration if isinstance(exploration, str) else exploration["name"]]  # fmt: skip
    parts += ["cfg"] if opts.get("guidance_scale", 1.0) > 1 else []
    return "-".join(p for p in parts if p)


@pytest.mark.parametrize(
    "family, model, opts",
    [pytest.param(f, m, o, id=f"{f}-{i}-{ids((m, o))}") for f, cases in RATIO_CASES.items()
     for i, (m, o) in enumerate(cases)],
)  # fmt: skip
def test_ratio_is_one_after_rollout(family, model, opts):
    spec = FAMILIES[family]
    adapter = spec.make(**model)
    policy = DiffusionPolicy(adapter, options(family, num_steps=spec.steps, **opts))
    rollout = policy.rollout(batch(i2v=model.get("image_to_video", False)), group_size=3)
    assert rollout.samples.shape == (6, *spec.sample)
    assert rollout.extras["latents"].shape == (6, spec.steps + 1, *adapter.latent_shape())
    assert 0 <= rollout.samples.min() and rollout.samples.max() <= 1
    assert torch.isfinite(rollout.logp_old).all()
    assert_ratio_one(policy, rollout)


@pytest.mark.parametrize(
    "family, model",
    [
        ("sd3", {}),
        ("flux", {}),
        ("sd", {}),
        ("wan", {}),
        ("wan", {"image_to_video": True}),
        ("hunyuan_video", {}),
    ],  # fmt: skip
)
def test_samples_are_layout_independent(family, model):
    """A prompt's samples depend on its seed only, not on the other prompts of the batch."""
    i2v = model.get("image_to_video", False)
    policy = DiffusionPolicy(FAMILIES[family].make(**model), options(family, num_steps=3))
    both = policy.rollout(batch(i2v), group_size=2)
    second = policy.rollout(batch(i2v, seeds=[12], prompts=PROMPTS[1:], frames=[2]), group_size=2)
    assert torch.allclose(both.samples[2:], second.samples, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_kl_is_zero_at_init_then_positive(family):
    policy = DiffusionPolicy(FAMILIES[family].make(), options(family, num_steps=3, lora_rank=2, reference_kl=True))
    r = policy.rollout(batch(), group_size=2)
    lp = policy.log_prob(r, torch.arange(4))
    assert torch.allclose(lp.kl, torch.zeros_like(lp.kl), atol=1e-10)  # LoRA B = 0: policy == reference
    with torch.no_grad():
        for name, p in policy.unwrapped().named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lp = policy.log_prob(r, torch.arange(4))
    assert (lp.kl > 0).all()
    lp.logp.sum().backward()  # gradient reaches only LoRA weights
    grads = {n for n, p in policy.unwrapped().named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)


# --------------------------------------------------------------------------- noise 0 = the diffusers pipeline
# each reference runs the family's diffusers pipeline from the policy's initial latents x0 [1, ...] and returns
# (its final latents in the policy's layout, its decoded samples in [0, 1])


def sd3_reference(model, x0, steps, guidance, meta):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components())
    ref = pipe(
        prompt="a red circle", num_inference_steps=steps, guidance_scale=guidance, latents=x0.clone(),
        height=16, width=16, output_type="latent", max_sequence_length=16,
    ).images  # fmt: skip
    img = pipe.vae.decode(ref / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return ref, (img / 2 + 0.5).clamp(0, 1)


def flux_reference(model, x0, steps, true_cfg, meta):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(variant=model.get("variant", "dev")))
    negative = "" if true_cfg > 1 else None  # FluxPipeline's true CFG needs a negative prompt
    kw = dict(prompt="a red circle", num_inference_steps=steps, guidance_scale=model.get("guidance", 3.5),
              height=16, width=16, max_sequence_length=16, true_cfg_scale=true_cfg,
              negative_prompt=negative)  # fmt: skip
    ref = pipe(latents=pack_latents(x0), output_type="latent", **kw).images  # packed [1, 16, 16]
    ref = unpack_latents(ref, *x0.shape[-2:])  # [1, 4, 8, 8], the policy's layout (packing is a permutation)
    # the policy's seeded [C, h, w] noise is the noise FluxPipeline draws from the same generator
    images = pipe(generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images
    return ref, images


def sd_reference(model, x0, steps, guidance, meta):
    pipe = tiny_sd_pipeline(**model)  # StableDiffusion(XL)Pipeline with the same DDIMScheduler
    ref = pipe(
        prompt="a red circle", num_inference_steps=steps, guidance_scale=guidance, latents=x0.clone(), eta=0.0,
        height=16, width=16, output_type="latent",
    ).images  # fmt: skip
    img = pipe.vae.decode(ref / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return ref, (img / 2 + 0.5).clamp(0, 1)


def wan_reference(model, x0, steps, guidance, meta):
    """The diffusers Wan pipeline with a flow-matching Euler scheduler of the checkpoint's shift (3.0) on the
    checkpoint's UniPC grid."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    model = dict(model)
    expand = model.pop("expand_timesteps", False)
    c = {**tiny_wan_components(**model), "scheduler": euler_on_unipc_grid(3.0)}
    if expand:
        c["expand_timesteps"] = True
        assert WanPipeline(**c).config.expand_timesteps
    pipe = (WanImageToVideoPipeline if "image_encoder" in c else WanPipeline)(**c)
    args = dict(prompt="a red circle", num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=16,
                **SIZE, **({"image": meta["image"]} if "image" in meta else {}))  # fmt: skip
    latents = pipe(latents=x0.clone(), output_type="latent", **args).frames
    videos = pipe(latents=x0.clone(), output_type="pt", **args).frames  # [n, F, 3, H, W] in [0, 1]
    return latents, videos


def hunyuan_video_reference(model, x0, steps, true_cfg, meta):
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(**tiny_hunyuan_video_components())
    ref = pipe(
        prompt="a red circle", negative_prompt="" if true_cfg > 1 else None, true_cfg_scale=true_cfg,
        guidance_scale=6.0, num_inference_steps=steps, latents=x0.clone(), output_type="latent",
        max_sequence_length=16, **TINY_SIZE,
    ).frames  # fmt: skip
    video = pipe.vae.decode(ref / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return ref, pipe.video_processor.postprocess_video(video, output_type="pt")  # the pipeline's "pt" output


REFERENCES = {"sd3": (sd3_reference, 5), "flux": (flux_reference, 5), "sd": (sd_reference, 4),
              "wan": (wan_reference, 5), "hunyuan_video": (hunyuan_video_reference, 4)}  # fmt: skip
PIPELINE_CASES = [  # (family, adapter kwargs, the policy's CFG scale)
    ("sd3", {}, 1.0),
    ("sd3", {}, 4.0),
    ("flux", {"variant": "dev", "guidance": 3.5}, 1.0),  # distilled guidance
    ("flux", {"variant": "dev", "guidance": 2.0}, 4.0),  # + true CFG
    ("flux", {"variant": "schnell", "guidance": 0.0}, 1.0),
    ("sd", {}, 1.0),
    ("sd", {}, 7.5),
    ("sd", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 7.5),
    ("sd", {"xl": True}, 1.0),
    ("sd", {"xl": True}, 5.0),
    ("wan", {}, 1.0),
    ("wan", {}, 4.0),
    ("wan", {"two_experts": True}, 4.0),  # Wan 2.2 A14B: high-noise expert for t >= 600, low-noise below
    ("wan", {"expand_timesteps": True}, 4.0),  # Wan 2.2 TI2V: per-token timesteps
    ("wan", {"image_to_video": True}, 4.0),  # Wan 2.1 I2V: condition channels + CLIP image embeddings
    ("wan", {"image_to_video": True, "clip": False, "two_experts": True}, 1.0),  # Wan 2.2 I2V-A14B
    ("hunyuan_video", {}, 1.0),
    ("hunyuan_video", {}, 4.0),
]


@pytest.mark.parametrize(
    "family, model, guidance", [pytest.param(*c, id=f"{c[0]}-{i}") for i, c in enumerate(PIPELINE_CASES)]
)
def test_noise_zero_equals_diffusers_pipeline(family, model, guidance):
    reference, steps = REFERENCES[family]
    adapter = FAMILIES[family].make(**model)  # same seed -> same weights as the pipeline's components
    policy = DiffusionPolicy(adapter, options(family, num_steps=steps, sde={"noise_level": 0.0},
                                              guidance_scale=guidance))  # fmt: skip
    meta = {"image": frame(3)} if model.get("image_to_video") else {}
    out = policy.rollout(PromptBatch(prompts=["a red circle"], meta=[meta], seeds=[5]), group_size=1)
    if model.get("two_experts"):  # both experts run: timesteps straddle the boundary 0.6 * 1000
        t = adapter.schedule(steps).timesteps
        assert (t >= 600).any() and (t < 600).any()
    ref_latents, ref_samples = reference(model, out.extras["latents"][:, 0], steps, guidance, meta)
    got = out.extras["latents"][:, -1]
    assert torch.allclose(got, ref_latents, atol=1e-4), (got - ref_latents).abs().max()
    assert out.samples.shape == ref_samples.shape == (1, *FAMILIES[family].sample)
    assert torch.allclose(out.samples, ref_samples, atol=1e-4), (out.samples - ref_samples).abs().max()


@pytest.mark.parametrize("family", ["sd3", "flux", "sd"])
def test_the_image_vae_decodes_a_large_rollout_in_parts_of_a_bounded_size(family, monkeypatch):
    """A rollout's latents are decoded in parts of at most DECODE_LATENT_PIXELS latent pixels (VAE memory does not grow
    with B x G): the images equal one call's, and the decoder runs once a part."""
    import mmgrpo.policies.models as models

    adapter = FAMILIES[family].make(0)
    torch.manual_seed(0)
    z = torch.randn(7, adapter.vae.config.latent_channels, 2, 2)  # 16 px images
    whole = adapter.decode(z)  # 7 rows x 4 latent pixels: one call at the default budget
    calls = []
    hook = adapter.vae.decoder.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    try:
        assert calls == [] and adapter.decode(z).shape == whole.shape and calls == [7]
        calls.clear()
        monkeypatch.setattr(models, "DECODE_LATENT_PIXELS", 12)  # 3 rows of 2 x 2 a call
        parts = adapter.decode(z)
        monkeypatch.setattr(models, "DECODE_LATENT_PIXELS", 1)  # never below one row a call
        rows = adapter.decode(z[:2])
    finally:
        hook.remove()
    assert calls == [3, 3, 1, 1, 1]
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows, whole[:2], atol=1e-5, rtol=1e-5)
