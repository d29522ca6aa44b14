"""What a person looks at: sample grids, reward curves and ``report.html`` in the run directory."""

from __future__ import annotations

import html
import json
import math
import numbers
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mmgrpo.core.errors import UserError
from mmgrpo.core.files import write_atomic
from mmgrpo.train.media import (
    IMAGES,
    VIDEOS,
    checked_images,
)


def metric_value(key: str, value: object) -> float | str | None:
    """A metric as ``metrics.jsonl`` holds it: a real number (numpy's and 1-element tensors too) as a float, a
    non-finite one as null (strict JSON has no NaN; a reward that applies to no row of a step is NaN), a str as is.
    Anything else (a plug-in's evaluation returning a list, say) is written as its text with a warning: the run goes
    on (stopping would lose the steps since the last checkpoint)."""
    if value is None or isinstance(value, str):
        return value
    if (isinstance(value, torch.Tensor) and value.numel() == 1) or (isinstance(value, np.ndarray) and value.size == 1):
        value = value.item()
    if isinstance(value, numbers.Real):
        v = float(value)
        return v if math.isfinite(v) else None
    warnings.warn(f"metric {key!r} is a {type(value).__name__}, not a number: metrics.jsonl records its text",
                  stacklevel=3)  # fmt: skip
    return str(value)[:200]


def metrics_line(step: int, metrics: dict) -> str:
    """One ``metrics.jsonl`` line: strict JSON (no NaN / Infinity tokens)."""
    line = {"step": step, **{k: metric_value(k, v) for k, v in metrics.items()}}
    return json.dumps(line, allow_nan=False)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a torn line (a crash mid-write, before a resume trims it) is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def eval_summary(metrics: list[dict], shown: int = 5, most: int = 8) -> list[str]:
    """What ``mmgrpo train`` prints at the end of a run: a line per evaluation metric of ``metrics`` (the records
    of ``metrics.jsonl``), its value at each evaluation with the step, ``eval/shapes: 0.372 (step 0) -> 0.534 (step
    40) -> 0.598 (step 120)``; more than ``shown`` evaluations as the first and the last with ``...`` between, at
    most ``most`` metrics (then a line naming report.html for the rest). Empty without evaluations."""
    series: dict[str, list[tuple[int, object]]] = {}
    for record in metrics:
        for key, value in record.items():
            if key.startswith("eval/") and (value is None or isinstance(value, int | float)):
                series.setdefault(key, []).append((int(record.get("step", 0)), value))

    def point(step: int, value: object) -> str:
        return f"{'nan' if value is None else f'{value:.3f}'} (step {step})"

    lines = []
    for key, points in list(series.items())[:most]:
        parts = [point(*p) for p in points]
        if len(parts) > shown:
            parts = [parts[0], "...", parts[-1]]
        lines.append(f"{key}: {' -> '.join(parts)}")
    if len(series) > most:
        lines.append(f"({len(series) - most} more evaluation metrics in report.html)")
    return lines


def _num(v: object) -> float:
    """A metric for a plot: NaN where it is null (not finite) or not a number."""
    return float(v) if isinstance(v, (int, float)) else math.nan


BA_PAD = 8  # margin around the picture and between pairs (pixels)
BA_GAP = 4  # gap between the before and after image of one pair
BA_BACKGROUND = (225, 225, 225)


FIRST_EVAL = "first_eval.safetensors"
"""under ``samples/``: the run's first evaluation (images, captions, metrics), the "before" of ``before_after.png``,
kept on disk so that a resumed run still compares against it"""


def save_first_eval(folder: str | Path, step: int, images: torch.Tensor, captions: list, metrics: dict) -> Path:
    """Keep the first evaluation (images [n, 3, H, W]) in ``folder/first_eval.safetensors``, written atomically."""
    from safetensors.torch import save

    info = {"step": step, "captions": [str(c) for c in captions],
            "metrics": {k: metric_value(k, v) for k, v in metrics.items()}}  # fmt: skip
    path = Path(folder) / FIRST_EVAL
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({"images": images.detach().float().cpu().contiguous()}, metadata={"info": json.dumps(info)})
    write_atomic(path, data)
    return path


def load_first_eval(folder: str | Path) -> tuple[int, torch.Tensor, list[str], dict] | None:
    """(step, images, captions, metrics) saved by :func:`save_first_eval`, or None (none kept, or unreadable)."""
    from safetensors import safe_open

    path = Path(folder) / FIRST_EVAL
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
            return int(info["step"]), f.get_tensor("images"), list(info["captions"]), dict(info["metrics"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path} is unreadable ({e}); before_after.png starts from this evaluation", stacklevel=2)
        return None


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels (words too long for a line are cut)."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            while draw.textlength(word, font=font) > width and len(word) > 1:  # hard-break an overlong word
                cut = len(word) - 1
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            trial = f"{line} {word}" if line else word
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _metric_changes(before: dict[str, float], after: dict[str, float]) -> str:
    """``name before -> after`` for every numeric metric in both dicts (the before/after picture's header)."""

    def num(v) -> float | None:
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    shared = [k for k in before if k in after and num(before[k]) is not None and num(after[k]) is not None]
    return ",  ".join(f"{k} {num(before[k]):.3g} -> {num(after[k]):.3g}" for k in shared)


def before_after(
    before: torch.Tensor,
    after: torch.Tensor,
    captions: list[str] | None,
    path: str | Path,
    before_label: str = "before",
    after_label: str = "after",
    before_metrics: dict[str, float] | None = None,
    after_metrics: dict[str, float] | None = None,
    ncol: int | None = None,
    caption_lines: int = 3,
) -> Path:
    """Save a PNG comparing evaluation images row by row: for pair i its caption, then ``before[i]`` and
    ``after[i]`` side by side, pairs laid out in ``ncol`` columns (default up to 4).

    ``before``/``after``: [n, 3, H, W] in [0, 1] (videos [n, F, 3, H, W] show their first frame; images that are
    not floats, not finite, or empty are a ValueError, :func:`checked_images`). ``captions``: one per pair, or
    none (a list of another length is a ValueError, as a shape mismatch is: captions would sit over the wrong
    pairs). Images are enlarged with NEAREST by ``max(1, 128 // W)`` (as in :func:`save_samples`). A header names
    the columns (``before_label`` left, ``after_label`` right) and, for metrics in both dicts,
    ``name before -> after``. Layout: width ``ncol * (2 * S_w + BA_GAP) + (ncol + 1) * BA_PAD`` with
    ``S_w = W * scale``; each row of pairs is a caption band (absent when there are no captions) above the images.
    """
    before = checked_images(before, "before_after: before", {4: IMAGES, 5: VIDEOS})
    after = checked_images(after, "before_after: after", {4: IMAGES, 5: VIDEOS})
    if before.dim() == 5:
        before = before[:, 0]
    if after.dim() == 5:
        after = after[:, 0]
    if before.shape != after.shape:
        raise ValueError(f"before {tuple(before.shape)} and after {tuple(after.shape)} must have the same shape")
    n, _, H, W = before.shape
    captions = list(captions or [])
    if captions and len(captions) != n:
        raise ValueError(f"{len(captions)} caption(s) for {n} before/after pairs {tuple(before.shape)}; give one "
                         "caption per pair, or none ([] or None)")  # fmt: skip
    scale = max(1, 128 // W)
    sh, sw = H * scale, W * scale
    ncol = max(1, min(ncol or 4, n))
    nrow = math.ceil(n / ncol)
    pair_w = 2 * sw + BA_GAP
    width = ncol * pair_w + (ncol + 1) * BA_PAD

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font.getbbox("Ag|")[3] + 3

    header = _wrap(measure, f"left: {before_label}   |   right: {after_label}", font, width - 2 * BA_PAD)

    text = _metric_changes(before_metrics or {}, after_metrics or {})
    if text:
        header += _wrap(measure, text, font, width - 2 * BA_PAD)
    header_h = BA_PAD + len(header) * line_h

    wrapped = [_wrap(measure, c, font, pair_w, caption_lines) if c else [] for c in captions]
    cap_h = max((len(w) for w in wrapped), default=0) * line_h
    cell_h = cap_h + sh
    height = header_h + nrow * cell_h + (nrow + 1) * BA_PAD

    canvas = Image.new("RGB", (width, height), BA_BACKGROUND)  # grey: white-background images stand out
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(header):
        draw.text((BA_PAD, BA_PAD + j * line_h), line, fill="black", font=font)

    def to_pil(img: torch.Tensor) -> Image.Image:
        arr = (img.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(arr).resize((sw, sh), Image.NEAREST)

    for i in range(n):
        r, c = divmod(i, ncol)
        x = BA_PAD + c * (pair_w + BA_PAD)
        y = header_h + BA_PAD + r * (cell_h + BA_PAD)
        for j, line in enumerate(wrapped[i] if i < len(wrapped) else []):
            draw.text((x, y + j * line_h), line, fill="black", font=font)
        canvas.paste(to_pil(before[i]), (x, y + cap_h))
        canvas.paste(to_pil(after[i]), (x + sw + BA_GAP, y + cap_h))
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def reward_curve(metrics: list[dict], path: str | Path, keys: list[str] | None = None) -> Path | None:
    """Plot training reward (and eval metrics) against step to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if isinstance(m.get("reward/mean"), (int, float))]
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
        pts = [(m["step"], _num(m[k])) for m in evals if k in m]
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


TRAINING_CURVES = (
    "loss/policy", "loss/kl", "loss/clip_frac", "grad_norm", "completion/length_mean", "completion/entropy"
)  # fmt: skip
"""per-step metrics ``report.html`` plots beside the reward (those a run logged), one panel each"""
PANEL_EXTRAS = {"loss/clip_frac": ("loss/clip_frac_low", "loss/clip_frac_high", "loss/clip_frac_dual")}
"""further curves drawn in a panel of :data:`TRAINING_CURVES` when logged (the clip fraction's sides)"""


CORE_FAMILIES = ("loss", "reward", "eval", "time", "adv", "update", "completion", "skipped", "dynamic", "extra",
                 "policy", "grad_norm", "lr", "step")  # fmt: skip
"""metric families of the trainer itself; any other ``family/name`` a run logs is a method's (pearl/gate_mean,
tempsamp/anchor_adv, rewrite/groups, curriculum/tau...), which :func:`method_curves` plots"""
METHOD_PANELS = 8
"""the most method metrics ``report.html`` plots (the first logged)"""


def method_curves(metrics: list[dict], path: str | Path) -> Path | None:
    """Small multiples of the methods' per-step metrics (those outside :data:`CORE_FAMILIES`, at most
    :data:`METHOD_PANELS`) to a PNG (None when a run logged none): a method's switch shows in its own metrics, which
    report.html did not plot (PEARL's gate, TempSamp's anchor, Scaf-GRPO's re-rolls were only in metrics.jsonl)."""
    keys: list[str] = []
    for m in metrics:
        for k, v in m.items():
            if "/" in k and k.split("/", 1)[0] not in CORE_FAMILIES and k not in keys and isinstance(v, (int, float)):
                keys.append(k)
    return training_curves(metrics, path, keys[:METHOD_PANELS]) if keys else None


def training_curves(metrics: list[dict], path: str | Path, curves: tuple | list = TRAINING_CURVES) -> Path | None:
    """Small multiples of ``curves`` (default :data:`TRAINING_CURVES`) against step to a PNG (None when none was
    logged)."""
    keys = [k for k in curves if any(k in m for m in metrics)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), dpi=100, squeeze=False)
    for ax, k in zip(axes[0], keys):
        extras = [e for e in PANEL_EXTRAS.get(k, ()) if any(e in m for m in metrics)]
        for curve in (k, *extras):
            pts = [(m["step"], m[curve]) for m in metrics if isinstance(m.get(curve), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=curve.rsplit("_", 1)[-1] if curve != k else "all")
        if extras:
            ax.legend(fontsize=7)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


COMPLETIONS_SHOWN = 8
"""examples of the completions table in report.html (the JSONL files hold every one)"""
MEDIA = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4")


def _read_records(path: Path) -> list[dict]:
    """The records of a completions file; a line that is not a JSON object (a torn write) is skipped."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _cell(value: object, limit: int = 600) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, float):
        text = f"{value:.4g}"
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"<td>{html.escape(text)}</td>"


def completions_html(files: list[Path], limit: int = COMPLETIONS_SHOWN) -> str:
    """The VLM recipes' completions (``samples/completions_step_*.jsonl``) as a table a person reads: the first
    ``limit`` held-out examples, each with its prompt, its other fields (ground truth, score) and completion at the
    first evaluation and, when there is a later one, at the latest; then links to every file."""
    files = sorted(files)
    if not files:
        return ""
    first, last = files[0], files[-1]
    steps = [first] if first == last else [first, last]
    records = [_read_records(f)[:limit] for f in steps]
    label = [f.stem.removeprefix("completions_") for f in steps]  # step_000000
    keys = [k for k in dict.fromkeys(k for r in records[-1] for k in r) if k not in ("prompt", "completion")]
    n = max(len(r) for r in records)
    rec = [[r[i] if i < len(r) else {} for r in records] for i in range(n)]  # [example][evaluation]
    # the ground truth is the same at every evaluation: one column; a score changes: one column per evaluation
    fixed = [k for k in keys if all(len({json.dumps(x.get(k)) for x in row}) == 1 for row in rec)]
    moving = [k for k in keys if k not in fixed]
    head = "<th>prompt</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in fixed)
    for lab in label:
        head += f"<th>completion, {lab}</th>" + "".join(f"<th>{html.escape(k)}, {lab}</th>" for k in moving)
    rows = []
    for row in rec:
        cells = _cell(row[-1].get("prompt", row[0].get("prompt", "")))
        cells += "".join(_cell(row[-1][k]) if k in row[-1] else "<td></td>" for k in fixed)
        for r in row:
            cells += _cell(r.get("completion", ""))
            cells += "".join(_cell(r[k]) if k in r else "<td></td>" for k in moving)
        rows.append(f"<tr>{cells}</tr>")
    links = ", ".join(f'<a href="samples/{html.escape(f.name)}">{html.escape(f.stem)}</a>' for f in files)
    return (f"<h2>Completions</h2><p>The first {limit} held-out examples at the first and the latest evaluation. "
            f"Every example: {links} (JSON lines).</p>"
            f'<table class="c"><tr>{head}</tr>{"".join(rows)}</table>')  # fmt: skip


def _eval_cell(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "" if v is None else html.escape(str(v))
    return f"{v:.4f}"


RUN_FILES = (".mmgrpo-run", "config.yaml", "metrics.jsonl", "samples")
"""what a run directory holds (one of them at least) for :func:`write_report` to write its report.html"""


REPORT_EVERY_S = 30.0
"""a run rewrites report.html at an evaluation when this many seconds passed since it last did (and always at its end,
when stopped by a signal, and when it crashes): drawing the figures costs 0.3-0.8 s, evaluations of a short run come
seconds apart, and metrics.jsonl has every line the moment it is logged"""


def write_report(run_dir: str | Path, title: str | None = None) -> Path:
    """``report.html``: the before/after comparison (if any), the reward curve, the loss / KL / clip fraction (and
    its sides) / grad-norm / completion length and entropy curves, a table of evaluations, and every sample grid in
    order (a run rewrites it at evaluations, at most every :data:`REPORT_EVERY_S` seconds, and at its end). A
    folder that is no run directory is a UserError (a missing one was a raw FileNotFoundError; a report of nothing
    in an unrelated folder helps no one)."""
    run_dir = Path(run_dir)
    what = "" if run_dir.is_dir() else "is a file, not a folder" if run_dir.exists() else "does not exist"
    if not what and not any((run_dir / name).exists() for name in RUN_FILES):
        what = f"holds none of {', '.join(RUN_FILES)}"
    if what:
        raise UserError(f"'{run_dir}' is not a run directory: it {what}; give a folder written by mmgrpo train "
                        "(runs/<name>, holding config.yaml, metrics.jsonl and samples/)")  # fmt: skip
    metrics = read_metrics(run_dir / "metrics.jsonl")
    curve = reward_curve(metrics, run_dir / "reward_curve.png")
    training = training_curves(metrics, run_dir / "training_curves.png")
    methods = method_curves(metrics, run_dir / "method_curves.png")
    evals = [m for m in metrics if any(k.startswith("eval/") for k in m)]
    eval_keys = sorted({k for m in evals for k in m if k.startswith("eval/")})
    rows = "".join(
        "<tr><td>{}</td>{}</tr>".format(m["step"], "".join(f"<td>{_eval_cell(m.get(k))}</td>" for k in eval_keys))
        for m in evals
    )
    table = (
        f"<table><tr><th>step</th>{''.join(f'<th>{html.escape(k)}</th>' for k in eval_keys)}</tr>{rows}</table>"
        if evals
        else "<p>No evaluations were run.</p>"
    )
    files = sorted((run_dir / "samples").glob("*")) if (run_dir / "samples").is_dir() else []
    completions = completions_html([f for f in files if f.name.startswith("completions_") and f.suffix == ".jsonl"])
    samples = [f for f in files if f.suffix.lower() in MEDIA]  # not the completions files (they were <img>s)
    compare = ""
    if any(s.name == "before_after.png" for s in samples):
        compare = (
            "<h2>Before / after</h2><p>First evaluation (left of each pair) against the latest (right), "
            'same prompts and seeds.</p><img class="ba" src="samples/before_after.png">'
        )
        samples = [s for s in samples if s.name != "before_after.png"]
    figs = []
    for s in samples:
        rel = html.escape(f"samples/{s.name}")
        tag = f'<video src="{rel}" controls loop></video>' if s.suffix == ".mp4" else f'<img src="{rel}">'
        figs.append(f"<figure>{tag}<figcaption>{html.escape(s.stem)}</figcaption></figure>")
    none = "<p>No images: see Completions.</p>" if completions else "<p>No samples saved.</p>"
    last = metrics[-1] if metrics else {}
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title or run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} figure{{display:inline-block;margin:8px}}
table.c td{{text-align:left;white-space:pre-wrap;vertical-align:top;font-size:90%}}
img,video{{image-rendering:pixelated;max-width:520px}} img.ba{{max-width:100%}}</style></head><body>
<h1>{html.escape(title or run_dir.name)}</h1>
<p>{len([m for m in metrics if "reward/mean" in m])} training steps logged; last step {last.get("step", 0)}.</p>
{compare}
<h2>Reward</h2>{'<img src="reward_curve.png">' if curve else "<p>No metrics yet.</p>"}
{'<h2>Training</h2><img src="training_curves.png">' if training else ""}
{'<h2>Methods</h2><img src="method_curves.png">' if methods else ""}
<h2>Held-out evaluation</h2>{table}
{completions}
<h2>Samples</h2>{"".join(figs) or none}
</body></html>"""
    out = run_dir / "report.html"
    out.write_text(body)
    return out
