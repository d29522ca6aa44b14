"""AMPO: the pool, the failure test and the selection by hand; on the tiny VLM, failed groups (and only those) get
the best-understood teacher solution as their last, teacher-forced row, the other rows unchanged; a 2-step run."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.methods.ampo import failed_groups, pool_entries, select_guidance
from mmgrpo.pipelines.vlm_reasoning import shapes_question
from mmgrpo.rewards.registry import register
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_5_vl, tiny_qwen2_vl
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import Trainer, prepare_run_dir

REPO = Path(__file__).resolve().parents[2]


def test_pool_failure_and_selection_by_hand():
    assert pool_entries(["x", {"text": "y", "teacher": "big"}]) == [("x", "teacher0"), ("y", "big")]
    with pytest.raises(UserError, match="guidance entry 0"):
        pool_entries([{"txt": "x"}])
    r = torch.tensor([[0.0, float("nan")], [1.0, 0.0], [0.9, 0.5]])
    assert failed_groups(r, 1.0).tolist() == [True, False, True]  # NaN = not graded = failed
    assert select_guidance(torch.tensor([-3.0, -1.0, -2.0])) == 1  # the best-understood solution
    assert select_guidance(torch.tensor([-3.0, -1.0, -2.0]), "first") == 0


@register("test_ampo_pool")
def _pool_reward():
    """Test verifier: 1 when the completion is one of the example's pool solutions (the random tiny model never
    writes one, so every sampled group fails and the inserted row is the only success of its group)."""

    def fn(samples, prompts, meta, ctx):
        return [float(s in [g["text"] for g in m.get("guidance", [])]) for s, m in zip(samples, meta)]

    return fn


def guidance_jsonl(directory: Path, n: int = 8) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        prompt, meta = shapes_question(i, 0, size=64)
        Image.fromarray(meta["images"][0]).save(directory / f"q{i}.png")
        a = meta["answer"]
        pool = [{"text": f"<answer>{a}</answer>", "teacher": "terse"}, {"text": f"{a} {a} {a}", "teacher": "odd"}]
        rows.append({"question": prompt["question"], "options": prompt["options"], "answer": a, "image": f"q{i}.png",
                     "guidance": pool})  # fmt: skip
    path = directory / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ampo_trainer(tmp_path, teachers=(), pool=True):
    model_dir = save_tiny(*tiny_qwen2_vl(0), tmp_path / "m")
    data = read_yaml(REPO / "configs" / "vlm_ampo.yaml")
    data["run"].update(name="ampo", output_dir=str(tmp_path))
    data["policy"]["options"].update(path=str(model_dir), max_new_tokens=16, lora_rank=4)
    data["data"]["options"].update(path=str(guidance_jsonl(tmp_path / "data")), eval_examples=2)
    data["rewards"].append({"name": "test_ampo_pool", "weight": 1.0})
    data["methods"]["ampo"].update(reward="test_ampo_pool", teachers=list(teachers))
    if not pool:
        data["methods"]["ampo"]["guidance_key"] = "no_pool"
    data["trainer"].update(max_steps=2, prompts_per_step=2, group_size=3, micro_batch_size=6, lr=0.05,
                           eval_every=0, checkpoint_every=0, progress=False)  # fmt: skip
    cfg = load_config(None, base=data)
    return Trainer(cfg, prepare_run_dir(cfg))


def test_failed_groups_get_the_best_understood_solution_and_keep_their_samples(tmp_path):
    trainer = ampo_trainer(tmp_path)
    batch = trainer.prompts_for(0, 0)
    rollout = trainer.sample(batch, 0)
    plain = trainer.policy.inner.rollout(batch, 3, None)  # the student's own samples of the same prompts
    G = 3
    for b in range(len(batch)):
        texts = [g["text"] for g in batch.meta[b]["guidance"]]
        best = texts[int(trainer.policy.inner.mean_logprob(batch.prompts[b], batch.meta[b], texts).argmax())]
        assert rollout.samples[b * G + 2] == best  # the last row: the solution with the highest mean log-prob
        assert rollout.samples[b * G : b * G + 2] == plain.samples[b * G : b * G + 2]  # the G - 1 sampled rows
    assert rollout.extras["offpolicy_mask"].tolist() == [False, False, True] * len(batch)


def test_two_ampo_steps_on_the_vlm(tmp_path):
    trainer = ampo_trainer(tmp_path)
    model = trainer.acc.unwrap_model(trainer.policy.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:  # every sampled group fails the pool verifier: both groups are guided, one solution each
        assert m["ampo/failed_groups"] == 2.0 and m["ampo/guided_groups"] == 2.0
        assert sum(v for k, v in m.items() if k.startswith("ampo/teacher/")) == 2.0
        # reward/* are the policy's sampled rows (all fail); the inserted teacher row of each group, which succeeds,
        # is left out of them
        assert m["reward/test_ampo_pool"] == 0.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)


def test_online_teachers_answer_the_failed_questions_and_report_their_cost(tmp_path):
    teachers = [save_tiny(*tiny_qwen2_vl(1), tmp_path / "t1"), save_tiny(*tiny_qwen2_5_vl(2), tmp_path / "t2")]
    trainer = ampo_trainer(tmp_path, teachers=[str(t) for t in teachers], pool=False)
    wrapper = trainer.policy
    assert [t.name for t in trainer.comp.extra_models] == ["ampo_teacher0", "ampo_teacher1"]

    def verifier(samples, prompts, meta, ctx):  # the student's rows (groups of 3) fail; every teacher answer passes
        return [0.0 if ctx.group_size > 1 else 1.0 for _ in samples]

    wrapper.verifier = verifier
    batch = trainer.prompts_for(0, 0)
    rollout = trainer.sample(batch, 0)
    answers = [t.handle.generate(batch, greedy=True) for t in wrapper.teachers]  # [teacher][prompt]
    for b in range(len(batch)):
        texts = [a[b] for a in answers if wrapper.inner.fits_completion(a[b])]
        best = texts[int(wrapper.inner.mean_logprob(batch.prompts[b], batch.meta[b], texts).argmax())]
        assert rollout.samples[b * 3 + 2] == best
    metrics = {k: v for t in trainer.comp.extra_models for k, v in t.metrics().items()}
    assert metrics["extra/ampo_teacher0/time_s"] > 0 and metrics["extra/ampo_teacher1/mib"] > 0
    assert all(not p.requires_grad for t in wrapper.teachers for p in t.module.parameters())
