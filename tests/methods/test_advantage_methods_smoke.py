"""2-step smokes of issue 17's advantage-side papers on the VLM policy (tiny Qwen2-VL, shapes QA) and on the diffusion
policy (the shapes SD3): Posterior-GRPO, E-GRPO (VLM only: it reads reasoning text), MAPO, PACS, strata (Stratified
GRPO / Dr. MAS), dynamic reward weighting. Only the LoRA adapters (VLM) / the trained weights change, metrics are
finite, each method's metric is logged."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgrpo.rewards.registry import register
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import Trainer, prepare_run_dir, train

REPO = Path(__file__).resolve().parents[2]
SMALL = {"max_steps": 2, "prompts_per_step": 2, "group_size": 3, "micro_batch_size": 3, "lr": 0.05,
         "eval_every": 0, "checkpoint_every": 0, "progress": False}  # fmt: skip


@register("test_h17_length")
def _length_reward():
    """Completion length / 100 (<= 0.08 at 8 tokens): a dense term so that a random tiny model's groups differ."""
    return lambda samples, prompts, meta, ctx: [len(s) / 100.0 for s in samples]


VLM = {
    "posterior": (["advantage.combine=posterior", "rewards.0.kind=process"], []),
    "egrpo": (["methods.egrpo={}"], [{"name": "entity_credit", "options": {"alpha": 0.3}}]),
    "mapo": (["advantage.estimator=mapo"], []),
    "pacs": (
        [
            "advantage.estimator=pacs",
            "loss.name=pacs",
            "loss.options={}",
            "loss.aggregation={name: constant, options: {constant: 1}}",
            "rewards.0.weight=0.4",
            "rewards.1.weight=0.5",
        ],
        [],
    ),  # fmt: skip
    "strata": (
        [
            "advantage.estimator=stratified",
            "advantage.options={alpha: 0.5}",
            "methods.strata={meta_key: kind}",
            "data.options.source=shapes_qa",
        ],
        [],
    ),  # fmt: skip
    "dynamic_weights": (["methods.dynamic_weights={lr: 1.0}"], []),
    "microcoder": (["methods.microcoder={temperatures: [0.7, 1.0]}"], []),
    "dagrpo": (["methods.dagrpo={min_distinct: 0.05}"], []),
}


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A random tiny Qwen2-VL: its samples differ within a group (the shipped warm-started one is near greedy)."""
    return save_tiny(*tiny_qwen2_vl(), tmp_path_factory.mktemp("tiny_vlm") / "qwen2_vl")


def vlm_config(tmp_path: Path, case: str, model_dir: Path):
    overrides, extra_rewards = VLM[case]
    data = read_yaml(REPO / "configs" / "vlm_reasoning_tiny.yaml")
    data["run"].update(name=f"vlm_{case}", output_dir=str(tmp_path))
    data["policy"]["options"].update(path=str(model_dir), max_new_tokens=8, lora_rank=4)
    data["data"]["options"].update(num_examples=12, eval_examples=2)
    data["trainer"].update(SMALL)
    if extra_rewards:  # E-GRPO's reward takes accuracy's place
        data["rewards"] = [data["rewards"][0], *extra_rewards]
    data["rewards"].append({"name": "test_h17_length", "weight": 0.1})
    return load_config(None, overrides, base=data)


def run_two_steps(cfg):
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    model = trainer.acc.unwrap_model(trainer.policy.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert changed and changed <= trainable, sorted(changed - trainable)[:3]
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(np.isfinite(m["loss/policy"]) for m in lines)
    return trainer, lines


@pytest.mark.parametrize("case", list(VLM))
def test_two_vlm_steps(tmp_path, vlm_dir, case):
    trainer, lines = run_two_steps(vlm_config(tmp_path, case, vlm_dir))
    assert all("lora_" in n for n, p in trainer.acc.unwrap_model(trainer.policy.model).named_parameters()
               if p.requires_grad)  # fmt: skip
    if case == "egrpo":
        assert all("egrpo/match_rate" in m and "reward/entity_credit" in m for m in lines)
    if case == "dynamic_weights":
        assert all("dynw/w0" in m for m in lines)
    if case == "dagrpo":  # a random model never matches the ground truth: every group is hard, its anchor used
        assert all("dagrpo/masked_pairs" in m and m["dagrpo/anchored_groups"] == 2.0 for m in lines)
    if case == "microcoder":
        assert all("microcoder/temperature" in m and "microcoder/masked_truncated" in m for m in lines)


DIFFUSION = {
    "posterior": [
        "advantage.combine=posterior",
        "rewards=[{name: shapes}, {name: jpeg_compressibility, kind: process}]",
    ],
    "mapo": ["advantage.estimator=mapo", "advantage.options={success: 0.5}"],
    "pacs": [
        "advantage.estimator=pacs",
        "loss.name=pacs",
        "loss.adv_clip=null",
        "loss.aggregation={name: constant, options: {constant: 1}}",
    ],  # fmt: skip
    "strata": ["advantage.estimator=stratified", "methods.strata={meta_key: task}"],
    "dynamic_weights": ["methods.dynamic_weights={}", "rewards=[{name: shapes}, {name: jpeg_compressibility}]"],
    "dagrpo": ["methods.dagrpo={anchors: false, min_distinct: 0.01}"],
}


def diffusion_config(tmp_path: Path, case: str):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "a red circle", "task": "single"},
        {"prompt": "a blue square", "task": "single"},
        {"prompt": "two green triangles", "task": "count"},
        {"prompt": "a yellow circle", "task": "single"},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    trainer = {**SMALL, "lr": 1e-3, "micro_batch_size": 0}
    base = [
        f"run.output_dir={tmp_path}",
        f"run.name=diff_{case}",
        f"policy.options.path={REPO / 'assets/shapes_t2i'}",
        "policy.options.num_steps=3",
        "policy.options.objective={name: sde}",
        "policy.options.sde={noise_level: 0.7}",
        "loss.name=grpo",
        "loss.adv_clip=null",
        f"data.options.prompts={prompts}",
        "data.options.heldout_prompts=''",
        *[f"trainer.{k}={v}" for k, v in trainer.items()],
    ]
    return load_config(REPO / "configs" / "shapes_t2i_grpo.yaml", [*base, *DIFFUSION[case]])


@pytest.mark.parametrize("case", list(DIFFUSION))
def test_two_diffusion_steps(tmp_path, case):
    run_two_steps(diffusion_config(tmp_path, case))


def test_a_vlm_run_with_microcoder_resumes_its_temperature_exactly(tmp_path, vlm_dir):
    """The chosen temperature is training state: 4 steps in one go equal 2 steps, a resume, 2 more."""

    def cfg(where, **trainer):
        c = vlm_config(where, "microcoder", vlm_dir)
        c.trainer.max_steps, c.trainer.checkpoint_every = 4, 0
        for k, v in trainer.items():
            setattr(c.trainer, k, v)
        return c

    full = train(cfg(tmp_path / "full"))
    cut = cfg(tmp_path / "cut", stop_after_steps=2)
    assert train(cut).step == 2
    cut.resume, cut.trainer.stop_after_steps = str(Path(cut.run.output_dir) / cut.run.name), None
    resumed = train(cut)

    def metrics(trainer):
        text = (trainer.run_dir / "metrics.jsonl").read_text()
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in text.splitlines()]

    a, b = metrics(full), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4] and a == b
    assert resumed.policy.chosen == full.policy.chosen and resumed.policy.chosen[2] == 0  # chosen once, at step 0
