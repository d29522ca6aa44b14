"""SRPO: routing, the hinted prompt, entropy weights, the distillation term and the EMA self-teacher by hand; a 2-step
VLM smoke where the self-teacher is the policy shown a correct sibling, and a run that resumes exactly."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.extra import ExtraModel, TermInputs
from mmgrpo.core.types import LogProbs
from mmgrpo.methods.srpo import (
    SelfTeacher,
    SRPOOptions,
    SRPOTerm,
    check_srpo,
    demonstration,
    entropy_weights,
    route,
    with_hint,
)
from mmgrpo.rewards.registry import register
from mmgrpo.testing.checks import cut_and_resume, logged_metrics
from mmgrpo.testing.tiny_vlm import save_tiny, tiny_qwen2_vl
from mmgrpo.train.config import load_config, read_yaml
from mmgrpo.train.trainer import Trainer, prepare_run_dir

REPO = Path(__file__).resolve().parents[2]


def test_failed_rows_route_to_a_correct_sibling_else_the_ground_truth():
    correct = torch.tensor([[True, False, False], [False, False, False], [False, False, False]])
    distil, hints = route(correct, torch.tensor([False, True, False]))
    assert distil.tolist() == [[False, True, True], [True, True, True], [False, False, False]]
    assert hints[:6] == [None, ("sibling", 0), ("sibling", 0), ("gt", 1), ("gt", 1), ("gt", 1)]
    assert hints[6:] == [None, None, None]  # no sibling, no ground truth: these rows stay with GRPO
    distil, hints = route(correct, torch.tensor([True, True, True]), use_siblings=False)
    assert hints[1] == ("gt", 0) and distil[0].tolist() == [False, True, True]


def test_the_self_teacher_reads_the_question_with_its_context():
    t = "\nSolution: {hint}"
    assert with_hint("2+2?", "4", t) == "2+2?\nSolution: 4"
    # the context follows the options: the question keeps its options next to it
    assert with_hint({"question": "How many?", "options": ["1", "2"]}, "B", t) == {
        "question": "How many? A) 1 B) 2\nSolution: B", "options": None}  # fmt: skip
    with pytest.raises(UserError, match="'question' or 'text'"):
        with_hint(["a"], "b", t)


def test_a_sibling_demonstrates_its_answer_without_its_reasoning():
    done = "<think>I see two\nred circles.</think><answer>B</answer>"
    assert demonstration(done) == "<answer>B</answer>"
    assert demonstration(done, strip_thinking=False) == done
    assert demonstration("<think>a</think> x <think>b</think>y") == "x y"


def test_the_ema_self_teacher_by_hand_and_after_a_resume():
    model = torch.nn.Linear(1, 1)
    model.bias.requires_grad_(False)  # frozen: not averaged, never swapped
    policy = SimpleNamespace(model=model)
    extra = ExtraModel("srpo_self_teacher", torch.nn.Identity(), frozen=False)
    teacher = SelfTeacher("ema", 0.25, extra)
    with torch.no_grad():
        model.weight.fill_(4.0)
    teacher.advance(policy)  # first rollout: the teacher is the policy
    with teacher.scoring():
        assert model.weight.item() == 4.0
    with torch.no_grad():
        model.weight.fill_(8.0)
    teacher.advance(policy)  # 0.75 * 4 + 0.25 * 8
    saved = teacher.state_dict()
    with teacher.scoring():
        assert model.weight.item() == 5.0
    assert model.weight.item() == 8.0  # the policy's weights are back exactly
    assert extra.mib() == pytest.approx(4 / 2**20)  # one fp32 shadow of the one trainable scalar
    teacher.advance(policy)  # 0.75 * 5 + 0.25 * 8
    resumed = SelfTeacher("ema", 0.25, ExtraModel("t", torch.nn.Identity(), frozen=False))
    resumed.load_state_dict(saved)
    resumed.advance(policy)
    for t in (teacher, resumed):
        with t.scoring():
            assert model.weight.item() == 5.75
    current = SelfTeacher("current", 0.25, extra)
    current.advance(policy)
    with current.scoring():
        assert model.weight.item() == 8.0 and current.state_dict() == {}


def test_the_ema_self_teacher_refuses_sharded_parameters():
    model = torch.nn.Linear(1, 1)
    model.weight.ds_id = 0  # what DeepSpeed ZeRO sets on the parameters it partitions
    teacher = SelfTeacher("ema", 0.05, ExtraModel("t", torch.nn.Identity(), frozen=False))
    with pytest.raises(UserError, match="teacher: current"):
        teacher.advance(SimpleNamespace(model=model))


@pytest.mark.parametrize(
    "change, match",
    [({"teacher": "frozen"}, "use ema"), ({"teacher_update_rate": 0.0}, r"in \(0, 1\)"),
     ({"teacher_update_rate": 1.5}, r"in \(0, 1\)")],
)  # fmt: skip
def test_bad_teacher_options_are_refused(change, match):
    cfg = SimpleNamespace(rewards=[SimpleNamespace(name="accuracy")])
    with pytest.raises(UserError, match=match):
        check_srpo(SRPOOptions(**change), cfg, "methods.srpo")


def test_entropy_weights_by_hand():
    h = torch.tensor([0.0, 0.5 * math.log(16.0), math.log(16.0), 3.0 * math.log(16.0)])
    assert entropy_weights(h, 16).tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_the_distillation_term_by_hand():
    ex = {
        "srpo_teacher_logp": torch.tensor([[-1.0, -2.0], [-1.0, -1.0]]),  # [N, K]
        "srpo_weight": torch.tensor([[1.0, 0.5], [0.0, 0.0]]),  # row 1 is not distilled
    }
    rollout = SimpleNamespace(extras=ex)
    logp = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    x = TermInputs(LogProbs(logp), logp.detach(), rollout, torch.tensor([0, 1]), torch.tensor([0, 1]),
                   torch.zeros(2), torch.ones(2, 2, dtype=torch.bool))  # fmt: skip
    per, _ = SRPOTerm(coef=2.0, estimator="k2")(x)
    # row 0: d = [1, 2] -> k2 = [0.5, 2]; x w [1, 0.5] x coef 2 = [1, 2]; row 1: weight 0
    assert per.tolist() == [[1.0, 2.0], [0.0, 0.0]]
    per.sum().backward()
    assert logp.grad.tolist() == [[2.0, 2.0], [0.0, 0.0]]  # coef * w * d


@register("test_srpo_even_length")
def _even_length():
    """Test verifier: a completion is "correct" when its length is even (a random tiny model fails real ones)."""
    return lambda samples, prompts, meta, ctx: [float(len(s) % 2 == 0) for s in samples]


def srpo_data(tmp_path, model_dir, **srpo) -> dict:
    data = read_yaml(REPO / "configs" / "vlm_srpo.yaml")
    data["run"].update(name="srpo_vlm", output_dir=str(tmp_path))
    data["policy"]["options"].update(path=str(model_dir), max_new_tokens=8, lora_rank=4)
    data["data"]["options"].update(num_examples=12, eval_examples=2)
    data["rewards"].append({"name": "test_srpo_even_length", "weight": 0.1})
    data["methods"]["srpo"]["reward"] = "test_srpo_even_length"
    data["methods"]["srpo"].update(srpo)
    data["trainer"].update(max_steps=2, prompts_per_step=2, group_size=4, micro_batch_size=8, lr=0.05,
                           eval_every=0, checkpoint_every=0, progress=False)  # fmt: skip
    return data


def test_two_srpo_steps_on_the_vlm(tmp_path):
    model_dir = save_tiny(*tiny_qwen2_vl(0), tmp_path / "m")
    cfg = load_config(None, base=srpo_data(tmp_path, model_dir, measure_context=True))
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    model = trainer.acc.unwrap_model(trainer.policy.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    # every failed row has a context (a correct sibling, else the ground truth): distilled = the failed fraction
    for m in lines:
        failed = 1.0 - m["reward/test_srpo_even_length"]
        assert m["srpo/distilled_frac"] == pytest.approx(failed)
        assert 0.0 < m["srpo/teacher_entropy"] < math.log(len(trainer.policy.tokenizer))
        assert m["extra/srpo_self_teacher/mib"] > 0 and m["extra/srpo_self_teacher/time_s"] > 0  # the EMA shadows
    assert any(m["loss/srpo"] > 0 for m in lines)
    gains = [m["srpo/context_gain"] for m in lines if "srpo/context_gain" in m]
    assert gains and all(math.isfinite(g) and g != 0.0 for g in gains)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)


def test_the_self_teacher_scores_through_the_wrapped_forward(tmp_path):
    """The self-teacher's log-probs and entropy run as the (wrapped) policy's forward, whose hooks a wrapper uses
    (FSDP2 gathers the root shard unit's parameters, the embeddings and the head, in its pre-forward hook; a call
    past it met sharded weights): one forward per call, and the same numbers as the scorer called directly."""
    model_dir = save_tiny(*tiny_qwen2_vl(0), tmp_path / "m")
    cfg = load_config(None, base=srpo_data(tmp_path, model_dir))
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    policy = trainer.policy
    rollout = policy.rollout(trainer.prompts_for(0, 0), cfg.trainer.group_size)
    rows = torch.arange(3)
    calls = []
    hook = policy.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        lp, ent = policy.frozen_log_prob(ExtraModel("t", policy.model, policy.model), rollout, rows, with_entropy=True)
    finally:
        hook.remove()
    assert len(calls) == 1
    comp = rollout.extras["completion_ids"][rows]
    prompts = [rollout.extras["prompt"][int(i)] for i in rows]
    want, want_ent = trainer.acc.unwrap_model(policy.model).rows_logprobs_entropy(prompts, comp)
    assert torch.equal(lp, want.cpu()) and torch.equal(ent, want_ent.cpu())


def test_methods_with_local_forwards_are_refused_where_every_forward_is_a_collective(tmp_path):
    """SRPO's self-teacher and AMPO's teachers run forwards only for this process's failed rows (ACRE's reward re-asks
    the policy only for its multiple-choice rows): under FSDP or ZeRO-3
    on several processes (every forward a collective) the processes would wait on each other forever, so the trainer
    refuses them there with the reason and the ways out; elsewhere (DDP, one process) they train."""
    from mmgrpo.methods.registry import METHODS

    METHODS.load()
    assert {n for n, m in METHODS.registered().items() if m.local_forwards} == {"srpo", "ampo", "acre"}
    model_dir = save_tiny(*tiny_qwen2_vl(0), tmp_path / "m")
    cfg = load_config(None, base=srpo_data(tmp_path, model_dir))
    trainer = Trainer(cfg, prepare_run_dir(cfg))
    trainer.check_local_forwards(False)
    with pytest.raises(UserError) as e:
        trainer.check_local_forwards(True)
    msg = str(e.value)
    assert msg.startswith("methods.srpo cannot train sharded") and "scores only the rows this process distils" in msg
    assert "DDP" in msg and "ZeRO-2" in msg and "\n" not in msg


def test_an_srpo_run_resumes_exactly(tmp_path):
    """The EMA teacher's shadows are in the checkpoint: 2 steps + resume + 2 steps = 4 steps."""
    model_dir = save_tiny(*tiny_qwen2_vl(0), tmp_path / "m")

    def config(out):
        data = srpo_data(out, model_dir)
        data["trainer"].update(max_steps=4, checkpoint_every=2)
        return load_config(None, base=data)

    full, resumed = cut_and_resume(config, tmp_path)
    a, b = logged_metrics(full), logged_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4] and a == b
    sa, sb = full.comp.method_state["srpo"].ema.shadow, resumed.comp.method_state["srpo"].ema.shadow
    assert all(torch.equal(x, y) for x, y in zip(sa, sb, strict=True))
