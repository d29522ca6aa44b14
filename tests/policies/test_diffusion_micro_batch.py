"""``trainer.micro_batch_size: auto`` (the default) on a diffusion policy: rows per micro-batch from the (row, unit)
budget ``trainer.micro_batch_units``, the same loss and gradients as the whole minibatch in one forward (within
1e-6), and a peak memory that stays flat when B x G x T grows (it grows with B x G x T for the whole minibatch)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmgrpo.core import aggregations
from mmgrpo.core import losses as loss_lib
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.testing.tiny_sd3 import save_tiny_sd3
from mmgrpo.train.config import load_config
from mmgrpo.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
T = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "model")


def trainer_for(tmp_path, model, *overrides, policy=None) -> Trainer:
    base = {
        "pipeline": "text_to_image",
        "run": {"seed": 0},
        "policy": {"options": {"family": "sd3", "path": model, "num_steps": T, **(policy or {})}},
        "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "trainer": {"prompts_per_step": 2, "group_size": 4, "progress": False},
    }
    return Trainer(load_config(None, [f"run.output_dir={tmp_path}", *overrides], base=base), tmp_path / "run")


def rollout_of(trainer: Trainer):
    batch = PromptBatch(prompts=["a red circle", "two blue squares"], seeds=[3, 4], step=0)
    return trainer.sample(batch, 0)


def accumulated(tr: Trainer, rollout, rows, adv, row_w, mask):
    """The minibatch's metrics and accumulated gradients (from zero), asserting a finite loss."""
    tr.optimizer.zero_grad(set_to_none=True)
    metrics, finite = tr.accumulate_gradients(rollout, rows, adv, row_w, mask)
    assert finite
    return metrics, [p.grad.detach().clone() for p in tr.params]


def test_auto_fits_rows_times_trained_units_into_the_budget(tmp_path, model):
    tr = trainer_for(tmp_path, model)  # defaults: micro_batch_size auto, micro_batch_units 16
    assert tr.cfg.trainer.micro_batch_size == "auto" and tr.cfg.trainer.micro_batch_units == 16
    rows = torch.arange(8)
    every = torch.ones(8, T, dtype=torch.bool)  # the sde objective trains all T = 4 steps of a row
    assert tr.micro_rows(rows, every) == 4  # 16 / 4
    tr.cfg.trainer.micro_batch_units = 100
    assert tr.micro_rows(rows, every) == 8  # 25 rows fit: the whole minibatch of 8
    tr.cfg.trainer.micro_batch_units = 8
    assert tr.micro_rows(rows, every) == 2  # 8 / 4
    tr.cfg.trainer.micro_batch_units = 3
    assert tr.micro_rows(rows, every) == 1  # one row's 4 steps exceed the budget: still one row
    tr.cfg.trainer.micro_batch_units = 7
    assert tr.micro_rows(rows, every) == 2  # 7 / 4 = 1.75: the nearest count, 2 rows (8 pairs), not floor's 1
    tr.cfg.trainer.micro_batch_units = 5
    assert tr.micro_rows(rows, every) == 1  # 5 / 4 = 1.25: 1 row
    half = every.clone()
    half[:, 2:] = False  # 2 trained steps per row
    tr.cfg.trainer.micro_batch_units = 8
    assert tr.micro_rows(rows, half) == 4  # 8 / 2
    tr.cfg.trainer.micro_batch_size = 3
    assert tr.micro_rows(rows, every) == 3  # a number is rows, as before
    tr.cfg.trainer.micro_batch_size = 0
    assert tr.micro_rows(rows, every) == 8  # 0 = the whole minibatch


def test_auto_on_a_policy_without_a_choice_is_the_whole_minibatch(tmp_path):
    base = {"pipeline": "bandit", "data": {"options": {"num_prompts": 4, "num_arms": 3}},
            "rewards": [{"name": "bandit_arm_value"}],
            "trainer": {"prompts_per_step": 2, "group_size": 4}}  # fmt: skip
    tr = Trainer(load_config(None, [f"run.output_dir={tmp_path}"], base=base), tmp_path / "run")
    assert not hasattr(tr.policy, "micro_batch_rows")
    assert tr.micro_rows(torch.arange(8), torch.ones(8, 1, dtype=torch.bool)) == 8


@pytest.mark.parametrize(
    "objective, loss, rows_micro",
    [
        ({}, ["loss.name=grpo"], 2),  # sde: 4 trained steps per row, budget 6 -> 1.5 -> 2 rows
        ({"objective": {"name": "nft", "timesteps": 3}, "sde": {"noise_level": 0.0}},
         ["loss.name=nft", "loss.adv_clip=1.0"], 2),  # nft: 3 draws per row -> 2 rows
    ],
    ids=["sde", "nft"],
)  # fmt: skip
def test_auto_micro_batches_give_the_whole_minibatch_loss_and_gradients(tmp_path, model, objective, loss, rows_micro):
    torch.manual_seed(0)
    tr = trainer_for(tmp_path, model, *loss, "trainer.micro_batch_units=6", policy=objective)
    rollout = rollout_of(tr)
    n = rollout.num_rows
    rows, adv, row_w = torch.arange(n), torch.randn(n), torch.ones(n)
    mask = rollout.train_mask
    tr.policy.model.train()

    assert tr.micro_rows(rows, mask) == rows_micro
    m_auto, g_auto = accumulated(tr, rollout, rows, adv, row_w, mask)
    tr.cfg.trainer.micro_batch_size = 0
    assert tr.micro_rows(rows, mask) == n
    m_whole, g_whole = accumulated(tr, rollout, rows, adv, row_w, mask)
    assert sum(g.abs().sum().item() for g in g_whole) > 1e-3  # a real gradient, not zeros on both sides
    worst = max((a - b).abs().max().item() for a, b in zip(g_auto, g_whole))
    assert worst <= 1e-6, worst
    assert m_auto.keys() == m_whole.keys()
    for key in ("loss/policy", "loss/total", "loss/ratio_mean", "loss/adv_mean", "loss/clip_frac"):
        assert abs(m_auto[key] - m_whole[key]) <= 1e-6, (key, m_auto[key], m_whole[key])


def test_a_row_whose_units_exceed_the_budget_is_split_into_parts_of_its_units(tmp_path, model):
    """With the budget below one row's trained units, auto splits a single row's units into the nearest whole number
    of parts (``micro_batch_pieces``), where the loss is exact over parts of a row: grpo/pg/nft with token_mean or
    constant. Not for gspo (sequence ratio), seq_mean (per-row mean), or a number of rows set by hand."""
    tr = trainer_for(tmp_path, model, "loss.name=grpo", "trainer.micro_batch_units=2")
    rows = torch.arange(3)
    every = torch.ones(3, T, dtype=torch.bool)  # 4 trained steps per row, budget 2: 2 parts of 2 steps
    assert tr.micro_rows(rows, every) == 1
    blocks = [(r.tolist(), u.tolist()) for r, u in tr.micro_blocks(rows, every)]
    assert blocks == [([0], [0, 1]), ([0], [2, 3]), ([1], [0, 1]), ([1], [2, 3]), ([2], [0, 1]), ([2], [2, 3])]
    tr.cfg.trainer.micro_batch_units = 3  # 4 / 3 = 1.33: one part (the nearest count), as rows are chosen
    assert [u.tolist() for _, u in tr.micro_blocks(rows, every)] == [[0, 1, 2, 3]] * 3
    tr.cfg.trainer.micro_batch_units = 1  # 4 parts of one step; only the units a row trains
    sparse = every.clone()
    sparse[:, 1] = False
    assert [u.tolist() for _, u in tr.micro_blocks(rows[:1], sparse)] == [[0], [2], [3]]
    assert tr.policy.micro_batch_pieces(4, 1) == 4 and tr.policy.micro_batch_pieces(9, 2) == 4
    tr.cfg.trainer.micro_batch_units = 2
    for field, value in [("name", "gspo"), ("aggregation", "seq_mean")]:
        saved = getattr(tr.cfg.loss, field), tr.aggregation
        setattr(tr.cfg.loss, field, value)
        if field == "aggregation":
            tr.aggregation = aggregations.make_aggregation("seq_mean")
        assert tr.splits_units() is None
        assert [u.tolist() for _, u in tr.micro_blocks(rows, every)] == [[0, 1, 2, 3]] * 3, value
        setattr(tr.cfg.loss, field, saved[0])
        tr.aggregation = saved[1]
    tr.cfg.trainer.micro_batch_size = 1
    assert [u.tolist() for _, u in tr.micro_blocks(rows, every)] == [[0, 1, 2, 3]] * 3


@pytest.mark.parametrize(
    "objective, loss",
    [
        ({}, ["loss.name=grpo", "loss.beta=0.1"]),  # sde with the reference KL: 4 steps in parts of 1 and 2
        ({}, ["loss.name=pg", "loss.aggregation={name: constant, options: {constant: 4}}"]),
        ({"objective": {"name": "nft", "timesteps": 3}, "sde": {"noise_level": 0.0}},
         ["loss.name=nft", "loss.adv_clip=1.0"]),
    ],
    ids=["sde-kl", "pg-constant", "nft"],
)  # fmt: skip
@pytest.mark.parametrize("budget", [1, 2])
def test_parts_of_a_row_give_the_whole_minibatch_loss_and_gradients(tmp_path, model, objective, loss, budget):
    """The update in parts of each row's units: the same loss, metrics and gradients as the whole minibatch in one
    forward (within 1e-6). The policy's rows train different units here (the mask of the rollout, with one unit of
    row 0 masked out), so a part may hold no unit a row trains."""
    torch.manual_seed(0)
    ref = ["policy.options.reference_kl=true"] if "loss.beta=0.1" in loss else []
    tr = trainer_for(tmp_path, model, *loss, *ref, f"trainer.micro_batch_units={budget}", policy=objective)
    rollout = rollout_of(tr)
    n = rollout.num_rows
    rows, adv, row_w = torch.arange(n), torch.randn(n), torch.rand(n) + 0.5
    mask = rollout.train_mask.clone()
    mask[0, 1] = False
    tr.policy.model.train()

    blocks = tr.micro_blocks(rows, mask)
    parts = sum(max(1, round(int(mask[i].sum()) / budget)) for i in range(n))  # row 0 trains one unit less
    assert len(blocks) == parts > n and all(len(r) == 1 for r, _ in blocks)
    m_parts, g_parts = accumulated(tr, rollout, rows, adv, row_w, mask)
    tr.cfg.trainer.micro_batch_size = 0
    assert len(tr.micro_blocks(rows, mask)) == 1
    m_whole, g_whole = accumulated(tr, rollout, rows, adv, row_w, mask)
    assert sum(g.abs().sum().item() for g in g_whole) > 1e-3
    worst = max((a - b).abs().max().item() for a, b in zip(g_parts, g_whole))
    assert worst <= 1e-6, worst
    assert m_parts.keys() == m_whole.keys()
    for key in ("loss/policy", "loss/total", "loss/ratio_mean", "loss/adv_mean", "loss/clip_frac", "loss/kl"):
        if key in m_whole:
            assert abs(m_parts[key] - m_whole[key]) <= 1e-6, (key, m_parts[key], m_whole[key])


PER_ROW = {"exploration": {"name": "full", "timestep_fraction": 0.5, "selection": "random_per_row"}}


def test_danceGRPO_per_row_steps_sample_the_same_and_forward_only_each_rows_steps(tmp_path, model):
    """``selection: random_per_row``: every row trains its own int(0.5 x 4) = 2 of the 4 steps. The samples are those
    of the shared selection (the subsets are drawn after the noise), and a log-prob forward holds only each row's own
    steps (8 rows x 2 pairs), with the values of the all-pairs forward."""
    torch.manual_seed(0)
    tr = trainer_for(tmp_path / "a", model, "loss.name=grpo", policy=PER_ROW)
    rollout = rollout_of(tr)
    mask = rollout.train_mask
    assert mask.shape == (8, T) and (mask.sum(1) == 2).all()
    assert len({tuple(r.nonzero().reshape(-1).tolist()) for r in mask}) > 1  # not one subset for all
    shared = trainer_for(tmp_path / "b", model, "loss.name=grpo", policy={"exploration": {
        "name": "full", "timestep_fraction": 0.5, "selection": "random"}})  # fmt: skip
    other = rollout_of(shared)
    assert torch.equal(other.extras["latents"], rollout.extras["latents"])
    assert torch.equal(other.logp_old, rollout.logp_old)
    assert (other.train_mask == other.train_mask[:1]).all()  # the shared selection: one subset

    rows, units = torch.arange(8), torch.arange(T)
    calls: list[int] = []
    hook = tr.policy.model.register_forward_hook(lambda m, a, k, out: calls.append(len(k["hidden_states"])),
                                                 with_kwargs=True)  # fmt: skip
    try:
        with torch.no_grad():
            sparse = tr.policy.log_prob(rollout, rows, units, pairs=mask).logp
            assert calls == [16]  # 8 rows x their 2 steps, not 8 x 4
            dense = tr.policy.log_prob(rollout, rows, units).logp
            assert calls == [16, 32]
            # no pair marked (a block of rows that train none of these steps): the all-pairs forward, as without pairs
            none = tr.policy.log_prob(rollout, rows, units, pairs=torch.zeros_like(mask)).logp
            assert calls == [16, 32, 32] and torch.equal(none, dense)
    finally:
        hook.remove()
    assert torch.allclose(sparse[mask], dense[mask], atol=1e-6)
    assert (sparse[~mask] == 0).all()
    assert torch.allclose(dense[mask], rollout.logp_old[mask], atol=1e-5)  # ratio 1 at the sampling weights
    # micro-batches count the units a row trains (2), not the union of the rows' (4): budget 4 -> 2 rows
    tr.cfg.trainer.micro_batch_units = 4
    assert tr.micro_rows(rows, mask) == 2


@pytest.mark.parametrize("loss", [["loss.name=grpo"], ["loss.name=grpo", "loss.beta=0.1"]], ids=["grpo", "grpo-kl"])
def test_danceGRPO_per_row_steps_give_the_all_pairs_loss_and_gradients(tmp_path, model, monkeypatch, loss):
    """The update forwarding each row's own steps (micro-batches of 2 rows) against all rows x steps in one forward
    with the mask applied after (the objective told not to score pairs): the same loss, metrics and gradients
    within 1e-6."""
    torch.manual_seed(0)
    ref = ["policy.options.reference_kl=true"] if "loss.beta=0.1" in loss else []
    tr = trainer_for(tmp_path, model, *loss, *ref, "trainer.micro_batch_units=4", policy=PER_ROW)
    rollout = rollout_of(tr)
    n = rollout.num_rows
    rows, adv, row_w = torch.arange(n), torch.randn(n), torch.rand(n) + 0.5
    mask = rollout.train_mask
    tr.policy.model.train()
    assert [len(r) for r, _ in tr.micro_blocks(rows, mask)] == [2, 2, 2, 2]
    m_pairs, g_pairs = accumulated(tr, rollout, rows, adv, row_w, mask)
    monkeypatch.setattr(tr.policy.objective, "scores_pairs", False)
    tr.cfg.trainer.micro_batch_size = 0
    m_all, g_all = accumulated(tr, rollout, rows, adv, row_w, mask)
    assert sum(g.abs().sum().item() for g in g_all) > 1e-3
    worst = max((a - b).abs().max().item() for a, b in zip(g_pairs, g_all))
    assert worst <= 1e-6, worst
    for key in ("loss/policy", "loss/total", "loss/ratio_mean", "loss/adv_mean", "loss/clip_frac", "loss/kl"):
        if key in m_all:
            assert abs(m_pairs[key] - m_all[key]) <= 1e-6, (key, m_pairs[key], m_all[key])


def test_with_collective_forwards_parts_are_halved_until_every_process_makes_as_many(tmp_path, model, monkeypatch):
    """Under FSDP with several processes (``collective``; the two max-reduces faked: "the other process" makes
    ``other`` micro-batches of rows, then ``other`` blocks), a process that makes fewer blocks halves its largest ones,
    rows first, then units, so both run the same number of forwards; a block of one row and one unit cannot be
    halved."""
    tr = trainer_for(tmp_path, model, "loss.name=grpo", "trainer.micro_batch_units=2")
    rows, every = torch.arange(2), torch.ones(2, T, dtype=torch.bool)
    other: list[int] = []
    monkeypatch.setattr(tr, "collective", True)
    monkeypatch.setattr(tr.acc, "reduce", lambda t, reduction: torch.maximum(t, torch.tensor([other.pop(0)])))

    def blocks(row_chunks: int, forwards: int):
        other[:] = [row_chunks, forwards]
        out = [(r.tolist(), u.tolist()) for r, u in tr.micro_blocks(rows, every)]
        assert not other  # both reduces were made
        return out

    plain = [([0], [0, 1]), ([0], [2, 3]), ([1], [0, 1]), ([1], [2, 3])]
    assert blocks(2, 4) == plain
    assert blocks(2, 5) == [([0], [0]), ([0], [1]), *plain[1:]]  # the first largest block halved along its units
    with pytest.raises(ValueError, match="cannot fill the 9 micro-batches"):
        blocks(2, 9)
    tr.cfg.trainer.micro_batch_units = 8  # 2 rows of 4 units in one micro-batch
    assert blocks(1, 1) == [([0, 1], [0, 1, 2, 3])]
    assert blocks(1, 2) == [([0], [0, 1, 2, 3]), ([1], [0, 1, 2, 3])]  # halved along rows first


PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from mmgrpo.core.types import PromptBatch
    from mmgrpo.train.config import load_config
    from mmgrpo.train.trainer import Trainer

    model, out = sys.argv[1], sys.argv[2]

    def reset_peak():  # Linux: the peak RSS (VmHWM) restarts from the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def rss(field):  # MiB
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    torch.manual_seed(0)
    base = {"pipeline": "text_to_image", "rewards": [{"name": "jpeg_incompressibility"}],
            "policy": {"options": {"family": "sd3", "path": model, "num_steps": 4}},
            "data": {"options": {"heldout_prompts": "", "prompts": "shapes"}},
            "trainer": {"prompts_per_step": 1, "group_size": 4, "micro_batch_units": 8, "progress": False}}
    tr = Trainer(load_config(None, [f"run.output_dir={out}"], base=base), out + "/run")
    peaks = {}
    # freed memory stays in the process's heap and hides a later update's growth up to its size: largest last
    for name, micro, B, steps in [("warm", "auto", 1, 4), ("auto_small", "auto", 1, 4), ("auto_large", "auto", 2, 8),
                                  ("auto_long", "auto", 1, 24), ("row_long", 1, 1, 24), ("whole_large", 0, 2, 8)]:
        tr.cfg.trainer.micro_batch_size = micro
        tr.policy.opts.num_steps = steps
        batch = PromptBatch(prompts=[f"a red circle {i}" for i in range(B)], seeds=list(range(B)), step=0)
        rollout = tr.sample(batch, 0)
        n = rollout.num_rows
        tr.policy.model.train()
        reset_peak()
        before = rss("VmRSS")
        tr.accumulate_gradients(rollout, torch.arange(n), torch.randn(n), torch.ones(n), rollout.train_mask)
        peaks[name] = rss("VmHWM") - before  # what the update added at its peak
        tr.optimizer.zero_grad(set_to_none=True)
    print(json.dumps(peaks))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs and VmHWM are Linux's")
def test_peak_memory_of_the_update_is_flat_in_n_x_t_with_auto(tmp_path):
    """One clean process, the peak RSS each update adds to the RSS before it (the high-water mark reset first, so what
    loading reached earlier does not hide it), for N x T = 4 x 4 = 16 (row, step) pairs, then 8 x 8 = 64 pairs: with
    auto (8 pairs per micro-batch) the second adds (almost) nothing more; the whole minibatch of 64 pairs in one
    forward adds its activations (~5 MiB per pair for this model), which shows the measurement sees them. At T 24 a
    row's 24 trained steps exceed the budget: auto splits them into 3 parts of 8 and adds about what T 4 added, where
    one row a micro-batch (micro_batch_size 1: 24 pairs a forward) adds a row's activations."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from mmgrpo.testing.tiny_sd3 import tiny_sd3_components

    parts = tiny_sd3_components(0, with_t5=False)
    torch.manual_seed(0)  # 16 x 16 latents (256 tokens), width 64: activations dominate the update's memory
    parts["transformer"] = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
        pos_embed_max_size=16,
    )  # fmt: skip
    StableDiffusion3Pipeline(**parts).save_pretrained(str(tmp_path / "model"), safe_serialization=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "model"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    grown_auto = peaks["auto_large"] - peaks["auto_small"]
    grown_whole = peaks["whole_large"] - peaks["auto_large"]
    print(f"\nMiB the update adds {peaks}: auto +{grown_auto:.0f} from 16 to 64 pairs, whole +{grown_whole:.0f}")
    assert grown_auto < 40, peaks
    assert grown_whole > 150, peaks
    assert peaks["auto_long"] - peaks["auto_small"] < 40, peaks
    assert peaks["row_long"] - peaks["auto_long"] > 50, peaks


def test_zero_advantage_rows_are_left_out_of_the_update_with_the_same_loss_and_gradients(tmp_path, model):
    """``trainer.skip_zero_advantage`` (default on): rows whose advantage is 0 (a zero-variance group, or a row at
    its group's mean) make no forward, as in Flow-GRPO; the loss still counts them in its normaliser, so the loss and
    gradients equal the update over every row within float rounding."""
    torch.manual_seed(0)
    tr = trainer_for(tmp_path, model, "loss.name=grpo", "trainer.micro_batch_units=8")
    rollout = rollout_of(tr)
    n = rollout.num_rows  # 2 groups x 4
    rows, row_w, mask = torch.arange(n), torch.ones(n), rollout.train_mask
    adv = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -0.5, 0.0, -0.5])  # group 0 has zero variance; row 6 is at its mean
    tr.policy.model.train()

    assert tr.rows_with_gradient(rows, adv, mask).tolist() == [4, 5, 7]
    m_skip, g_skip = accumulated(tr, rollout, rows, adv, row_w, mask)
    tr.cfg.trainer.skip_zero_advantage = False
    assert tr.rows_with_gradient(rows, adv, mask).tolist() == list(range(n))
    m_all, g_all = accumulated(tr, rollout, rows, adv, row_w, mask)
    assert (m_skip["update/skipped_rows_frac"], m_all["update/skipped_rows_frac"]) == (5 / 8, 0.0)
    assert sum(g.abs().sum().item() for g in g_all) > 1e-3
    worst = max((a - b).abs().max().item() for a, b in zip(g_skip, g_all))
    assert worst <= 1e-6, worst
    for key in ("loss/policy", "loss/total"):  # the normaliser counts all 8 rows on both sides
        assert abs(m_skip[key] - m_all[key]) <= 1e-7, (key, m_skip[key], m_all[key])

    # every advantage 0: one row still runs, so each trained parameter gets its gradient, exactly 0 (AdamW then
    # steps as it would have: moments decay, weight decay applies)
    tr.cfg.trainer.skip_zero_advantage = True
    assert tr.rows_with_gradient(rows, torch.zeros(n), mask).tolist() == [0]
    m_zero, g_zero = accumulated(tr, rollout, rows, torch.zeros(n), row_w, mask)
    assert len(g_zero) == len(tr.params) and all(float(g.abs().max()) == 0.0 for g in g_zero)
    assert m_zero["loss/policy"] == 0.0

    # where a zero-advantage row still has a gradient, every row runs: a KL term (beta > 0), or a loss that does not
    # declare zero_adv_no_grad (nft maps A = 0 to the reward 1/2, a target of its own)
    tr.cfg.loss.beta = 0.1
    assert len(tr.rows_with_gradient(rows, adv, mask)) == n
    tr.cfg.loss.beta, tr.cfg.loss.name = 0.0, "nft"
    assert len(tr.rows_with_gradient(rows, adv, mask)) == n


def test_the_clipped_and_plain_surrogates_give_zero_advantage_units_zero_gradient():
    """What ``zero_adv_no_grad`` declares, by hand: with A = 0 the loss is 0 and d loss / d logp = 0 at any ratio
    (here exp(0.3) and exp(-0.4), outside the clip range), for grpo (with dual clip), gspo and pg; nft does not
    declare it."""
    from mmgrpo.core import losses

    for name, opts in [("grpo", {}), ("grpo", {"dual_clip": 3.0}), ("gspo", {}), ("pg", {})]:
        assert losses.zero_adv_no_grad(name)
        logp = torch.tensor([[0.3, -0.4]], requires_grad=True)
        loss, _ = losses.get_loss(name)(logp, torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2, dtype=torch.bool),
                                        **opts)  # fmt: skip
        loss.sum().backward()
        assert float(loss.detach().abs().max()) == 0.0 and float(logp.grad.abs().max()) == 0.0, name
    assert not losses.zero_adv_no_grad("nft")


def test_recomputed_log_probs_come_back_where_logp_old_is(tmp_path, model):
    """The update meets logp_old, the advantages and the mask on the host, whatever device the model runs on: a
    policy on a GPU returns its recomputed log-probs (and KL) moved to logp_old's device, through autograd. Here
    logp_old stands on the meta device, so a policy that returned them where the model computed them (the CPU)
    fails, as it did on a GPU (a device mismatch in the loss at the first update)."""
    for objective in ("sde", "flow_matching"):
        tr = trainer_for(
            tmp_path / objective, model, "loss.beta=0.01", policy={"objective": objective, "reference_kl": True}
        )
        rollout = rollout_of(tr)
        cpu = tr.policy.log_prob(rollout, torch.arange(4))
        assert rollout.logp_old.device.type == "cpu" and cpu.logp.device.type == "cpu"
        rollout.logp_old = rollout.logp_old.to("meta")
        lp = tr.policy.log_prob(rollout, torch.arange(4))
        assert lp.logp.is_meta and lp.kl is not None and lp.kl.is_meta, objective
        assert lp.logp.shape == cpu.logp.shape and lp.logp.requires_grad


def test_fp16_mixed_precision_with_float16_trainable_weights_is_refused_with_the_fix(tmp_path, model):
    """fp16 mixed precision trains through a gradient scaler, which cannot unscale float16 gradients (full
    fine-tuning of float16 weights): the trainer refuses the pair before any step, naming both settings and the ways
    out. LoRA adapters are fp32 on float16 weights, so that pair trains."""
    with pytest.raises(UserError) as e:
        trainer_for(tmp_path, model, "trainer.mixed_precision=fp16", policy={"dtype": "float16", "lora_rank": 0})
    msg = str(e.value)
    assert "trainer.mixed_precision=fp16" in msg and "torch.float16" in msg and "policy.options.dtype: float32" in msg
    trainer_for(tmp_path / "fp32", model, "trainer.mixed_precision=fp16", policy={"lora_rank": 2})  # fp32 weights
    lora = trainer_for(
        tmp_path / "lora", model, "trainer.mixed_precision=fp16", policy={"dtype": "float16", "lora_rank": 2}
    )
    assert {p.dtype for p in lora.params} == {torch.float32}


@pytest.mark.parametrize("objective", ["sde", "flow_matching"])
def test_a_minibatch_whose_units_the_loss_masks_out_still_forwards_with_zero_gradient(tmp_path, model, objective):
    """``loss.mask_zero_adv`` with every advantage 0 masks out every unit: the micro-batch has no unit to score. It
    forwards the first unit anyway and takes [n, 0] views of it (the flow_matching objective used to fail on the
    empty batch; the sde one made no forward, so under FSDP the other processes' collectives would wait for it), and
    every trained parameter gets its gradient, exactly 0."""
    tr = trainer_for(tmp_path, model, "loss.mask_zero_adv=true", policy={"objective": objective})
    rollout = rollout_of(tr)
    n = rollout.num_rows
    adv = torch.zeros(n)
    mask = loss_lib.mask_zero_advantages(rollout.train_mask.clone(), adv)
    assert not mask.any()
    tr.policy.model.train()
    forwards = []
    hook = tr.policy.unwrapped().register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        metrics, grads = accumulated(tr, rollout, torch.arange(n), adv, torch.ones(n), mask)
    finally:
        hook.remove()
    assert forwards and len(grads) == len(tr.params) and all(float(g.abs().max()) == 0.0 for g in grads)
    assert metrics["loss/policy"] == 0.0
