"""Ragged groups: a different G per prompt through padding, the estimators, rollouts, the trainer and 2 processes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmgrpo.core import advantages as adv_lib
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import (
    PromptBatch,
    Rollout,
    concat_rollouts,
    pad_groups,
    rollout_by_size,
    select_groups,
    unpad_groups,
)
from mmgrpo.methods.registry import METHODS, Method, register_method
from mmgrpo.policies.bandit import BanditPolicy
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import train

SIZES = [3, 1, 2]
FLAT = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])  # group 0: [1, 0, .5]; group 1: [1]; group 2: [0, 1]


def test_pad_and_unpad_round_trip_and_uniform_is_a_view():
    p = pad_groups(FLAT, SIZES)
    assert p.shape == (3, 3)
    assert torch.equal(p[0], torch.tensor([1.0, 0.0, 0.5]))
    assert p[1, 0] == 1.0 and p[1, 1:].isnan().all() and p[2, 2].isnan()
    assert torch.equal(unpad_groups(p, SIZES), FLAT)
    x = torch.arange(12.0)
    assert torch.equal(pad_groups(x, [4, 4, 4]), x.view(3, 4))  # uniform: the same values, bit for bit
    two = pad_groups(torch.stack([FLAT, -FLAT]), SIZES)  # leading dims kept: [R, B, G_max]
    assert two.shape == (2, 3, 3) and torch.equal(unpad_groups(two, SIZES)[1], -FLAT)
    with pytest.raises(ValueError):
        pad_groups(FLAT, [3, 2])


def test_estimators_on_ragged_groups_match_hand_computed_values():
    r = pad_groups(FLAT, SIZES)
    # grpo: group 0 mean .5, unbiased std sqrt((.25 + .25 + 0) / 2) = .5 -> [1, -1, 0]; group 1 has one row (zero
    # variance) -> 0; group 2 mean .5, std sqrt(.5 / 1) = .70711 -> [-.70711, .70711]
    got = unpad_groups(adv_lib.grpo(r), SIZES)
    want = torch.tensor([1.0, -1.0, 0.0, 0.0, -0.70711, 0.70711])
    assert torch.allclose(got, want, atol=1e-4), got
    # dr_grpo: r - group mean
    got = unpad_groups(adv_lib.dr_grpo(r), SIZES)
    assert torch.allclose(got, torch.tensor([0.5, -0.5, 0.0, 0.0, -0.5, 0.5]), atol=1e-6), got
    # batch_std: group-mean baseline over the std of the 6 real rewards (padding left out): mean 3.5/6 = .58333,
    # squared deviations sum 1.20833, / 5 = .241667, std .491596 -> group 0: [.5, -.5, 0] / .491596
    got = unpad_groups(adv_lib.batch_std(r), SIZES)
    k = 0.5 / 0.491596
    assert torch.allclose(got, torch.tensor([k, -k, 0.0, 0.0, -k, k]), atol=1e-4), got
    # group-local estimators: a padded group gives what the group alone gives
    for name in ("grpo", "dr_grpo", "mc_grpo", "ngrpo"):
        est = adv_lib.get_estimator(name)
        padded = unpad_groups(est(r), SIZES)
        alone = torch.cat([est(g[None])[0] for g in torch.split(FLAT, SIZES)])
        assert torch.allclose(padded, alone, atol=1e-6), name
    # MC-GRPO's row weights: 0 at each group's pivot (lower median, first hit), padding never a pivot:
    # group 0 [1, 0, .5] -> median .5 (row 2); group 1 [1] -> row 3; group 2 [0, 1] -> lower median 0 (row 4)
    w = unpad_groups(adv_lib.mc_grpo_weights(r), SIZES)
    assert w.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # stratified (strata over the whole batch): padded keys (-1) and NaN rewards change nothing
    keys = torch.tensor([0, 1, 0, 1, 0, 1])
    padded = unpad_groups(adv_lib.stratified(r, keys=pad_groups(keys, SIZES, fill=-1)), SIZES)
    assert torch.allclose(padded, adv_lib.stratified(FLAT[None], keys=keys[None])[0], atol=1e-6)
    # through the combiners, two reward columns, one of them not applying to row 0
    cols = torch.stack([FLAT, torch.tensor([float("nan"), 1.0, 1.0, 0.0, 1.0, 0.0])])
    for comb in ("sum_then_normalize", "normalize_then_sum"):
        out = adv_lib.combine(comb, pad_groups(cols, SIZES), torch.ones(2), "dr_grpo", {})
        assert out[1, 1:].eq(0).all() and out[0].isfinite().all(), comb
    # sum_then_normalize: totals [1, 1, 1.5, 1, 1, 1] -> group 0 mean 7/6: [-1/6, -1/6, 1/3]; group 2 equal -> 0
    out = unpad_groups(adv_lib.combine("sum_then_normalize", pad_groups(cols, SIZES), torch.ones(2), "dr_grpo", {}),
                       SIZES)  # fmt: skip
    assert torch.allclose(out, torch.tensor([-1 / 6, -1 / 6, 1 / 3, 0.0, 0.0, 0.0]), atol=1e-6), out


def _rollout(G: int, B: int, start: int = 0) -> Rollout:
    n = G * B
    return Rollout(samples=torch.arange(start, start + n), logp_old=torch.zeros(n, 1),
                   train_mask=torch.ones(n, 1, dtype=torch.bool), group_size=G, prompts=list(range(n)),
                   meta=[{} for _ in range(n)], extras={"x": torch.arange(start, start + n)})  # fmt: skip


def test_rollouts_of_different_group_sizes_concatenate_and_select_as_ragged():
    a, b = _rollout(2, 2), _rollout(3, 1, start=4)
    cat = concat_rollouts([a, b])
    assert cat.ragged and cat.sizes == [2, 2, 3] and cat.group_size == 3 and cat.num_groups == 3
    assert cat.group_offsets == [0, 2, 4, 7]
    assert torch.equal(cat.row_group(), torch.tensor([0, 0, 1, 1, 2, 2, 2]))
    sel = select_groups(cat, [2, 0])
    assert sel.sizes == [3, 2] and torch.equal(sel.samples, torch.tensor([4, 5, 6, 0, 1]))
    uni = select_groups(cat, [0, 1])
    assert not uni.ragged and uni.group_size == 2  # equal sizes fold back into the plain form
    with pytest.raises(ValueError):
        Rollout(samples=None, logp_old=torch.zeros(3, 1), train_mask=torch.ones(3, 1, dtype=torch.bool),
                group_size=2, prompts=[0] * 3, meta=[{}] * 3, group_sizes=[2, 2])  # fmt: skip


def test_a_prompt_samples_the_same_rows_whatever_the_other_prompts_ask():
    policy = BanditPolicy(num_prompts=4, num_arms=50, seed=0)
    batch = PromptBatch(prompts=[0, 1, 2], seeds=[11, 12, 13], group_sizes=[2, 5, 3])
    out = policy.rollout(batch, 4)
    assert out.sizes == [2, 5, 3] and out.num_rows == 10
    assert out.prompts == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    for b, (p, seed, g) in enumerate(zip([0, 1, 2], [11, 12, 13], [2, 5, 3])):
        alone = policy.rollout(PromptBatch(prompts=[p], seeds=[seed]), g)
        rows = out.group_rows([b])
        assert torch.equal(out.samples[rows], alone.samples), b
        assert torch.equal(out.logp_old[rows], alone.logp_old), b
    # one size for every prompt: the plain rollout
    same = rollout_by_size(policy.rollout, PromptBatch(prompts=[0, 1], seeds=[1, 2], group_sizes=[3, 3]), 8)
    assert not same.ragged and same.group_size == 3


BASE = {
    "pipeline": "bandit",
    "run": {"name": "r", "seed": 0},
    "data": {"options": {"num_prompts": 6, "num_arms": 5}},
    "rewards": [{"name": "bandit_arm_value"}],
    "trainer": {"max_steps": 3, "prompts_per_step": 3, "group_size": 4, "lr": 0.1, "progress": False,
                "dump_advantages": True, "checkpoint_every": 0, "minibatches": 2, "epochs": 2},
}  # fmt: skip


def _metrics(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def test_uniform_sizes_given_explicitly_run_bit_for_bit_as_the_plain_stream(tmp_path):
    plain = train(load_config(None, [f"run.output_dir={tmp_path}", "run.name=plain"], base=BASE))
    sized = train(load_config(None, [f"run.output_dir={tmp_path}", "run.name=sized", "sampler.name=fixed_sizes",
                                     "sampler.options.group_sizes=[4]"], base=BASE))  # fmt: skip
    assert _metrics(plain.run_dir) == _metrics(sized.run_dir)
    assert torch.equal(plain.policy.probs(), sized.policy.probs())


def test_a_ragged_run_normalises_each_group_alone_and_trains(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "sampler={name: fixed_sizes, options: {group_sizes: "
                             "[2, 5, 3]}}"], base=BASE)  # fmt: skip
    trainer = train(cfg)
    for step in range(3):
        dump = load_file(str(trainer.run_dir / f"debug/adv_step_{step:06d}.safetensors"))
        adv, rewards = dump["advantages"], dump["rewards"][0, 0]  # [B, G_max], [N]
        assert adv.shape == (3, 5) and rewards.shape == (10,)
        assert dump["group_sizes"].tolist() == [2, 5, 3]  # what splits the rows into groups (bench/learning_vlm.py)
        want = adv_lib.grpo(pad_groups(rewards, [2, 5, 3]))
        assert torch.equal(adv, want)
        assert adv[0, 2:].eq(0).all() and adv[2, 3:].eq(0).all()  # padding: no advantage
        for g, r in enumerate(torch.split(rewards, [2, 5, 3])):  # each group alone
            assert torch.allclose(adv[g, : len(r)], adv_lib.grpo(r[None])[0], atol=1e-6)
    first = trainer.policy.probs()
    assert not torch.allclose(first, torch.full_like(first, 0.2))  # it trained
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in _metrics(trainer.run_dir))


def test_ragged_sizes_below_the_minibatches_fail_at_load(tmp_path):
    with pytest.raises(UserError, match="group_sizes"):
        bad = "sampler={name: fixed_sizes, options: {group_sizes: [1, 4]}}"
        load_config(None, [f"run.output_dir={tmp_path}", bad], base=BASE)
    hooked = Method(name="hooked_for_ragged_test", paper="a test method with an advantage hook",
                    advantage_hooks=lambda o: [lambda adv, *a: (adv, {})])  # fmt: skip
    if "hooked_for_ragged_test" not in METHODS:
        register_method(hooked)
    with pytest.raises(UserError, match="ragged"):
        load_config(None, [f"run.output_dir={tmp_path}", "sampler={name: fixed_sizes, options: {group_sizes: [2, 4]}}",
                           "methods={hooked_for_ragged_test: {}}"], base=BASE)  # fmt: skip


CLI = """
import sys
from mmgrpo.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


REWARD = '''
def hopeless_half(samples, prompts, meta, ctx):
    """0 on bandit prompts 0..3 (never solved), 1 for the best arm elsewhere: pass rates that differ by prompt."""
    return [0.0 if int(p) < 4 else float(int(a) == m["best_arm"]) for a, p, m in zip(samples.tolist(), prompts, meta)]
'''


def test_two_processes_with_ragged_groups_match_one_process(tmp_path, monkeypatch):
    """GDRO gives prompts different numbers of rollouts (so the ranks hold different row counts) from gathered
    statistics; a 2-process CPU run samples, normalises and updates exactly as the 1-process run."""
    import yaml

    from mmgrpo.testing.launch import accelerate_launch
    from mmgrpo.train import checkpoint as ckpt

    (tmp_path / "ragged_reward.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {**BASE, "run": {"name": "one", "seed": 3}, "data": {"options": {"num_prompts": 8, "num_arms": 5}},
           "rewards": [{"name": "ragged_reward.hopeless_half"}],
           "advantage": {"estimator": "batch_std"}, "sampler": {"name": "gdro", "options": {"n_min": 2, "n_max": 8}},
           "trainer": {**BASE["trainer"], "prompts_per_step": 4, "max_steps": 4, "micro_batch_size": 3}}  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one = train(load_config(path, [f"run.output_dir={tmp_path}"]))
    (tmp_path / "cli.py").write_text(CLI)
    args = [tmp_path / "cli.py", "train", path, f"run.output_dir={tmp_path}", "run.name=two"]
    proc = accelerate_launch(args, pythonpath=[tmp_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    widths = []
    for step in range(4):
        name = f"debug/adv_step_{step:06d}.safetensors"
        a, b = load_file(str(one.run_dir / name)), load_file(str(tmp_path / "two" / name))
        assert torch.equal(a["rewards"], b["rewards"]), f"step {step}: different samples"
        assert torch.allclose(a["advantages"], b["advantages"], atol=1e-6), f"step {step}"
        widths.append(a["advantages"].shape[1])
    assert max(widths) > 4  # some step was ragged (G_max above the mean budget G = 4)
    p1 = ckpt.load_checkpoint(ckpt.latest_checkpoint(one.run_dir / "checkpoints"))["model"]["logits"]
    p2 = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints"))["model"]["logits"]
    assert torch.allclose(p1, p2, atol=1e-6), (p1 - p2).abs().max()
