"""trainer.logp_old=auto: a rollout that feeds ONE optimizer step (epochs x minibatches = 1) leaves logp_old to the
update, whose own forward runs at the sampling parameters (logp.detach(): ratio exactly 1, one forward less); the
loss and the gradients equal those of the recorded logp_old (trainer.logp_old=rollout). On the tiny real Qwen2-VL
and the tiny SD3 with objective flow_matching; nft (whose rollout forward stores v_old) and several optimizer steps
keep the recorded logp_old."""

import math

import pytest
import torch

from mmgrpo.core.types import PromptBatch, concat_rollouts, select_groups
from mmgrpo.policies.diffusion import DiffusionPolicy, DiffusionPolicyOptions
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3, tiny_sd3_adapter
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer

if "test_logp_old_length" not in REWARDS:

    @register("test_logp_old_length")
    def _length_reward():
        """Test reward: completion length / 10 (varies within a group of a random model)."""
        return lambda samples, prompts, meta, ctx: [len(s) / 10.0 for s in samples]


def vlm_trainer(tmp_path, name: str, *overrides: str) -> Trainer:
    model_dir = tmp_path / "vlm"
    if not model_dir.exists():
        save_tiny(*tiny_qwen2_vl(), model_dir)
    base = {
        "pipeline": "vlm_reasoning",
        "run": {"name": name, "seed": 0, "output_dir": str(tmp_path / "runs")},
        "data": {"options": {"num_examples": 16, "image_size": 32}},
        "policy": {"options": {"path": str(model_dir), "max_new_tokens": 6, "lora_rank": 4}},
        "rewards": [{"name": "test_logp_old_length"}],
        "loss": {"beta": 0.0},
        "trainer": {"max_steps": 1, "prompts_per_step": 2, "group_size": 3, "micro_batch_size": 2, "lr": 0.05,
                    "progress": False, "checkpoint_every": 0, "max_grad_norm": None},
    }  # fmt: skip
    cfg = load_config(None, list(overrides), base=base)
    (tmp_path / "runs" / name).mkdir(parents=True)
    return Trainer(cfg, tmp_path / "runs" / name)


def sd3_trainer(tmp_path, name: str, *overrides: str) -> Trainer:
    ckpt = tmp_path / "sd3"
    if not ckpt.exists():
        save_tiny_sd3(ckpt)
    base = {
        "pipeline": "text_to_image",
        "run": {"name": name, "seed": 0, "output_dir": str(tmp_path / "runs")},
        "policy": {"options": {"family": "sd3", "path": str(ckpt), "num_steps": 3, "sde": {"noise_level": 0.0},
                               "objective": {"name": "flow_matching", "timesteps": 3}}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "trainer": {"max_steps": 1, "prompts_per_step": 2, "group_size": 3, "micro_batch_size": 4, "lr": 1e-3,
                    "progress": False, "checkpoint_every": 0, "max_grad_norm": None},
    }  # fmt: skip
    cfg = load_config(None, list(overrides), base=base)
    (tmp_path / "runs" / name).mkdir(parents=True)
    return Trainer(cfg, tmp_path / "runs" / name)


def one_step(trainer: Trainer, count_in: torch.nn.Module):
    """collect + advantage + update of step 0: (rollout, update metrics, gradients at the optimizer step, forwards
    of ``count_in`` while sampling; the VLM scorer's forwards that run the sampler's decode loop, ``run=``, are not
    counted)."""
    calls = []
    handle = count_in.register_forward_pre_hook(
        lambda mod, args, kw: calls.append(1) if kw.get("run") is None else None, with_kwargs=True
    )
    rollout, cols, _ = trainer.collect(0)
    handle.remove()
    adv, row_w, _ = trainer.advantage(cols, rollout, 0)
    grads = []
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    hook = inner.register_step_pre_hook(lambda *a: grads.append([p.grad.detach().clone() for p in trainer.params]))
    metrics = trainer.update(rollout, adv, row_w, 0)
    hook.remove()
    assert len(grads) == 1
    return rollout, metrics, grads[0], len(calls)


def assert_same_update(auto, recorded):
    (r_a, m_a, g_a, _), (r_r, m_r, g_r, _) = auto, recorded
    assert r_a.samples == r_r.samples if isinstance(r_a.samples, list) else torch.equal(r_a.samples, r_r.samples)
    assert m_a["loss/ratio_mean"] == 1.0 and m_a["loss/ratio_max"] == 1.0  # exactly: logp_old IS logp
    assert abs(m_r["loss/ratio_max"] - 1.0) < 1e-5  # the recorded path: 1 up to the forwards' rounding
    assert m_a["loss/total"] == pytest.approx(m_r["loss/total"], abs=1e-6)
    assert any(g.abs().sum() > 0 for g in g_a)  # a real gradient, not an empty comparison
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(g_a, g_r))


def test_vlm_one_step_takes_logp_old_from_the_update_and_trains_the_same(tmp_path):
    auto = vlm_trainer(tmp_path, "auto")
    recorded = vlm_trainer(tmp_path, "recorded", "trainer.logp_old=rollout")
    a = one_step(auto, auto.policy.model)  # VLMScorer.forward: teacher forcing (decoding runs inside run=)
    r = one_step(recorded, recorded.policy.model)
    assert a[0].logp_old_from_update and not r[0].logp_old_from_update
    assert a[3] == 0 and r[3] == 2  # the recorded path scores each prompt's rows once after sampling
    assert not a[0].logp_old.any() and r[0].logp_old.masked_select(r[0].train_mask).lt(0).all()
    assert not auto.policy.logp_old_from_update  # only while the trainer samples
    assert_same_update(a, r)


def test_several_optimizer_steps_record_logp_old_and_a_deferred_rollout_cannot_feed_them(tmp_path):
    two = vlm_trainer(tmp_path, "two", "trainer.minibatches=2")
    rollout = two.sample(two.prompts_for(0, 0), 0)
    assert not rollout.logp_old_from_update  # the second minibatch runs at moved parameters
    auto = vlm_trainer(tmp_path, "auto")
    deferred = auto.sample(auto.prompts_for(0, 0), 0)
    assert deferred.logp_old_from_update
    with pytest.raises(ValueError, match="only the first runs at the sampling parameters"):
        two.update(deferred, torch.zeros(6), torch.ones(6), 0)
    # the flag follows the rows
    assert select_groups(deferred, [1]).logp_old_from_update
    assert concat_rollouts([deferred, select_groups(deferred, [0])]).logp_old_from_update
    with pytest.raises(ValueError, match="left it to the update"):
        concat_rollouts([deferred, rollout])


def test_flow_matching_one_step_skips_the_behaviour_forward_and_trains_the_same(tmp_path):
    auto = sd3_trainer(tmp_path, "auto")
    recorded = sd3_trainer(tmp_path, "recorded", "trainer.logp_old=rollout")
    a = one_step(auto, auto.policy.adapter.denoiser)
    r = one_step(recorded, recorded.policy.adapter.denoiser)
    assert a[0].logp_old_from_update and not r[0].logp_old_from_update
    # 3 sampling steps, + the forwards of every (row, draw) for logp_old, each at most the sampler's N samples
    n, K = r[0].logp_old.shape
    per = max(1, n // K)
    assert r[3] == a[3] + math.ceil(n / per) and K > 1 and per * K <= max(n, K)
    assert_same_update(a, r)


def test_nft_keeps_its_rollout_forward_it_stores_the_sampling_velocity():
    opts = DiffusionPolicyOptions(num_steps=2, sde={"noise_level": 0.0}, objective={"name": "nft", "timesteps": 2})
    policy = DiffusionPolicy(tiny_sd3_adapter(), opts)
    policy.logp_old_from_update = True  # as the trainer sets it around a one-step rollout
    r = policy.rollout(PromptBatch(prompts=["a red circle"], seeds=[3]), group_size=2)
    assert not r.logp_old_from_update and "fm_v_old" in r.extras and (r.logp_old != 0).all()
