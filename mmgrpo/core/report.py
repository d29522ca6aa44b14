"""What a person looks at: sample grids, reward curves and ``report.html`` in the run directory."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def image_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """[n, 3, H, W] in [0, 1] -> one PIL image (rows of ``ncol``); ``scale`` enlarges tiny images."""
    imgs = images.detach().float().clamp(0, 1).cpu()
    n, _, H, W = imgs.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = torch.ones(3, nrow * (H + pad) + pad, ncol * (W + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        canvas[:, y : y + H, x : x + W] = imgs[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_samples(images: torch.Tensor, path: str | Path, ncol: int | None = None) -> Path:
    """Save a grid PNG for images [n, 3, H, W], or an mp4 (frames side by side) for videos [n, F, 3, H, W]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 128 // images.shape[-1])
    if images.dim() == 5:
        frames = [np.asarray(image_grid(images[:, f], ncol, scale=scale)) for f in range(images.shape[1])]
        mp4 = path.with_suffix(".mp4")
        try:
            import imageio.v2 as imageio

            imageio.mimwrite(mp4, frames, fps=8, macro_block_size=1)
            return mp4
        except ImportError:
            pass  # the 'video' extra is not installed: fall back to the first frame
        Image.fromarray(frames[0]).save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    image_grid(images, ncol, scale=scale).save(path.with_suffix(".png"))
    return path.with_suffix(".png")


def reward_curve(metrics: list[dict], path: str | Path, keys: list[str] | None = None) -> Path | None:
    """Plot training reward (and eval metrics) against step to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "reward/mean" in m]
    evals = [m for m in metrics if any(k.startswith("eval/") for k in m)]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps = [m["step"] for m in train]
        ax.plot(steps, [m["reward/mean"] for m in train], alpha=0.35, label="train reward (per step)")
        w = max(1, len(train) // 20)
        smooth = np.convolve([m["reward/mean"] for m in train], np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, label=f"train reward ({w}-step mean)")
    eval_keys = keys or sorted({k for m in evals for k in m if k.startswith("eval/")})
    for k in eval_keys:
        pts = [(m["step"], m[k]) for m in evals if k in m]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, title: str | None = None) -> Path:
    """``report.html``: the reward curve, a table of evaluations, and every sample grid in order."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    curve = reward_curve(metrics, run_dir / "reward_curve.png")
    evals = [m for m in metrics if any(k.startswith("eval/") for k in m)]
    eval_keys = sorted({k for m in evals for k in m if k.startswith("eval/")})
    rows = "".join(
        "<tr><td>{}</td>{}</tr>".format(
            m["step"], "".join(f"<td>{m[k]:.4f}</td>" if k in m else "<td></td>" for k in eval_keys)
        )
        for m in evals
    )
    table = (
        f"<table><tr><th>step</th>{''.join(f'<th>{html.escape(k)}</th>' for k in eval_keys)}</tr>{rows}</table>"
        if evals
        else "<p>No evaluations were run.</p>"
    )
    samples = sorted((run_dir / "samples").glob("*")) if (run_dir / "samples").is_dir() else []
    figs = []
    for s in samples:
        rel = html.escape(f"samples/{s.name}")
        tag = f'<video src="{rel}" controls loop></video>' if s.suffix == ".mp4" else f'<img src="{rel}">'
        figs.append(f"<figure>{tag}<figcaption>{html.escape(s.stem)}</figcaption></figure>")
    last = metrics[-1] if metrics else {}
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title or run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} figure{{display:inline-block;margin:8px}}
img,video{{image-rendering:pixelated;max-width:520px}}</style></head><body>
<h1>{html.escape(title or run_dir.name)}</h1>
<p>{len([m for m in metrics if "reward/mean" in m])} training steps logged; last step {last.get("step", 0)}.</p>
<h2>Reward</h2>{'<img src="reward_curve.png">' if curve else "<p>No metrics yet.</p>"}
<h2>Held-out evaluation</h2>{table}
<h2>Samples</h2>{"".join(figs) or "<p>No samples saved.</p>"}
</body></html>"""
    out = run_dir / "report.html"
    out.write_text(body)
    return out
