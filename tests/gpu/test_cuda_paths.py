"""The bf16 CUDA contract (skipped without a GPU): bf16 weights on the device keep ratio = 1 right after the rollout
(within a bf16 tolerance) at micro-batch 1 and G, and a training step gives a finite loss that moves only the
trainable (LoRA) tensors. One diffusion family (tiny SD3) and one VLM family (tiny Qwen2-VL), through the trainer."""

import json
import math

import pytest
import torch

from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_RATIO_TOL = 2e-2  # |ratio - 1|: bf16 weights, states and log-prob maths in fp32
G = 4

if "test_gpu_brightness" not in REWARDS:  # rewards that vary within every group, so every step trains

    @register("test_gpu_brightness")
    def _brightness():
        return lambda samples, prompts, meta, ctx: [float(s.float().mean()) for s in samples]

    @register("test_gpu_checksum")
    def _checksum():
        return lambda samples, prompts, meta, ctx: [sum(map(ord, s)) % 97 / 97 for s in samples]


def make_trainer(tmp_path, pipeline: str, policy: dict, data: dict, reward: str, **trainer) -> Trainer:
    base = {
        "pipeline": pipeline,
        "policy": {"options": policy},
        "data": {"options": data},
        "rewards": [{"name": reward}],
        "trainer": {"max_steps": 2, "prompts_per_step": 2, "group_size": G, "lr": 1e-2, "progress": False,
                    "checkpoint_every": 0, "logp_old": "rollout", **trainer},  # the ratio check reads logp_old
    }  # fmt: skip
    cfg = load_config(None, [f"run.output_dir={tmp_path}"], base=base)
    (tmp_path / "run").mkdir()
    return Trainer(cfg, tmp_path / "run")


def ratio_error(policy, rollout, micro: int) -> float:
    worst = 0.0
    with torch.no_grad():
        for lo in range(0, rollout.num_rows, micro):
            rows = torch.arange(lo, min(lo + micro, rollout.num_rows))
            mask = rollout.train_mask[rows]
            units = mask.any(0).nonzero().reshape(-1)
            lp = policy.log_prob(rollout, rows, units).logp.float().cpu()
            ratio = torch.exp(lp - rollout.logp_old[rows][:, units].float().cpu())
            worst = max(worst, float((ratio - 1).abs().masked_select(mask[:, units].cpu()).max()))
    return worst


def check_contract(trainer: Trainer, model: torch.nn.Module) -> list[float]:
    """Asserts the bf16 contract; returns the two training steps' losses."""
    assert trainer.acc.device.type == "cuda"
    assert any(p.dtype == torch.bfloat16 and p.is_cuda for p in model.parameters())
    rollout = trainer.sample(trainer.prompts_for(0, 0), 0)
    trainer.policy.model.train()
    for micro in (1, G):
        assert ratio_error(trainer.policy, rollout, micro) <= BF16_RATIO_TOL, micro
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    trainer.train()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss/total"] for x in lines if "loss/total" in x]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n][1], p.detach())}
    trainable = {n for n, (req, _) in before.items() if req}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]
    return losses


def test_sd3_bf16_on_cuda(tmp_path):
    ckpt = save_tiny_sd3(tmp_path / "ckpt")
    policy = {"family": "sd3", "path": ckpt, "dtype": "bfloat16", "num_steps": 3, "lora_rank": 2}
    trainer = make_trainer(tmp_path, "text_to_image", policy, {"heldout_prompts": "", "prompts": "shapes"},
                           "test_gpu_brightness")  # fmt: skip
    assert len(check_contract(trainer, trainer.policy.unwrapped())) == 2


def test_qwen2_vl_bf16_on_cuda(tmp_path):
    model, processor = tiny_qwen2_vl()
    path = str(save_tiny(model, processor, tmp_path / "vlm"))
    policy = {"path": path, "dtype": "bfloat16", "max_new_tokens": 16}
    trainer = make_trainer(tmp_path, "vlm_reasoning", policy, {"num_examples": 32, "eval_examples": 4},
                           "test_gpu_checksum", micro_batch_size=G)  # fmt: skip
    assert len(check_contract(trainer, trainer.acc.unwrap_model(trainer.policy.model))) == 2
    # the training's train() / eval() switches on CUDA did not load the hub's kernels (NO_HUB_KERNELS): with them, an
    # offline machine fails at the first switch, and the rollout and the update could run different layers
    from transformers import PreTrainedModel

    hf = [m for m in trainer.policy.model.modules() if isinstance(m, PreTrainedModel)]
    assert hf and not any(m.use_kernels for m in hf)


def rollout_syncs(tmp_path, ckpt: str, T: int) -> int:
    """Host-device synchronisations of one fp32 SD3 rollout of T steps (torch's sync debug mode warns at each)."""
    import warnings

    policy = {"family": "sd3", "path": ckpt, "num_steps": T, "lora_rank": 2}
    trainer = make_trainer(tmp_path / f"T{T}", "text_to_image", policy, {"heldout_prompts": "", "prompts": "shapes"},
                           "test_gpu_brightness")  # fmt: skip
    batch = trainer.prompts_for(0, 0)
    trainer.sample(batch, 0)  # warm-up: the first call's one-time work (allocator, kernels) is not the loop's
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.policy.rollout(batch, G)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in seen)


def test_the_sde_rollout_loop_makes_no_host_device_synchronisation(tmp_path):
    """The host runs ahead of the device through the sampling loop (so its per-step work, the noise draws, overlaps
    the forwards): a rollout of 6 steps synchronises exactly as often as one of 2 (encoding and the read-back at the
    end), none per step. The CPU counterpart: test_sde.py's meta-device test."""
    ckpt = save_tiny_sd3(tmp_path / "ckpt")
    (tmp_path / "T2").mkdir()
    (tmp_path / "T6").mkdir()
    assert rollout_syncs(tmp_path, ckpt, 6) == rollout_syncs(tmp_path, ckpt, 2)


def test_fp16_mixed_precision_keeps_the_gradient_scaler_on_the_gpu(tmp_path):
    """The loss meets logp_old on the host; it is moved to the device before backward, so fp16's GradScaler creates
    its scale there (on the host, its update would read the GPU's overflow flags through unsynchronised copies and
    could apply an overflowed step). Two steps train with finite losses."""
    ckpt = save_tiny_sd3(tmp_path / "ckpt")
    policy = {"family": "sd3", "path": ckpt, "num_steps": 3, "lora_rank": 2}
    trainer = make_trainer(tmp_path, "text_to_image", policy, {"heldout_prompts": "", "prompts": "shapes"},
                           "test_gpu_brightness", mixed_precision="fp16")  # fmt: skip
    trainer.train()
    assert trainer.acc.scaler is not None and trainer.acc.scaler._scale.device.type == "cuda"
    path = trainer.save()  # a resume restores the scale and its growth count
    (tmp_path / "again").mkdir()
    again = make_trainer(tmp_path / "again", "text_to_image", policy, {"heldout_prompts": "", "prompts": "shapes"},
                         "test_gpu_brightness", mixed_precision="fp16")  # fmt: skip
    again.load(path)
    assert again.acc.scaler.state_dict() == trainer.acc.scaler.state_dict()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(x["loss/total"]) for x in lines if "loss/total" in x] == [True, True]


def test_a_vlm_rollout_without_seeds_samples_from_a_cpu_generator(tmp_path):
    """rollout(batch without seeds, G, a CPU generator) with the model on the GPU: the sampler draws each prompt's
    generator on the device from the given one (the CPU generator itself cannot drive CUDA draws), reproducibly."""
    from mmgrpo.core.types import PromptBatch

    model, processor = tiny_qwen2_vl()
    path = str(save_tiny(model, processor, tmp_path / "vlm"))
    trainer = make_trainer(tmp_path, "vlm_reasoning", {"path": path, "max_new_tokens": 8},
                           {"num_examples": 8, "eval_examples": 2}, "test_gpu_checksum")  # fmt: skip
    seeded = trainer.prompts_for(0, 0)
    batch = PromptBatch(prompts=seeded.prompts, meta=seeded.meta, step=0)
    a = trainer.policy.rollout(batch, G, torch.Generator().manual_seed(1))
    b = trainer.policy.rollout(batch, G, torch.Generator().manual_seed(1))
    assert torch.equal(a.extras["completion_ids"], b.extras["completion_ids"])


def test_the_bandit_recipe_trains_and_evaluates_on_cuda(tmp_path):
    """The README's first recipe on the GPU (accelerate moves its logits there): the rollout samples from the
    prompts' CPU generators, log_prob gathers and the reference KL meet on the device, evaluation reads the host."""
    trainer = make_trainer(tmp_path, "bandit", {"reference": True}, {"num_prompts": 4, "num_arms": 3},
                           "bandit_arm_value", eval_every=1)  # fmt: skip
    assert trainer.policy.model.logits.is_cuda
    trainer.cfg.loss.beta = 0.05
    trainer.train()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(x["loss/total"]) for x in lines if "loss/total" in x] == [True, True]
    assert sum("eval/expected_reward" in x for x in lines) >= 2


def test_the_pixel_embedder_takes_cuda_images_at_any_downscale():
    """``diversity`` / ``temporal_consistency`` with the pixels embedder on the decoded images (on the GPU): 1024 px
    to 8 px is a downscale CUDA's antialiased resize refuses; the thumbnails are made on the host, as on a CPU."""
    from mmgrpo.rewards.image import pixel_embed

    images = torch.rand(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pixel_embed(images.cuda(), 8), pixel_embed(images, 8))
