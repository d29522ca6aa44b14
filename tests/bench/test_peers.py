"""bench/peers.py: the quick mode runs every row end to end (no timings asserted), and the Flow-GRPO peer
(bench/flow_grpo_peer.py) is checked against hand-computed values and mmgrpo's own Flow-GRPO SDE step."""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).parents[2] / "bench"
SHAPES_T2I = Path(__file__).parents[2] / "assets" / "shapes_t2i"


def load(name: str):
    if str(BENCH) not in sys.path:  # peers.py imports the peer loop next to it
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_mode_runs_every_row_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "peers.md"
    code = load("peers").main(["--quick", "--out", str(out)])
    printed = capsys.readouterr()
    rows = {line.split("|")[1].strip(): line for line in printed.out.splitlines() if "(quick)" in line}
    guided = "diffusion B 1 x G 2, T 3, guidance 3 (quick)"
    two = "diffusion B 1 x G 2, T 3, guidance 3, two forwards (quick)"
    expected = {"VLM tiny (quick)", "diffusion B 1 x G 2, T 3 (quick)", guided, two, "rollout (quick)"}
    assert set(rows) == expected, printed.out
    cells = lambda label: [c.strip() for c in rows[label].strip().strip("|").split("|")]  # noqa: E731
    for label in (guided, two):  # both sides guided (the loop's train.cfg), and mmgrpo's two-forward variant
        assert float(cells(label)[2]) > 0 and float(cells(label)[3]) > 0, rows[label]
    dif = cells("diffusion B 1 x G 2, T 3 (quick)")
    assert dif[1] == "6" and float(dif[2]) > 0 and float(dif[3]) > 0  # N x T, both sides' s/step
    # rows through the update: mmgrpo's non-zero-advantage ones (one, forwarded for its zero gradient, when the group's
    # rewards are equal: trainer.skip_zero_advantage), as the peer filters its own
    assert dif[-2].split(", ")[0] in ("1.0", "2.0")
    assert all(0.0 < float(x) < 1.0 for x in dif[-1].split(", "))  # compute fraction of a metered step, both sides
    assert float(cells("rollout (quick)")[-1].strip("*")) > 0
    paired = cells("rollout (quick)")[-2]  # one call a side in quick mode: the interval is that ratio
    assert paired == "-" or re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d-\d+\.\d\d\)", paired), paired
    vlm = cells("VLM tiny (quick)")
    if importlib.util.find_spec("trl") is None:
        assert code == 1 and "trl is not installed" in rows["VLM tiny (quick)"]
    else:
        assert code == 0, printed.err[-3000:]
        assert float(vlm[1]) > 0 and float(vlm[2]) > 0  # mmgrpo and TRL s/step
        assert vlm[-3] == "4.0, 4.0" or all(0 < float(x) <= 4 for x in vlm[-3].split(", "))  # <= 4 new tokens
        # rows through the update: the continuous reward gives the group spread, so mmgrpo trains both, as TRL does
        assert vlm[-2] == "2.0, 2.0", vlm
        assert all(0.0 < float(x) < 1.0 for x in vlm[-1].split(", "))  # compute fraction, mmgrpo and TRL
    text = out.read_text()
    assert "python bench/peers.py --quick --out " in text and rows["rollout (quick)"] in text


def test_the_vlm_rows_reward_has_spread_and_trl_runs_without_checkpointing():
    """Equal work on the VLM rows: the continuous reward (minus zlib size over raw size) gives distinct texts distinct
    scores, so a group has spread and both sides train every row; TRL's config turns activation checkpointing off."""
    sides = load("peer_sides")
    score = sides.text_compressibility()
    # zlib level 9: 24 x "a" -> 11 bytes, "the quick brown fox" (19 bytes) -> 27 bytes
    assert score(["a" * 24, "the quick brown fox"], None, None, None) == [-11 / 24, -27 / 19]
    assert sides.vlm_reward_names({}) == ["format", "accuracy", sides.VLM_CONTINUOUS]
    assert sides.vlm_reward_names({"reward": "verifier"}) == ["format", "accuracy"]
    trl = pytest.importorskip("trl")
    field = sides.trl_checkpointing_field(trl.GRPOConfig)
    kw = {"output_dir": "x", "report_to": "none", "use_cpu": True, "bf16": False}
    assert getattr(trl.GRPOConfig(**kw), field) is True  # TRL's default, hence the switch
    assert getattr(trl.GRPOConfig(**kw, **{field: False}), field) is False


def test_compute_meter_counts_outermost_forwards_and_backward_once():
    """Nested module calls count once (the outer call's time), backward counts, and nothing outside them does."""
    import time

    import torch

    sides = load("peer_sides")

    class Slow(torch.nn.Module):
        def __init__(self, inner=None):
            super().__init__()
            self.inner, self.lin = inner, torch.nn.Linear(2, 2)

        def forward(self, x):
            time.sleep(0.05)
            return self.lin(self.inner(x) if self.inner is not None else x)

    model = Slow(Slow())  # 0.1 s per call: two nested sleeps
    with sides.ComputeMeter() as meter:
        time.sleep(0.1)  # outside any module: not compute
        model(torch.ones(1, 2, requires_grad=True)).sum().backward()
    assert 0.1 <= meter.seconds < 0.16  # the outer forward's 0.1 s (not 0.15 or 0.2) plus a tiny backward
    with sides.ComputeMeter() as meter:
        time.sleep(0.02)
    assert meter.seconds == 0.0

    class Wrapper(torch.nn.Module):  # as mmgrpo's VLM scorer: a module whose forward runs framework code
        def forward(self, x):
            time.sleep(0.1)  # the framework's own Python: not compute
            return model(x)  # the model inside it: compute

    Wrapper.__module__ = "mmgrpo.policies.fake"
    with sides.ComputeMeter() as meter:
        Wrapper()(torch.ones(1, 2))
    assert 0.1 <= meter.seconds < 0.15
    assert torch.autograd.backward.__module__ == "torch.autograd"  # restored


def test_flow_grpo_sde_step_is_mmgrpo_flow_grpo_step():
    """Their SDE step (re-implemented from flow_grpo/diffusers_patch/sd3_sde_with_logprob.py) and mmgrpo's
    ``sde.step("flow_grpo", ...)`` are the same maths: equal mean, std and log-prob, every step of a schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mmgrpo.policies import sde

    peer = load("flow_grpo_peer")
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(8)
    torch.manual_seed(0)
    x, v, prev = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    _, logp, mean, std = peer.sde_step_with_logprob(sch, v, sch.timesteps, x, 0.7, prev_sample=prev)  # row i: step i
    i = torch.arange(8)
    ours = sde.step("flow_grpo", v, x, sch.sigmas[i], sch.sigmas[i + 1], 0.7, prev_sample=prev)
    assert torch.allclose(mean, ours.mean, atol=1e-6) and torch.allclose(logp, ours.log_prob, atol=1e-5)
    dt = (sch.sigmas[i] - sch.sigmas[i + 1]).view(-1, 1, 1, 1)
    assert torch.allclose(std * dt.sqrt(), ours.std, atol=1e-7)
    # by hand at the first step (sigma = 1: the denominator uses sigmas[1]), a = 0.7
    s0, s1 = float(sch.sigmas[0]), float(sch.sigmas[1])
    std0 = 0.7 * (s0 / (1 - s1)) ** 0.5
    assert abs(float(std[0]) - std0) < 1e-5
    m0 = x[0] * (1 + std0**2 / (2 * s0) * (s1 - s0)) + v[0] * (1 + std0**2 * (1 - s0) / (2 * s0)) * (s1 - s0)
    assert torch.allclose(mean[0], m0, atol=1e-6)


def test_per_prompt_advantages_with_global_std_by_hand():
    peer = load("flow_grpo_peer")
    adv = peer.per_prompt_advantages(["a", "a", "b", "b"], np.array([[1.0], [0.0], [2.0], [2.0]]), global_std=True)
    std = np.std([1.0, 0.0, 2.0, 2.0]) + 1e-4  # sqrt(0.6875) + 1e-4, over all rewards
    assert np.allclose(adv[:, 0], [0.5 / std, -0.5 / std, 0.0, 0.0])
    own = peer.per_prompt_advantages(["a", "a", "b", "b"], np.array([[1.0], [0.0], [2.0], [2.0]]), global_std=False)
    assert np.allclose(own[:, 0], [0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0])  # the prompt's own std 0.5


@pytest.mark.parametrize("B, G, T, batches, accumulation, trained, optimizer_steps",
                         [(8, 8, 8, 8, 4, 7, 2), (2, 16, 20, 4, 2, 19, 2), (1, 2, 3, 1, 1, 2, 1)])  # fmt: skip
def test_flow_grpo_batching_follows_their_1gpu_recipe(B, G, T, batches, accumulation, trained, optimizer_steps):
    cfg = load("flow_grpo_peer").FlowGRPOConfig(num_steps=T, num_image_per_prompt=G, prompts_per_epoch=B)
    assert (cfg.num_batches_per_epoch, cfg.gradient_accumulation_steps) == (batches, accumulation)
    assert (cfg.num_train_timesteps, cfg.optimizer_steps) == (trained, optimizer_steps)


def test_flow_grpo_loop_recomputes_its_sampled_log_probs_then_trains():
    """Right after sampling, the training forward of the peer gives back the sampled log-probs (ratio 1: the
    re-implementation samples and scores the same Gaussian), and a step moves the weights."""
    peer = load("flow_grpo_peer")
    import mmgrpo.rewards.shapes  # noqa: F401  (registers the reward)
    from mmgrpo.data.prompts import read_prompts
    from mmgrpo.rewards.registry import get as get_reward

    cfg = peer.FlowGRPOConfig(num_steps=3, num_image_per_prompt=2, prompts_per_epoch=2)
    loop = peer.FlowGRPOLoop(str(SHAPES_T2I), cfg, read_prompts("shapes", "train", 0), get_reward("shapes"))
    embeds, pooled = loop.encode(["a red circle", "a red circle"])
    _, latents, logps = loop.sample(embeds, pooled)
    sample = {"latents": torch.stack(latents, 1)[:, :-1], "next_latents": torch.stack(latents, 1)[:, 1:],
              "timesteps": loop.pipe.scheduler.timesteps.repeat(2, 1), "prompt_embeds": embeds,
              "pooled_prompt_embeds": pooled}  # fmt: skip
    with torch.no_grad():
        for j in range(3):
            assert torch.allclose(loop.compute_log_prob(sample, j), logps[j], atol=1e-5)
    before = [p.detach().clone() for p in loop.params]
    info = loop.step()
    assert info["trained_rows"] in (0.0, 2.0, 4.0)  # rows of zero-advantage groups are filtered, in pairs here
    moved = any(not torch.equal(a, p) for a, p in zip(before, loop.params))
    assert moved == (info["optimizer_steps"] > 0)


def test_the_qwen2_vl_2b_shaped_row_builds_and_runs_both_sides_at_toy_width(tmp_path, monkeypatch):
    """The GPU-only row (``--device cuda``: Qwen2-VL-2B's shape, 2.2B random parameters) goes through the same
    builder and the same sides as the CPU rows; here with its vocabulary (151936 ids, of which the tiny tokenizer
    decodes 401) and tied head, at toy width, so the path runs on CPU: both sides train a step on it."""
    peers, sides = load("peers"), load("peer_sides")
    label = "VLM Qwen2-VL-2B shape (random weights), 448x448, B 2 x G 8, 32 tokens"
    assert label in [p.label for p in peers.points(False, ["vlm"], "cuda")]
    assert label not in [p.label for p in peers.points(False, ["vlm"], "cpu")]
    full = peers.VLM_SHAPES[1536]
    toy = {**full, "mrope": [4, 2, 2],
           "text": {**full["text"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4},
           "vision": {**full["vision"], "hidden_size": 64, "depth": 1, "embed_dim": 32, "num_heads": 2}}  # fmt: skip
    monkeypatch.setitem(peers.VLM_SHAPES, 1536, toy)
    folder = peers.vlm_model_dirs(tmp_path, False, {1536}, "cpu")[1536]
    cfg = peers.vlm_config(1536)
    assert cfg.text_config.vocab_size == 151936 and cfg.tie_word_embeddings and cfg.image_token_id == 395
    job = {"family": "vlm", "sizes": {"hidden": 1536, "image": 56, "B": 1, "G": 2, "tokens": 4}, "model": folder,
           "overrides": [], "warmup": 0, "steps": 1, "repeats": 1}  # fmt: skip
    for side in ["mmgrpo"] + (["trl"] if importlib.util.find_spec("trl") else []):
        res = sides.run_job({**job, "side": side})
        assert len(res["s_per_step"]) == 1 and res["s_per_step"][0] > 0 and res["rows"] == 2, (side, res)
        assert 0 < res["tokens_mean"] <= 4, (side, res)


def test_the_sd3_medium_shaped_row_builds_and_runs_both_sides_at_toy_width(tmp_path, monkeypatch):
    """The GPU-only diffusion row (SD3-medium's transformer, 2.0B random parameters, its VAE and CLIP widths, zero T5
    tokens) goes through the same builder and sides as the CPU rows; here at toy width, so the path runs on CPU: the
    folder loads in diffusers' pipeline, and both sides train a step on it with the same text tokens."""
    from diffusers import StableDiffusion3Pipeline

    peers, sides = load("peers"), load("peer_sides")
    (point,) = [p for p in peers.points(False, ["diffusion"], "cuda") if "SD3-medium" in p.label]
    assert not [p for p in peers.points(False, ["diffusion"], "cpu") if "SD3-medium" in p.label]
    full = peers.DIFFUSION_SHAPES["sd3-medium"]
    assert full["transformer"]["pooled_projection_dim"] == sum(c["projection_dim"] for c in full["clip"])
    clip = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "projection_dim": 8}
    toy = {"transformer": {**full["transformer"], "sample_size": 8, "num_layers": 1, "attention_head_dim": 8,
                           "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
                           "pooled_projection_dim": 16, "pos_embed_max_size": 8},
           "clip": [clip, clip],
           "vae": {**full["vae"], "block_out_channels": [8] * 4, "layers_per_block": 1,
                   "norm_num_groups": 4}}  # fmt: skip
    monkeypatch.setitem(peers.DIFFUSION_SHAPES, "sd3-medium", toy)
    folder = peers.diffusion_model_dirs(tmp_path, {"sd3-medium"}, "cpu")["sd3-medium"]
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.vae.config.latent_channels == 16 and pipe.default_sample_size * pipe.vae_scale_factor == 64
    sizes = {**point.sizes, "G": 2, "T": 3}
    job = {"family": "diffusion", "sizes": sizes, "model": folder, "overrides": [], "warmup": 0, "steps": 1,
           "repeats": 1}  # fmt: skip
    for side in ("mmgrpo", "flow_grpo"):
        res = sides.run_job({**job, "side": side})
        assert len(res["s_per_step"]) == 1 and res["s_per_step"][0] > 0 and res["rows"] == 2, (side, res)
        assert res["trained_rows"] == 2.0, (side, res)
    # equal work: the same text tokens (CLIP's 16 + 128 zero T5 tokens) and latents on both sides
    from mmgrpo.policies.models.sd3 import SD3Adapter

    adapter = SD3Adapter.from_pretrained(folder, max_sequence_length=sizes["t5_tokens"])
    loop = sides.diffusion_flow_grpo(sizes, "cpu", folder)[0].__self__
    embeds, pooled = loop.encode(["a red circle"])
    mine = adapter.encode(["a red circle"])
    assert embeds.shape == (1, 16 + 128, 32) and pooled.shape == (1, 16)
    torch.testing.assert_close(mine["prompt_embeds"], embeds)
    torch.testing.assert_close(mine["pooled"], pooled)
    assert adapter.latent_shape() == (16, 8, 8) == (16, loop.height // 8, loop.width // 8)


def test_the_results_file_is_rewritten_after_every_job(tmp_path, monkeypatch):
    """A run stopped part way (gpu_check's time limit, a killed session) keeps the jobs it finished: the file is
    replaced whole after each job, marked PARTIAL until the end. The workers are replaced by canned results here:
    what is under test is the orchestrator's writing."""
    peers = load("peers")
    out = tmp_path / "peers.md"
    seen = []

    def fake_run_jobs(jobs, args, tmp):
        seen.append(out.read_text() if out.exists() else None)
        (job,) = jobs
        return [{"family": job["family"], "side": job["side"], "sizes": job["sizes"], "label": job["label"],
                 "overrides": job["overrides"], "s_per_step": [0.5 if job["side"] == "mmgrpo" else 1.0],
                 "rows": 8, "trained_rows": 8.0, "compute_fraction": 0.9, "peak_mib": 100.0}]  # fmt: skip

    monkeypatch.setattr(peers, "run_jobs", fake_run_jobs)
    code = peers.main(["--only", "diffusion", "--match", "B 2 x G 4, T 5", "--repeats", "1", "--out", str(out)])
    assert code == 0
    assert seen[0] is None and "PARTIAL: 1 jobs done so far" in seen[1], seen  # written after the first job
    assert "| diffusion B 2 x G 4, T 5 | 40 | error: no measurement" in seen[1]  # the peer side not yet measured
    final = out.read_text()
    assert "PARTIAL" not in final and "| diffusion B 2 x G 4, T 5 | 40 | 0.500 | 1.000 | **0.50** |" in final
    assert not (tmp_path / "peers.md.tmp").exists()


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--steps", "0"], ["--threads", "0"], ["--warmup", "-1"],
                                 ["--device", "tpu"]])  # fmt: skip
def test_bad_arguments_stop_with_one_line_and_exit_2_before_any_work(bad, tmp_path, capsys):
    """A zero count used to become the default through `or` and start the full benchmark."""
    out = tmp_path / "peers.md"
    with pytest.raises(SystemExit) as stop:
        load("peers").main([*bad, "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bench/peers.py: error: argument --device") or "must be >= " in err[-1], err
    assert not out.exists()
