"""2-step smokes of the prompt samplers (SPO, GDRO, ragged fixed sizes, Beyond Variance's pairing, VSPO) on the VLM
policy (tiny Qwen2-VL) and on the diffusion policy (the shipped shapes text-to-image model): the loop runs, rewards
and losses are finite, the trained weights move, and the groups have the sizes the sampler asked for."""

import json
import math
from pathlib import Path

import pytest
import torch

from mmgrpo.rewards.registry import register
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import Trainer, prepare_run_dir

REPO = Path(__file__).resolve().parents[2]
SAMPLERS = {
    "spo": ({"name": "spo"}, "spo"),
    "gdro": ({"name": "gdro", "options": {"n_min": 1, "n_max": 4}}, "grpo"),
    "ragged": ({"name": "fixed_sizes", "options": {"group_sizes": [1, 3]}}, "grpo"),
    "pairing": ({"name": "pairing"}, "weighted_grpo"),
    "vspo": ({"name": "vspo"}, "grpo"),  # with advantage.dynamic_sampling (below)
}
DYNAMIC = ["advantage.dynamic_sampling=true", "advantage.max_refill_rounds=1"]


@register("test_sampler_length")
def _length_reward():
    """Test reward in [0, 1]: completion length / 64 (capped). A random tiny model fails the verifiable rewards, so
    this dense term gives the groups different rewards and the smoke a gradient."""
    return lambda samples, prompts, meta, ctx: [min(1.0, len(s) / 64.0) for s in samples]


@register("test_sampler_brightness")
def _brightness_reward():
    """Test reward in [0, 1]: an image's mean brightness. The shapes verifier scores 3-step samples 0 almost always,
    and groups of equal rewards have no gradient (DiffusionNFT's loss at A = 0 is flat at the sampling policy); this
    dense term gives the diffusion smoke one."""
    return lambda samples, prompts, meta, ctx: [float(x.float().mean()) for x in samples]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny(*tiny_qwen2_vl(), tmp_path_factory.mktemp("tiny_vlm") / "qwen2_vl")


def _run_two_steps(cfg):
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    model = trainer.acc.unwrap_model(trainer.policy.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sizes = []
    for step in range(2):
        rollout, cols, _ = trainer.collect(step)
        sizes.append(rollout.sizes)
        adv, row_w, m = trainer.advantage(cols, rollout, step)
        assert adv.shape == (rollout.num_rows,) and torch.isfinite(adv).all()
        out = trainer.update(rollout, adv, row_w, step)
        assert math.isfinite(out["loss/total"]) and math.isfinite(m["reward/mean"])
        if cfg.sampler.name == "spo":  # SPO's KL-adaptive tracker: the update's measured drift
            assert 0 <= out["policy/kl_step"] < 10
        trainer.step = step + 1
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    return trainer, sizes, moved


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_two_vlm_steps_with_each_sampler(tmp_path, vlm_dir, name):
    sampler, estimator = SAMPLERS[name]
    data = read_yaml(REPO / "configs" / "vlm_reasoning_tiny.yaml")
    data["run"].update(name=f"vlm_{name}", output_dir=str(tmp_path))
    data["policy"]["options"].update(path=str(vlm_dir), max_new_tokens=8, lora_rank=4)
    data["data"]["options"].update(num_examples=12, eval_examples=2)
    data["trainer"].update(max_steps=2, prompts_per_step=2, group_size=2, micro_batch_size=2, lr=0.05,
                           eval_every=0, checkpoint_every=0, progress=False)  # fmt: skip
    data["rewards"] = [{"name": "format", "weight": 0.25}, {"name": "accuracy", "weight": 0.25},
                       {"name": "test_sampler_length", "weight": 0.5}]  # fmt: skip
    data["sampler"], data["advantage"]["estimator"] = sampler, estimator
    if name == "vspo":
        data["advantage"].update(dynamic_sampling=True, max_refill_rounds=1)
    trainer, sizes, moved = _run_two_steps(load_config(None, base=data))
    assert moved and all("lora" in n for n in moved), moved
    if name == "ragged":
        assert sizes == [[1, 3], [1, 3]]
    assert all(sum(s) == 4 for s in sizes)  # the mean budget (2 prompts x G 2) every step


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_two_diffusion_steps_with_each_sampler(tmp_path, monkeypatch, name):
    monkeypatch.chdir(REPO)  # the config names assets/shapes_t2i relative to the repository
    sampler, estimator = SAMPLERS[name]
    cfg = load_config(
        REPO / "configs" / "shapes_t2i_grpo.yaml",
        [f"run.output_dir={tmp_path}", f"run.name=t2i_{name}", "trainer.max_steps=2", "trainer.prompts_per_step=2",
         "trainer.group_size=2", "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.progress=false",
         "policy.options.num_steps=3", f"sampler={json.dumps(sampler)}", f"advantage.estimator={estimator}",
         f"rewards={json.dumps([{'name': 'test_sampler_brightness'}])}",
         *(DYNAMIC if name == "vspo" else [])],
    )  # fmt: skip
    trainer, sizes, moved = _run_two_steps(cfg)
    assert moved
    if name == "ragged":
        assert sizes == [[1, 3], [1, 3]]
    assert all(sum(s) == 4 for s in sizes)
