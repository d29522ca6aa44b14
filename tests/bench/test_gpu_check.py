"""bench/gpu_check.py in its CI mode (``--device cpu --tiny``): it finishes, writes gpu.md and gpu.json, has a row
per tiny family and precision (fp32, bf16 weights, bf16 autocast), no section errored, and every row keeps
ratio = 1 within its tolerance."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
DIFFUSION = ["sd3", "flux", "sd15", "sdxl", "wan", "hunyuan_video"]
VLM = ["qwen2_vl", "qwen2_5_vl"]


def test_gpu_check_cpu_tiny(tmp_path):
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    proc = subprocess.run([*cmd, "--time-limit", "240"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "gpu.md").read_text()
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["finished"] and "--device cpu --tiny" in data["command"] and "# GPU check" in md
    sections = {s["name"]: s for s in data["sections"]}
    for sec in sections.values():
        assert not sec["status"].startswith("error"), (sec["name"], sec["status"], sec["error"], sec["rows"])
        assert not sec["status"].startswith("skipped: time"), sec["name"]
    for name, families in [("2. Tiny diffusion families", DIFFUSION), ("3. Tiny VLM families", VLM)]:
        rows = {r["what"]: r for r in sections[name]["rows"]}
        for fam in families:
            for variant, ratio_tol, pipe_tol in (("fp32", 1e-4, 1e-4), ("bf16", 2e-2, 5e-2), ("amp_bf16", 2e-2, None)):
                row = rows[f"{fam} {variant}"]  # the bf16 paths run on CPU too
                assert row["result"] == "ok", row
                nums = row["numbers"]
                assert nums["ratio_err_micro1"] <= ratio_tol and nums["ratio_err_microG"] <= ratio_tol, row
                assert nums["loss_finite"] and nums["frozen_moved"] == 0, row
                if name.startswith("2.") and pipe_tol is not None:
                    assert nums["pipeline_max_abs_diff"] <= pipe_tol, row
                assert f"| {fam} {variant} | ok |" in md
        assert not any(w.endswith(" xformers") for w in rows), rows  # xformers rows only on CUDA
    demos = {r["what"]: r for r in sections["4. README demo config"]["rows"]}
    assert set(demos) == {"demo fp32", "demo bf16"}, demos
    for demo in demos.values():
        assert demo["result"] == "ok" and demo["numbers"]["steps"] == 1, demo
    for name in ("5. Realistic sizes (random init)", "6. FSDP2 sharded training", "7. DeepSpeed ZeRO-2 / ZeRO-3",
                 "9. The peers on this GPU (bench/peers.py)"):  # fmt: skip
        assert sections[name]["status"] == "skipped: --tiny"
    assert sections["8. pytest -m gpu tests/gpu"]["status"] == "skipped: needs CUDA"


def load_gpu_large():
    """bench/gpu_large.py (sections 5, 6 and 7), imported as the script imports it: bench/ on sys.path."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("gpu_large")


def test_realistic_size_code_runs_at_toy_size():
    """Section 5 runs only on a GPU; its code runs here on toy shapes so it cannot rot."""
    from mmgrpo.testing.tiny_vlm import tiny_qwen2_vl

    g = load_gpu_large()
    report = importlib.import_module("gpu_common").Report(None, "test", time_limit=300)
    sec = report.section("realistic")
    small = dict(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16)
    shape = {
        **g.SD3_MEDIUM,
        **small,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 8,
        "pos_embed_max_size": 8,
    }
    g.realistic_sd3(report, sec, "cpu", shape=shape, text_len=4, batches=(1, 2), sample_batches=(2,))
    cfg = tiny_qwen2_vl()[0].config
    g.realistic_qwen2_vl(report, sec, "cpu", cfg=cfg, rows=2, grid=4, text=3, comp=5)
    results = {r["what"]: r["result"] for r in sec["rows"]}
    assert len(results) == 1 + 4 + 1 + 1 + 2, results  # build, 2 x 2 fwd+bwd, forward, build, 2 fwd+bwd
    assert set(results.values()) == {"ok"}, results
    assert g.qwen2_vl_2b_config().vision_config.depth == 32


def test_compare_states_by_hand():
    """Sections 6 and 7 judge a sharded run by compare_states: max |diff| per comparison, failures named."""
    import torch

    g = load_gpu_large()
    full = {"w": torch.tensor([1.0, 2.0])}
    states = {"full": full, "part": {"w": torch.tensor([1.0, 2.0])}, "one": {"w": torch.tensor([1.0, 2.5])}}
    numbers, bad = {}, []
    g.compare_states(states, "one", numbers, bad)
    assert numbers == {"max_abs_diff_resumed": 0.0, "max_abs_diff_unsharded": 0.5}
    assert bad == ["unsharded differs by 0.5 > 0.0001"]
    numbers, bad = {}, []
    g.compare_states({**states, "one": {"v": torch.zeros(2)}}, "one", numbers, bad)
    assert bad == ["unsharded: other tensors (['v', 'w'])"] and "max_abs_diff_unsharded" not in numbers


def test_peers_section_runs_bench_peers_and_embeds_its_tables(tmp_path):
    """Section 9 runs only on a GPU (bench/peers.py --device cuda on a few rows); its code runs here on the CPU
    with bench/peers.py's --quick rows: the subprocess, the file next to gpu.md, its tables in the section."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    gpu_check = importlib.import_module("gpu_check")
    report = importlib.import_module("gpu_common").Report(tmp_path, "test", time_limit=600)
    sec = report.section("9. peers")
    gpu_check.section_peers(report, sec, "cpu", quick=True)
    (row,) = sec["rows"]
    trl = importlib.util.find_spec("trl") is not None
    assert row["result"] == ("ok" if trl else "FAILED (rc 1)"), row
    written = (tmp_path / "peers_gpu.md").read_text()
    assert "bench/peers.py --device cpu --repeats 1 --quick --out" in written
    for table in ("## Diffusion Flow-GRPO step", "## Rollout", "| diffusion B 1 x G 2, T 3 (quick) | 6 |"):
        assert table in sec["text"] and table in (tmp_path / "gpu.md").read_text(), table
    assert "peak RSS MiB" in sec["text"] and "# mmgrpo vs its peers" not in sec["text"]
    peers = importlib.import_module("peers")
    points = peers.points(False, ["vlm", "diffusion", "rollout"], "cuda")
    picked = [p.label for p in points if any(peers.matches(m, p.label) for m in gpu_check.PEER_ROWS)]
    for match in gpu_check.PEER_ROWS:  # each --match picks rows that exist
        assert any(peers.matches(match, label) for label in picked), match
    # one row each: 5 rows of two sides and the rollout's one process, as the docstring counts
    assert len(picked) == len(gpu_check.PEER_ROWS), picked
    assert peers.matches("=a b", "a b") and not peers.matches("=a b", "a b, c") and peers.matches("b", "a b, c")


def test_peers_section_stopped_at_its_time_limit_kills_its_worker_and_says_so(tmp_path, monkeypatch):
    """At the time limit section 9 kills bench/peers.py and the worker process it started (which would hold the
    GPU), and records the stop; the report goes on."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    gpu_check = importlib.import_module("gpu_check")
    monkeypatch.setattr(gpu_check, "PEERS_MIN_S", 8.0)  # the --quick run needs ~25 s: stopped inside its worker
    report = importlib.import_module("gpu_common").Report(tmp_path, "test", time_limit=0)
    sec = report.section("9. peers")
    gpu_check.section_peers(report, sec, "cpu", quick=True)
    (row,) = sec["rows"]
    assert row["result"].startswith("ERROR: stopped at the time limit (8 s)"), row
    assert sec["had_error"]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps and "peers_gpu.md" not in ps, ps  # neither peers.py nor its worker is left
