"""2-step GRPO smoke of every VLM method on both tiny families (Qwen2-VL, Qwen2.5-VL), from the method configs:
only the LoRA adapters change. And a VLM run with the MedLoc-R1 curriculum resumes exactly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmgrpo.policies.vlm import VLMPolicyOptions, load_vlm
from mmgrpo.rewards.registry import register
from mmgrpo.testing.checks import cut_and_resume, logged_metrics
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_5_vl, tiny_qwen2_vl
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import Trainer, prepare_run_dir

REPO = Path(__file__).resolve().parents[2]
FAMILIES = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}
METHODS = ["pearl", "listener", "acre", "mmupt", "tempsamp", "curriculum", "scaf_grpo", "hill", "cog_drift"]
SMALL = {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "micro_batch_size": 2, "lr": 0.05}


@register("test_vlm_methods_length")
def _length_reward():
    """Test reward: completion length / 10. A random tiny model fails every verifiable reward, so every group
    would have zero advantage and nothing would train; this dense term guarantees a gradient in the smoke."""
    return lambda samples, prompts, meta, ctx: [len(s) / 10.0 for s in samples]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {family: save_tiny(*build(), root / family) for family, build in FAMILIES.items()}


def box_jsonl(directory: Path) -> Path:
    """A tiny grounding set: one red square per 64x64 image, its box [x1, y1, x2, y2] in original pixels."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(6):
        x, y = 8 + 6 * i, 30 - 4 * i
        img = np.full((64, 64, 3), 255, np.uint8)
        img[y : y + 16, x : x + 16] = (220, 30, 30)
        Image.fromarray(img).save(directory / f"box{i}.png")
        box = [x, y, x + 16, y + 16]
        question = "Where is the red square? Answer with its box [x1, y1, x2, y2]."
        rows.append({"question": question, "answer": str(box), "box": box, "image": f"box{i}.png"})
    path = directory / "boxes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def method_config(tmp_path: Path, method: str, family: str, model_dir: Path, **trainer):
    """configs/vlm_<method>.yaml (the curriculum: vlm_reasoning_tiny on a box set) at smoke size."""
    name = "vlm_reasoning_tiny" if method == "curriculum" else f"vlm_{method}"
    data = read_yaml(REPO / "configs" / f"{name}.yaml")
    data["run"].update(name=f"{method}_{family}", output_dir=str(tmp_path))
    data["policy"]["options"].update(path=str(model_dir), max_new_tokens=8, lora_rank=4)
    data["data"]["options"].update(num_examples=12, eval_examples=2)
    data["trainer"].update({**SMALL, "eval_every": 0, "checkpoint_every": 0, "progress": False, **trainer})
    if method == "listener":
        data["rewards"][0]["options"]["model"] = str(model_dir)  # the frozen listener: the same tiny family
    if method == "hill":
        data["methods"]["hill"]["hinter"] = str(model_dir)  # a frozen hinter VLM: the same tiny family
    if method == "mmupt":
        data["trainer"]["group_size"] = 3  # a vote needs a crowd
    if method == "curriculum":
        data["data"]["options"]["path"] = str(box_jsonl(tmp_path))
        curriculum = {"family": family, "window": 30, "tau0": 0.3}
        data["rewards"] = [{"name": "format", "weight": 0.5}, {"name": "iou_curriculum", "options": curriculum}]
    data["rewards"].append({"name": "test_vlm_methods_length", "weight": 0.1})
    return load_config(None, base=data)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_two_grpo_steps_change_only_the_lora_adapters(tmp_path, model_dirs, method, family):
    cfg = method_config(tmp_path, method, family, model_dirs[family])
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    model = trainer.acc.unwrap_model(trainer.policy.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert changed and changed <= trainable, sorted(changed - trainable)[:3]
    lines = [
        json.loads(x) for x in (Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in lines] == [1, 2] and all(np.isfinite(m["loss/policy"]) for m in lines)
    expected = {
        "pearl": "pearl/gate_mean",
        "listener": "reward/vlm_listener",
        "acre": "acre/consistent",
        "mmupt": "reward/majority_vote",
        "tempsamp": "tempsamp/anchor_adv",
        "curriculum": "curriculum/tau",
        "scaf_grpo": "rewrite/groups",
        "hill": "rewrite/groups",
        "cog_drift": "rewrite/groups",
    }[method]
    assert all(expected in m for m in lines)
    if method in ("scaf_grpo", "hill", "cog_drift"):  # a random model fails almost everything: groups trigger
        assert all(0 <= m["rewrite/rescued"] <= m["rewrite/groups"] <= 2 for m in lines)
        assert sum(m["rewrite/groups"] for m in lines) >= 2
    if method == "hill":  # the frozen hinter is a separate model, untouched
        hinter = trainer.comp.rewrite.rewriter.frozen.model
        fresh, _ = load_vlm(str(model_dirs[family]), VLMPolicyOptions())
        assert all(torch.equal(p, fresh.state_dict()[n]) for n, p in hinter.hf.state_dict().items())
    if method == "listener":  # the frozen listener is a separate model, untouched
        listener = next(fn for name, _, fn in trainer.rewards if name == "vlm_listener").scorer.scorer.model
        fresh, _ = load_vlm(str(model_dirs[family]), VLMPolicyOptions())
        assert all(torch.equal(p, fresh.state_dict()[n]) for n, p in listener.state_dict().items())


def test_a_vlm_run_with_the_iou_curriculum_resumes_exactly(tmp_path, model_dirs):
    steps = {"max_steps": 4, "checkpoint_every": 0}
    full, resumed = cut_and_resume(
        lambda out: method_config(out, "curriculum", "qwen2_5_vl", model_dirs["qwen2_5_vl"], **steps), tmp_path
    )
    assert resumed.step == 4
    a, b = logged_metrics(full), logged_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4] and a == b
    # the window holds one entry per group (B = 2 per step): 2, 4, 6, 8 -- step 3 continues from the checkpoint
    assert [m["curriculum/window"] for m in b] == [2.0, 4.0, 6.0, 8.0] and all(m["curriculum/tau"] == 0.3 for m in b)
    state = next(fn for name, _, fn in resumed.rewards if name == "iou_curriculum").state_dict()
    assert len(state["ious"]) == 8
