"""Token-level NFT: the loss and its gradient by hand (GRPO's gradient on-policy with omega = sqrt((1-r_q)/r_q)),
the prompt weights, a bandit run through the trainer and a 2-step VLM smoke."""

import json
import math
from pathlib import Path

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.losses import grpo_loss
from mmgrpo.methods.nft import nft_per_token, nft_row_stats, prompt_weights
from mmgrpo.rewards.registry import register
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import Trainer, prepare_run_dir

REPO = Path(__file__).resolve().parents[2]


def test_the_nft_loss_by_hand():
    log2 = math.log(2.0)
    logp = torch.tensor([[log2], [log2], [log2], [0.0]])  # R = 2 on the first three rows, 1 on the last
    old = torch.zeros(4, 1)
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rq = torch.tensor([0.25, 0.25, 0.75, 0.5])
    out = nft_per_token(logp, old, r, rq, eps=0.05)[:, 0]
    # positive: -log 2; negative r_q = 1/4: -log((1 - 0.5) / 0.75) = -log(2/3) = 0.405465;
    # r_q = 3/4: (1 - 1.5) / 0.25 = -2 < eps -> -log 0.05 = 2.995732; R = 1: -log 1 = 0
    assert out.tolist() == pytest.approx([-log2, -math.log(2 / 3), -math.log(0.05), 0.0], abs=1e-6)


def test_on_policy_nft_with_grpo_weights_has_grpos_gradient():
    # one group of 4, one correct: r_q = 1/4, population std sqrt(3/16); GRPO advantages (r - r_q) / std
    correct = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    r, rq, w = nft_row_stats(correct, "grpo", skip_solved=False)
    assert w[0, 0].item() == pytest.approx(math.sqrt(3.0))  # sqrt((1 - 1/4) / (1/4))
    logp = torch.tensor([[-1.0], [-2.0], [-0.5], [-3.0]], requires_grad=True)
    (nft_per_token(logp, logp.detach(), r[0], rq[0]) * w[0][:, None]).sum().backward()
    g_nft = logp.grad.clone()
    logp.grad = None
    adv = (r[0] - 0.25) / math.sqrt(3 / 16)  # [1.732, -0.577, -0.577, -0.577]
    loss, _ = grpo_loss(logp, logp.detach(), adv, torch.ones(4, 1, dtype=torch.bool))
    loss.sum().backward()
    assert torch.allclose(g_nft, logp.grad, atol=1e-6)
    assert g_nft[:, 0].tolist() == pytest.approx([-math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)])


def test_prompt_weights_and_skip_solved():
    rq = torch.tensor([0.0, 0.25, 1.0])
    assert prompt_weights(rq, "one").tolist() == [1.0, 1.0, 1.0]
    assert prompt_weights(rq, "one_minus_acc").tolist() == [1.0, 0.75, 0.0]
    assert prompt_weights(rq, "grpo").tolist() == pytest.approx([0.0, math.sqrt(3), 0.0])
    _, rq2, w = nft_row_stats(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), "one", skip_solved=True)
    assert rq2.tolist() == [[1.0, 1.0], [0.5, 0.5]] and w.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    with pytest.raises(UserError, match="prompt_weight"):
        prompt_weights(rq, "two")


BANDIT = {
    "pipeline": "bandit",
    "run": {"name": "nft", "seed": 0},
    "data": {"options": {"num_prompts": 4, "num_arms": 4}},
    "rewards": [{"name": "bandit_arm_value"}],
    "methods": {"nft": {"reward": "bandit_arm_value", "correct_at": 1.0, "prompt_weight": "one_minus_acc"}},
    "trainer": {"max_steps": 40, "prompts_per_step": 4, "group_size": 8, "lr": 0.1, "progress": False},
}


def test_nft_learns_the_bandits_best_arm_through_the_trainer(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}"], base=BANDIT)
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    trainer.train()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss/policy"] == 0.0 for m in lines)  # the NFT term is the whole objective
    # one optimizer step per rollout at the sampling parameters: R = 1, so the loss value is 0 (the gradient is not)
    assert all(abs(m["loss/nft"]) < 1e-6 and m["loss/total"] == pytest.approx(m["loss/nft"]) for m in lines)
    first = sum(m["nft/pos_frac"] for m in lines[:5]) / 5
    last = sum(m["nft/pos_frac"] for m in lines[-5:]) / 5
    assert last > first + 0.2, (first, last)  # the best arm (reward 1 = positive) is drawn more and more


def test_nft_refuses_an_unknown_reward_and_a_bad_floor(tmp_path):
    for opts, match in (
        ({"reward": "accuracy"}, "not listed"),
        ({"reward": "bandit_arm_value", "neg_ratio_floor": 1.5}, "neg_ratio_floor"),
    ):
        with pytest.raises(UserError, match=match):
            load_config(None, [f"run.output_dir={tmp_path}"], base={**BANDIT, "methods": {"nft": opts}})


@register("test_nft_even_length")
def _even_length():
    """Test verifier: a completion is "correct" when its length is even. A random tiny model fails every real
    verifier, and NFT learns nothing from all-negative groups (r_q = 0); this one splits the groups."""
    return lambda samples, prompts, meta, ctx: [float(len(s) % 2 == 0) for s in samples]


def test_two_nft_steps_on_the_vlm(tmp_path):
    model_dir = save_tiny(*tiny_qwen2_vl(0), tmp_path / "m")
    data = read_yaml(REPO / "configs" / "vlm_nft.yaml")
    data["run"].update(name="nft_vlm", output_dir=str(tmp_path))
    data["policy"]["options"].update(path=str(model_dir), max_new_tokens=8, lora_rank=4)
    data["data"]["options"].update(num_examples=12, eval_examples=2)
    data["rewards"].append({"name": "test_nft_even_length", "weight": 0.0})
    data["methods"]["nft"]["reward"] = "test_nft_even_length"
    data["trainer"].update(max_steps=2, prompts_per_step=2, group_size=4, micro_batch_size=4, lr=0.05,
                           eval_every=0, checkpoint_every=0, progress=False, epochs=2)  # fmt: skip
    cfg = load_config(None, base=data)
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    model = trainer.acc.unwrap_model(trainer.policy.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(math.isfinite(m["loss/nft"]) for m in lines)
    assert all(m["loss/policy"] == 0.0 and "nft/rq_mean" in m for m in lines)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    # epoch 2 runs at moved parameters: R != 1 and the loss is no longer 0 (epoch 1's is: R = 1 exactly)
    assert any(abs(m["loss/nft"]) > 0 for m in lines)


def test_two_nft_steps_on_the_diffusion_policy(tmp_path):
    """Token-level NFT on the SDE objective of the shapes text-to-image model: a "token" is a denoising step, its
    ratio the per-step Gaussian one; the binary verifier is shapes_strict (every atom of the prompt in the pixels)."""
    data = read_yaml(REPO / "configs" / "shapes_t2i_grpo.yaml")
    data["run"].update(name="nft_t2i", output_dir=str(tmp_path))
    popts = data["policy"]["options"]
    popts.update(path=str(REPO / "assets" / "shapes_t2i"), num_steps=4, objective={"name": "sde"},
                 sde={"kind": "flow_grpo", "noise_level": 0.7})  # fmt: skip
    data["data"]["options"].update(heldout_prompts="")
    data["rewards"] = [{"name": "shapes"}, {"name": "shapes_strict", "weight": 0.0}]
    data["methods"] = {"nft": {"reward": "shapes", "correct_at": 0.5, "prompt_weight": "one"}}
    data["loss"] = {"name": "grpo"}
    data["trainer"].update(max_steps=2, prompts_per_step=2, group_size=4, micro_batch_size=0, eval_every=0,
                           checkpoint_every=0, progress=False, time_budget_s=None, epochs=2)  # fmt: skip
    cfg = load_config(None, base=data)
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    trainer.train()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["loss/policy"] == 0.0 and math.isfinite(m["loss/nft"]) and "nft/pos_frac" in m for m in lines)


def test_token_level_nft_on_a_diffusion_nft_objective_or_with_srpo_is_refused_at_load(tmp_path):
    """The method walkthrough of 2026-12-07: methods.nft on the DiffusionNFT demo trained (its 'logp' there is a
    flow-matching error, and the method's term replaced DiffusionNFT's loss); with SRPO it replaced the surrogate SRPO
    routes its correct rows to (loss/policy 0); Scaf-GRPO with TempSamp never fired (the ground-truth row)."""
    data = read_yaml(REPO / "configs" / "shapes_t2i_grpo.yaml")
    data["run"].update(output_dir=str(tmp_path))
    data["methods"] = {"nft": {"reward": "shapes"}}
    with pytest.raises(UserError, match=r"methods.nft .*token-level NFT reads the policy's log-probabilities, but "
                                        r"policy.options.objective=nft scores samples by a flow"):  # fmt: skip
        load_config(None, base=data)
    vlm = read_yaml(REPO / "configs" / "vlm_nft.yaml")  # DiffusionNFT's loss named on a VLM with the method
    vlm["run"].update(output_dir=str(tmp_path))
    vlm["loss"] = {"name": "nft", "adv_clip": 2.0}
    with pytest.raises(UserError, match=r"loss.name=nft is DiffusionNFT's loss, which methods.nft replaces"):
        load_config(None, base=vlm)
    for config, other in [("vlm_nft.yaml", "methods.srpo.reward=accuracy"),
                          ("vlm_tempsamp.yaml", "methods.scaf_grpo.exemption_fraction=0")]:  # fmt: skip
        with pytest.raises(UserError, match="cannot be combined yet"):
            load_config(REPO / "configs" / config, [f"run.output_dir={tmp_path}", other])
