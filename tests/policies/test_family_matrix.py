"""Cross-family matrix of the diffusion side: every family x every exploration schedule trains its LoRA only.

Acceptance: a 2-step training run per family (SD3, FLUX.1, SD1.5 DDIM, Wan T2V, HunyuanVideo) and per
exploration schedule (full: DanceGRPO/Flow-GRPO; window: MixGRPO; singular: G2RPO) updates every LoRA weight
set and leaves every other weight (denoiser, text encoders, VAE) bit-identical to the saved checkpoint; so do the
families' paper settings (DanceGRPO's shared noise, Flow-GRPO's reference KL, SDXL with CFG, ...).
Also: gradient checkpointing gives the same log-probs and gradients; bf16 autocast keeps ratio = 1 at the
first minibatch. Tiny real checkpoints from ``mmgrpo.testing``, saved once per module.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmgrpo.core.types import PromptBatch
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.policies.loading import GeneratorPolicyOptions, load_adapter
from mmgrpo.testing.checks import assert_only_lora_changed
from mmgrpo.testing.tiny_flux import save_tiny_flux
from mmgrpo.testing.tiny_hunyuan_video import TINY_SIZE as HUNYUAN_SIZE
from mmgrpo.testing.tiny_hunyuan_video import save_tiny_hunyuan_video
from mmgrpo.testing.tiny_sd import save_tiny_sd
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3, tiny_sd3_adapter
from mmgrpo.testing.tiny_wan import SIZE as WAN_SIZE
from mmgrpo.testing.tiny_wan import save_tiny_wan
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

# family -> (checkpoint writer, pipeline, reward, family-specific policy options)
FAMILIES = {
    "sd3": (save_tiny_sd3, "text_to_image", "jpeg_incompressibility", {}),
    "flux": (save_tiny_flux, "text_to_image", "jpeg_incompressibility", {"height": 16, "width": 16}),
    "sd": (save_tiny_sd, "text_to_image", "jpeg_incompressibility", {"sde": {"kind": "ddim", "noise_level": 1.0}}),
    "wan": (save_tiny_wan, "text_to_video", "motion", dict(WAN_SIZE)),
    "hunyuan_video": (save_tiny_hunyuan_video, "text_to_video", "motion", dict(HUNYUAN_SIZE)),
}
FLOW = ["sd3", "flux", "wan", "hunyuan_video"]


def exploration_options(family: str, exploration: str) -> dict:
    """T = 2 steps; G2RPO uses T = 3 with k = 0 so granularity 2 continues on sigmas [1, 3], not [1, 2, 3]."""
    if exploration == "full":
        return {"exploration": {"name": "full"}, "num_steps": 2}
    if exploration == "window":  # one SDE step out of two (MixGRPO), so the ODE part of the window is exercised
        return {"exploration": {"name": "window", "size": 1}, "num_steps": 2}
    granularities = [1, 2] if family in FLOW else [1]  # SD's DDIM has no sigma schedule to coarsen
    return {"exploration": {"name": "singular", "branch_steps": [0], "granularities": granularities}, "num_steps": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(family, writer kwargs) -> path of its tiny checkpoint, written at most once per module."""
    saved: dict[tuple, str] = {}

    def get(family: str, **kw) -> str:
        key = (family, *sorted(kw.items()))
        if key not in saved:
            saved[key] = FAMILIES[family][0](tmp_path_factory.mktemp(family) / "ckpt", **kw)
        return saved[key]

    return get


def run_training(tmp_path: Path, family: str, ckpt: str, policy_opts: dict, loss: dict | None = None, **trainer_opts):
    """2 training steps of 1 prompt x G = 2 samples (unless ``trainer_opts`` say otherwise) through the family's
    recipe, LoRA rank 2."""
    _, pipeline, reward, family_opts = FAMILIES[family]
    cfg = {
        "pipeline": pipeline,
        "policy": {"options": {"family": family, "path": ckpt, "lora_rank": 2, **family_opts, **policy_opts}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": reward}],
        "loss": loss or {},
        "trainer": {"max_steps": 2, "prompts_per_step": 1, "group_size": 2, "lr": 1e-2, "progress": False,
                    **trainer_opts},
    }  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return train(load_config(path, [f"run.output_dir={tmp_path}"]))


def component(trainer, folder: str) -> torch.nn.Module:
    """The live module of the trained policy that checkpoint sub-folder ``folder`` was loaded into."""
    adapter = trainer.policy.adapter
    if folder in ("transformer", "unet"):
        return trainer.policy.unwrapped()
    if hasattr(adapter, folder):
        return getattr(adapter, folder)
    suffix = folder.removeprefix("text_encoder")  # SD3 keeps its three encoders in a list
    return adapter.text_encoders[int(suffix.lstrip("_") or 1) - 1]


def assert_equals_checkpoint(module: torch.nn.Module, weights: Path) -> int:
    """Every non-LoRA tensor of ``module`` is bit-identical to the file's; returns how many were compared.

    peft renames a wrapped Linear's weights to ``*.base_layer.*``; tied weights (T5's shared embedding) are
    stored once, so a module tensor missing from the file must alias one that was compared.
    """
    saved = load_file(str(weights))
    now = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
    compared = set()
    for k, v in saved.items():
        assert k in now, f"{weights}: {k} not in the live module"
        assert torch.equal(now[k], v), f"{weights}: {k} changed"
        compared.add(now[k].data_ptr())
    unchecked = [k for k, v in now.items() if k not in saved and v.data_ptr() not in compared]
    assert not unchecked, f"{weights}: tensors not in the checkpoint: {unchecked[:5]}"
    return len(saved)


def unreachable_lora(model: torch.nn.Module) -> set[str]:
    """LoRA-wrapped projections that cannot reach the output, so no loss can train them.

    An attention whose context stream ends there (``context_pre_only``: SD3's last MMDiT block) computes the
    context queries and then drops the context rows of its output, so its ``add_q_proj`` gets no gradient.
    """
    ends = [n for n, m in model.named_modules() if getattr(m, "context_pre_only", None) is True]
    return {f"{n}.add_q_proj" for n in ends if getattr(model.get_submodule(n), "add_q_proj", None) is not None}


@pytest.mark.parametrize("exploration", ["full", "window", "singular"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_step_training_changes_lora_and_nothing_else(tmp_path, checkpoint, family, exploration):
    ckpt = checkpoint(family)
    trainer = run_training(tmp_path, family, ckpt, exploration_options(family, exploration))
    lora_b = {k: v for k, v in trainer.policy.unwrapped().state_dict().items() if "lora_B" in k}
    assert lora_b, "no LoRA was added"
    zero = [k.split(".lora_B")[0] for k, v in lora_b.items() if not v.any()]  # lora_B starts at 0
    assert set(zero) == unreachable_lora(trainer.policy.unwrapped()), f"LoRA weights never updated: {zero[:5]}"
    folders = sorted(p.parent.name for p in Path(ckpt).glob("*/*.safetensors"))
    assert {"vae", "text_encoder"} <= set(folders) and ({"transformer", "unet"} & set(folders))
    for folder in folders:
        (weights,) = (Path(ckpt) / folder).glob("*.safetensors")
        assert assert_equals_checkpoint(component(trainer, folder), weights) > 0


G2RPO_01 = {"name": "singular", "branch_steps": [0, 1], "granularities": [1, 2]}
PAPER_CASES = [  # (family, checkpoint kwargs, policy options, loss options, group size G): 2 prompts x G, T = 3
    ("sd3", {}, {"exploration": {"name": "full", "timestep_fraction": 0.5}, "sde": {"kind": "dance"}}, {}, 3),
    ("sd3", {}, {"exploration": {"name": "window", "size": 2}}, {}, 3),
    ("sd3", {}, {"exploration": G2RPO_01}, {}, 3),
    ("flux", {}, {"sde": {"kind": "dance", "noise_level": 0.3}, "shared_init_noise": True,
                  "exploration": {"name": "full", "timestep_fraction": 0.6}}, {}, 3),  # DanceGRPO
    ("flux", {}, {"exploration": G2RPO_01, "sde": {"kind": "dance"}}, {}, 3),
    ("sd", {"xl": False}, {"guidance_scale": 7.5, "exploration": {"name": "full", "timestep_fraction": 0.67}}, {}, 2),
    ("sd", {"xl": True}, {"guidance_scale": 7.5, "exploration": {"name": "full", "timestep_fraction": 0.67}}, {}, 2),
    ("hunyuan_video", {}, {"reference_kl": True}, {"beta": 0.04}, 2),  # Flow-GRPO's KL to the LoRA-free reference
    ("hunyuan_video", {}, {"exploration": G2RPO_01}, {}, 2),
]  # fmt: skip


@pytest.mark.parametrize(
    "family, model, policy_opts, loss, group_size",
    [pytest.param(*c, id=f"{c[0]}-{i}") for i, c in enumerate(PAPER_CASES)],
)
def test_paper_settings_train_only_lora(tmp_path, checkpoint, family, model, policy_opts, loss, group_size):
    ckpt = checkpoint(family, **model)
    size = {k: v for k, v in FAMILIES[family][3].items() if k in ("height", "width", "num_frames")}
    before = load_adapter(GeneratorPolicyOptions(family=family, path=ckpt, **size)).denoiser.state_dict()
    loss = {"options": {"clip_low": 1e-3, "clip_high": 1e-3}, **loss}
    trainer = run_training(tmp_path, family, ckpt, {"num_steps": 3, **policy_opts}, loss,
                           prompts_per_step=2, group_size=group_size)  # fmt: skip
    assert trainer.policy.adapter.family == family and getattr(trainer.policy.adapter, "xl", False) == model.get(
        "xl", False
    )
    assert_only_lora_changed(before, trainer.policy.unwrapped())


def logprob_and_grads(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor, dict, int]:
    """Tiny SD3 with LoRA: rollout, then log_prob [N=4, K=2] with grad in train mode, as the update phase does.

    Returns logp_old, logp, the LoRA gradients and how many times block 0's attention ran in the backward pass.
    """
    torch.manual_seed(0)  # same base weights and same LoRA init for both settings
    opts = DiffusionPolicyOptions(num_steps=2, lora_rank=2, gradient_checkpointing=checkpointing)
    policy = DiffusionPolicy(tiny_sd3_adapter(), opts)
    model = policy.unwrapped()
    assert model.is_gradient_checkpointing == checkpointing
    with torch.no_grad():  # non-zero lora_B, so that lora_A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    rollout = policy.rollout(PromptBatch(prompts=["a red circle", "two blue squares"], seeds=[11, 12]), 2)
    model.train()  # the trainer's update phase runs the denoiser in train mode
    calls = []  # a hook inside the checkpointed block: torch re-runs the block's children when it recomputes
    hook = model.transformer_blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    lp = policy.log_prob(rollout, torch.arange(4), torch.arange(2)).logp  # [N=4, K=2]
    forwards = len(calls)
    lp.sum().backward()
    hook.remove()
    dead = unreachable_lora(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.any() for n, g in grads.items() if n.split(".lora_")[0] not in dead)
    return rollout.logp_old, lp.detach(), grads, len(calls) - forwards


def test_gradient_checkpointing_gives_same_logprob_and_gradient():
    old0, lp0, g0, recomputed0 = logprob_and_grads(checkpointing=False)
    old1, lp1, g1, recomputed1 = logprob_and_grads(checkpointing=True)
    assert (recomputed0, recomputed1) == (0, 1)  # checkpointing is really on: block 0 recomputed in backward
    assert torch.equal(old0, old1)  # sampling runs without grad, where checkpointing does nothing
    assert torch.allclose(lp0, lp1, atol=1e-6, rtol=0), (lp0 - lp1).abs().max()
    assert g0.keys() == g1.keys()
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-6, rtol=0), (k, (g0[k] - g1[k]).abs().max())


def test_bf16_mixed_precision_keeps_ratio_one(tmp_path, checkpoint):
    trainer = run_training(tmp_path, "sd3", checkpoint("sd3"), {"num_steps": 2}, mixed_precision="bf16")
    model = trainer.policy.unwrapped()
    dtypes = []  # autocast is really on: the denoiser's linear layers compute in bf16 (its output is cast to fp32)
    hook = model.proj_out.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    trainer.policy.rollout(PromptBatch(prompts=["a red circle"], seeds=[1]), group_size=1)
    hook.remove()
    assert dtypes == [torch.bfloat16] * 2  # T = 2 denoiser calls
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss/ratio_mean" in x]
    assert [x["step"] for x in steps] == [1, 2]
    # 1 epoch x 1 minibatch: each step's only minibatch is scored by the parameters that sampled it -> ratio 1
    for x in steps:
        assert abs(x["loss/ratio_mean"] - 1.0) < 1e-3, x
        assert abs(x["loss/ratio_max"] - 1.0) < 1e-3, x
    trained = {k.split(".lora_B")[0] for k, v in model.state_dict().items() if "lora_B" in k and v.any()}
    assert trained and not trained & unreachable_lora(model)


def test_a_full_fine_tunes_frozen_reference_runs_in_the_policys_autocast(tmp_path, checkpoint):
    """Full fine-tuning with a KL to the frozen initial denoiser, under bf16 mixed precision: the reference's forwards
    autocast as the prepared policy's do, so the KL of the first update (weights still the reference's) is exactly 0
    and its layers compute in bf16."""
    trainer = run_training(tmp_path, "sd3", checkpoint("sd3"), {"num_steps": 2, "lora_rank": 0, "reference_kl": True},
                           loss={"beta": 0.1}, mixed_precision="bf16", max_steps=1, lr=1e-4)  # fmt: skip
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    kls = [x["loss/kl"] for x in lines if "loss/kl" in x]
    assert kls == [0.0]
    dtypes = []
    ref = trainer.policy._frozen_reference
    hook = ref.proj_out.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    with trainer.policy.reference() as module:
        assert module is ref
        trainer.policy.adapter.predict(module, torch.zeros(1, 4, 4, 4), torch.tensor([500.0]),
                                       trainer.policy.adapter.encode(["a red circle"]))  # fmt: skip
    hook.remove()
    assert dtypes == [torch.bfloat16]
