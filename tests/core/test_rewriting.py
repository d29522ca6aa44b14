"""Prompt rewriting before a re-roll (mmgrpo/core/rewriting.py, mmgrpo/train/reroll.py): triggers, modes, seeds,
metrics, resume, 2 processes = 1 process, on the bandit with a test method whose rewriter moves a failed prompt to the
next bandit state."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmgrpo.core import rewriting as rw
from mmgrpo.core.errors import UserError
from mmgrpo.core.seeding import prompt_seed
from mmgrpo.core.types import PromptBatch
from mmgrpo.methods.registry import METHODS, Method, Rewrite, register_method
from mmgrpo.rewards.registry import REWARDS, register
from mmgrpo.testing.launch import accelerate_launch
from mmgrpo.train import checkpoint as ckpt
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer, train

BASE = {
    "pipeline": "bandit",
    "run": {"name": "b", "seed": 0},
    "data": {"options": {"num_prompts": 6, "num_arms": 5}},
    "rewards": [{"name": "test_rw_best_arm"}],
    "policy": {"options": {"init_std": 3.0}},  # a peaked random policy: most groups never pick the best arm
    "trainer": {"max_steps": 2, "prompts_per_step": 4, "group_size": 4, "lr": 1e-9, "progress": False},
}
REQUESTS: list[rw.RewriteRequest] = []


if "test_rw_best_arm" not in REWARDS:

    @register("test_rw_best_arm")
    def _best_arm():
        """1 if the chosen arm is the best arm (test reward)."""
        return lambda samples, prompts, meta, ctx: [float(int(a) == m["best_arm"]) for a, m in zip(samples, meta)]


def next_state(request: rw.RewriteRequest):
    """Test rewriter: bandit state p -> (p + 1 + attempt) mod P, with that state's meta (its arm values)."""
    REQUESTS.append(request)
    values = request.source.values
    out = []
    for p in request.prompts:
        q = (p + 1 + request.attempt) % len(values)
        out.append((q, {"arm_values": values[q].tolist(), "best_arm": int(values[q].argmax()), "from": p}))
    return out


@dataclass
class RerollTestOptions(rw.RerollOptions):
    reward: str | None = "test_rw_best_arm"


if "test_reroll" not in METHODS:
    register_method(
        Method(
            name="test_reroll",
            paper="test: re-roll failed bandit groups from the next state",
            options=RerollTestOptions,
            check=rw.check_reroll,
            rewrite=lambda opts, cfg: Rewrite("test_reroll", next_state, opts),
        )
    )


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path}", *overrides], base=BASE)


def metrics(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "rewrite/"))} for m in lines]


def logits(trainer):
    return trainer.acc.unwrap_model(trainer.policy.model).logits.detach()


# ------------------------------------------------------------------------------------------ pure functions


def test_triggers_signal_and_mix_plan_by_hand():
    score = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.4, 0.2, 0.0]])
    total = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 1.0], [0.4, 0.2, 0.0]])
    # all_fail at 0.5: rows 0 and 2 have no score >= 0.5; zero_variance: only row 0's totals are all equal
    assert rw.trigger_mask(score, total, "all_fail", 0.5).tolist() == [True, False, True]
    assert rw.trigger_mask(score, total, "zero_variance", 0.5).tolist() == [True, False, False]
    assert rw.trigger_mask(torch.tensor([[float("nan"), 0.0]]), total[:1, :2], "all_fail", 0.5).tolist() == [True]
    assert rw.has_signal(total).tolist() == [False, True, True]
    # failed original rows 0..3, re-rolled successes at 1 and 3: the last failed rows are replaced first
    assert rw.mix_plan(torch.zeros(4), torch.tensor([0.0, 1.0, 0.0, 1.0]), 0.5, 2) == [(3, 1), (2, 3)]
    assert rw.mix_plan(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), 0.5, 1) == [(0, 0)]
    assert rw.mix_plan(torch.zeros(3), torch.zeros(3), 0.5, 1) == []


def test_hint_field_keeps_options_images_and_ground_truth():
    image = torch.zeros(2, 2, 3)
    prompt = {"question": "How many red circles are there?", "options": ["0", "1"]}
    meta = {"answer": "B", "images": [image], "hints": ["Count only red circles.", "There is one."]}
    hint = rw.HintField()
    request = rw.RewriteRequest([prompt, "Is it?"], [meta, {}], [[], []], torch.zeros(2, 1), 1, 0, [0, 0])
    (p, m), none = hint(request)
    assert p == {"question": "How many red circles are there?\nHint: There is one.", "options": ["0", "1"]}
    assert m["answer"] == "B" and m["images"][0] is image and m["rewrite"] == "hint 1" and none is None
    assert prompt["question"] == "How many red circles are there?"  # the original is not edited
    assert hint.one("Q?", {"hints": "just one"}, 0) == (
        "Q?\nHint: just one",
        {"hints": "just one", "rewrite": "hint 0"},
    )
    assert hint.one("Q?", {"hints": "just one"}, 1) is None
    with pytest.raises(UserError, match="chat 'messages' prompts cannot be rewritten"):
        rw.with_question({"messages": []}, "x")
    assert "hint_field" in rw.REWRITERS.names()


def test_bad_reroll_options_fail_at_load(tmp_path):
    with pytest.raises(UserError, match="trigger='never' is not one of all_fail, zero_variance"):
        cfg_for(tmp_path, "methods.test_reroll={trigger: never}")
    with pytest.raises(UserError, match="reward='accuracy' is not listed under rewards:"):
        cfg_for(tmp_path, "methods.test_reroll={reward: accuracy}")
    with pytest.raises(UserError, match="mix_rows=4 must be in 1..3"):
        cfg_for(tmp_path, "methods.test_reroll={mode: mix, mix_rows: 4}")
    with pytest.raises(UserError, match="mode=mix needs trigger=all_fail"):
        cfg_for(tmp_path, "methods.test_reroll={mode: mix, trigger: zero_variance}")
    with pytest.raises(UserError, match="max_rounds=0 must be in 1..16"):
        cfg_for(tmp_path, "methods.test_reroll={max_rounds: 0}")
    with pytest.raises(UserError, match="mode=add cannot be combined with advantage.dynamic_sampling"):
        cfg_for(tmp_path, "methods.test_reroll={mode: add}", "advantage.dynamic_sampling=true")


# ------------------------------------------------------------------------------------------ the trainer hook


def collect(tmp_path, name, *overrides, step=0):
    REQUESTS.clear()
    trainer = Trainer(cfg_for(tmp_path, f"run.name={name}", *overrides), tmp_path / name)
    rollout, cols, m = trainer.collect(step)
    return trainer, rollout, cols, m


def test_failed_groups_are_rerolled_from_the_rewritten_prompt_with_position_seeds(tmp_path):
    _, plain, plain_cols, _ = collect(tmp_path, "plain")
    G = plain.group_size
    failed = [b for b in range(plain.num_groups) if plain_cols[0, 0, b * G : (b + 1) * G].max() < 0.5]
    assert 0 < len(failed) < plain.num_groups  # the seed gives both kinds of group
    trainer, rollout, cols, m = collect(tmp_path, "rw", "methods.test_reroll={}", step=0)
    assert m["rewrite/groups"] == len(failed) == m["rewrite/rerolled"]
    (request,) = REQUESTS
    assert request.attempt == 0 and request.prompts == [plain.prompts[b * G] for b in failed]
    assert request.seeds == [prompt_seed(0, 0, b, rw.REWRITE_STREAM + 1) for b in failed]  # global positions
    assert torch.equal(request.scores, torch.zeros(len(failed), G))
    P = 6
    for b in range(plain.num_groups):
        rows = slice(b * G, (b + 1) * G)
        if b not in failed:  # untouched: the same samples and rewards as without the method
            assert rollout.samples[rows].tolist() == plain.samples[rows].tolist()
            assert torch.equal(cols[..., rows], plain_cols[..., rows])
            continue
        q = (plain.prompts[b * G] + 1) % P
        assert rollout.prompts[rows] == [q] * G and rollout.meta[b * G]["from"] == plain.prompts[b * G]
        # the re-rolled group is what the policy samples for state q with the re-roll stream's seed of position b
        seed = prompt_seed(0, 0, b, rw.REWRITE_STREAM)
        meta = rollout.meta[b * G]
        alone = trainer.sample(PromptBatch([q], [meta], [seed], 0), 0)
        assert alone.samples.tolist() == rollout.samples[rows].tolist()
    rescued = sum(bool(cols[0, 0, b * G : (b + 1) * G].std() > 0) for b in failed)
    assert m["rewrite/rescued"] == rescued


def test_a_group_whose_scored_rows_tie_triggers_zero_variance_whatever_its_unscored_rows(tmp_path):
    """zero_variance re-rolls groups whose advantages are all 0; rows the reward does not apply to (None) are left
    out of the tie test, as the estimators leave them out (counted as 0, a group whose scored rows all picked the
    best arm looked spread: [1, 0, 1, 0]). Here every group's scored rows tie (the peaked policy), so every group
    is re-rolled."""
    if "test_rw_best_arm_even_rows" not in REWARDS:

        @register("test_rw_best_arm_even_rows")
        def _even():
            return lambda samples, prompts, meta, ctx: [
                float(int(a) == m["best_arm"]) if i % 2 == 0 else None for i, (a, m) in enumerate(zip(samples, meta))
            ]

    over = ["rewards=[{name: test_rw_best_arm_even_rows}]", "policy.options.init_std=30.0", "trainer.group_size=2"]
    _, plain, plain_cols, _ = collect(tmp_path, "plain", *over)
    scored = plain_cols[0, 0, ::2]  # G 2: one scored row a group, so every group's scored rows tie
    assert not scored.isnan().any() and plain_cols[0, 0, 1::2].isnan().all()
    _, _, _, m = collect(tmp_path, "rw", *over, "methods.test_reroll={trigger: zero_variance, reward: null}")
    assert m["rewrite/groups"] == plain.num_groups


def test_under_the_posterior_combiner_a_group_of_wrong_answers_triggers_zero_variance(tmp_path):
    """Posterior-GRPO's estimator reads the gated sum: in a group whose answers are all wrong the process rewards are
    gated to 0 and the advantages are all 0, though the plain sum is spread (here by a process reward that differs
    on every row); such groups were not re-rolled."""
    if "test_rw_row_position" not in REWARDS:

        @register("test_rw_row_position")
        def _position():
            return lambda samples, prompts, meta, ctx: [float(i % ctx.group_size) for i in range(len(samples))]

    over = ["rewards=[{name: test_rw_best_arm}, {name: test_rw_row_position, weight: 0.5, kind: process}]",
            "advantage.combine=posterior"]  # fmt: skip
    _, plain, plain_cols, _ = collect(tmp_path, "plain", *over)
    G = plain.group_size
    wrong = [b for b in range(plain.num_groups) if plain_cols[0, 0, b * G : (b + 1) * G].max() < 1]
    assert 0 < len(wrong) < plain.num_groups
    _, _, _, m = collect(tmp_path, "rw", *over, "methods.test_reroll={trigger: zero_variance, reward: null}")
    assert m["rewrite/groups"] == len(wrong)


def test_keep_signal_escalation_add_and_mix(tmp_path):
    _, plain, plain_cols, _ = collect(tmp_path, "plain")
    G, B = plain.group_size, plain.num_groups
    failed = [b for b in range(B) if plain_cols[0, 0, b * G : (b + 1) * G].max() < 0.5]
    # keep: signal with 3 attempts: a group keeps its original prompt unless a re-roll has signal; the rewriter
    # sees attempts 0, 1, 2 only for groups still failing
    _, rollout, cols, m = collect(tmp_path, "keep", "methods.test_reroll={keep: signal, max_rounds: 3}")
    assert [r.attempt for r in REQUESTS] == list(range(len(REQUESTS))) and len(REQUESTS) <= 3
    for r0, r1 in zip(REQUESTS, REQUESTS[1:]):
        assert set(r1.prompts) <= set(r0.prompts)
    for b in failed:
        group = cols[0, 0, b * G : (b + 1) * G]
        kept_original = rollout.prompts[b * G] == plain.prompts[b * G]
        assert kept_original == bool(group.std() == 0)  # replaced only by a group with signal
    assert m["rewrite/rescued"] == sum(bool(cols[0, 0, b * G : (b + 1) * G].std() > 0) for b in failed)
    # add: every original group stays, the re-rolled groups come after them
    _, added, added_cols, m = collect(tmp_path, "add", "methods.test_reroll={mode: add}")
    assert added.num_groups == B + len(failed) and added.samples[: B * G].tolist() == plain.samples.tolist()
    assert added.prompts[B * G :: G] == [(plain.prompts[b * G] + 1) % 6 for b in failed]
    # mix: one successful re-rolled row replaces the last failed row; the other rows are the original ones
    _, mixed, mixed_cols, m = collect(tmp_path, "mix", "methods.test_reroll={mode: mix, mix_rows: 1}")
    for b in failed:
        rows = slice(b * G, (b + 1) * G)
        prompts = mixed.prompts[rows]
        if prompts[-1] == plain.prompts[b * G]:  # no re-rolled row succeeded: the group is unchanged
            assert torch.equal(mixed_cols[..., rows], plain_cols[..., rows])
            continue
        assert prompts[:-1] == plain.prompts[rows][:-1] and mixed_cols[0, 0, b * G + G - 1] == 1.0
        assert mixed_cols[0, 0, rows][:-1].tolist() == [0.0] * (G - 1)


def test_a_rewrite_that_never_triggers_leaves_the_run_bit_identical_and_reruns_exactly(tmp_path):
    plain = train(cfg_for(tmp_path, "run.name=plain", "trainer.lr=0.1"))
    never = train(cfg_for(tmp_path, "run.name=never", "trainer.lr=0.1", "methods.test_reroll={threshold: -1.0}"))
    assert metrics(plain.run_dir) == metrics(never.run_dir)
    assert torch.equal(logits(plain), logits(never))
    a = train(cfg_for(tmp_path, "run.name=a", "trainer.lr=0.1", "methods.test_reroll={}"))
    b = train(cfg_for(tmp_path, "run.name=b2", "trainer.lr=0.1", "methods.test_reroll={}"))
    assert metrics(a.run_dir) == metrics(b.run_dir) and torch.equal(logits(a), logits(b))
    lines = [json.loads(x) for x in (a.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["rewrite/groups"] >= m["rewrite/rescued"] for m in lines) and lines[0]["rewrite/groups"] > 0


def test_a_rewriting_run_resumes_exactly(tmp_path):
    common = ["trainer.max_steps=4", "trainer.lr=0.1", "methods.test_reroll={keep: signal, max_rounds: 2}"]
    full = train(cfg_for(tmp_path, "run.name=full", *common))
    part = train(cfg_for(tmp_path, "run.name=part", *common, "trainer.stop_after_steps=2"))
    assert part.step == 2
    resumed = train(cfg_for(tmp_path, "run.name=part", *common, f"resume={part.run_dir}"))
    assert resumed.step == 4 and torch.equal(logits(resumed), logits(full))
    lines = lambda t: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if not k.startswith("time/")}
        for x in (t.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert lines(resumed) == lines(full) and sum(m["rewrite/rerolled"] for m in lines(full)) > 0


PLUGIN = '''
from mmgrpo.core import rewriting as rw
from mmgrpo.methods.registry import METHODS, Method, Rewrite, register_method
from mmgrpo.rewards.registry import REWARDS, register

if "test_rw2_best_arm" not in REWARDS:

    @register("test_rw2_best_arm")
    def best_arm():
        """1 if the chosen arm is the best arm (test reward)."""
        return lambda samples, prompts, meta, ctx: [float(int(a) == m["best_arm"]) for a, m in zip(samples, meta)]


def next_state(request):
    values = request.source.values
    out = []
    for p in request.prompts:
        q = (p + 1 + request.attempt) % len(values)
        out.append((q, {"arm_values": values[q].tolist(), "best_arm": int(values[q].argmax())}))
    return out


if "test_reroll2" not in METHODS:
    register_method(Method(name="test_reroll2", paper="test", options=rw.RerollOptions, check=rw.check_reroll,
                           rewrite=lambda opts, cfg: Rewrite("test_reroll2", next_state, opts)))
'''
CLI = """
import sys
import rw_plugin  # noqa: F401  (registers the test reward and method in each launched process)
from mmgrpo.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_reroll_exactly_what_one_process_does(tmp_path):
    (tmp_path / "rw_plugin.py").write_text(PLUGIN)
    (tmp_path / "cli.py").write_text(CLI)
    sys.path.insert(0, str(tmp_path))
    try:
        import rw_plugin  # noqa: F401
    finally:
        sys.path.remove(str(tmp_path))
    config = {
        **BASE,
        "run": {"name": "x", "seed": 3},
        "rewards": [{"name": "test_rw2_best_arm"}],
        "methods": {"test_reroll2": {"reward": "test_rw2_best_arm", "keep": "signal", "max_rounds": 2}},
        "trainer": {**BASE["trainer"], "max_steps": 3, "lr": 0.1, "dump_advantages": True, "checkpoint_every": 0},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    one = train(load_config(cfg_path, [f"run.output_dir={tmp_path}", "run.name=one"]))
    args = [tmp_path / "cli.py", "train", cfg_path, f"run.output_dir={tmp_path}", "run.name=two"]
    proc = accelerate_launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in range(3):
        name = f"debug/adv_step_{step:06d}.safetensors"
        a, b = load_file(str(one.run_dir / name)), load_file(str(tmp_path / "two" / name))
        assert torch.equal(a["rewards"], b["rewards"]), f"step {step}: different samples"
        assert torch.allclose(a["advantages"], b["advantages"], atol=1e-6), f"step {step}"
    p1 = ckpt.load_checkpoint(ckpt.latest_checkpoint(one.run_dir / "checkpoints"))["model"]["logits"]
    p2 = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints"))["model"]["logits"]
    assert torch.allclose(p1, p2, atol=1e-6), (p1 - p2).abs().max()
    lines = [
        [{k: v for k, v in json.loads(x).items() if k.startswith("rewrite/")} for x in p.read_text().splitlines()]
        for p in (one.run_dir / "metrics.jsonl", tmp_path / "two" / "metrics.jsonl")
    ]
    assert lines[0] == lines[1] and sum(m["rewrite/rerolled"] for m in lines[0]) > 0
