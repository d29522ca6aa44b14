"""The before/after comparison picture and its place in report.html; the evaluation's completion records."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.train.components import completion_records
from mmgrpo.train.media import save_completions
from mmgrpo.train.report import BA_GAP, BA_PAD, before_after, write_report

RED, BLUE = (255, 0, 0), (0, 0, 255)


def solid(n, rgb, size=32):
    return torch.tensor(rgb, dtype=torch.float32).div(255).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def draw(tmp_path, n=1, size=32, captions=None, name="ba", **kw):
    path = before_after(solid(n, RED, size), solid(n, BLUE, size), captions, tmp_path / f"{name}.png", **kw)
    return np.asarray(Image.open(path).convert("RGB"))


def box(arr, rgb):
    """(y0, y1, x0, x1, count) of the pixels of exactly colour ``rgb``."""
    ys, xs = np.nonzero((arr == rgb).all(-1))
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1, len(ys)


def dark(arr):
    return arr.max(-1) < 100


def test_size_follows_pairs_columns_and_scale(tmp_path):
    for n, size, ncol in [(1, 32, None), (5, 32, None), (5, 32, 2), (3, 64, None), (2, 128, None)]:
        arr = draw(tmp_path, n=n, size=size, ncol=ncol)
        scale = max(1, 128 // size)
        cols = min(ncol or 4, n)
        rows = -(-n // cols)
        s = size * scale
        assert arr.shape[1] == cols * (2 * s + BA_GAP) + (cols + 1) * BA_PAD
        y0, y1, _, _, count = box(arr, RED)
        assert count == n * s * s  # every before image, enlarged, and nothing else red
        assert box(arr, BLUE)[4] == n * s * s
        assert y1 - y0 == rows * s + (rows - 1) * BA_PAD  # no captions: rows of images only
        assert arr.shape[0] == y1 + BA_PAD


def test_before_left_after_right_of_each_pair(tmp_path):
    arr = draw(tmp_path, n=1)
    ry0, ry1, rx0, rx1, _ = box(arr, RED)
    by0, by1, bx0, bx1, _ = box(arr, BLUE)
    assert (ry1 - ry0, rx1 - rx0) == (128, 128) == (by1 - by0, bx1 - bx0)  # 32 px enlarged 4x
    assert (ry0, ry1) == (by0, by1) and rx0 == BA_PAD and bx0 == rx1 + BA_GAP
    # several pairs: in each row of pairs, a before block is followed by its after block
    arr = draw(tmp_path, n=6, ncol=3, name="six")
    y = box(arr, RED)[1] - 1  # last pixel row of the second row of pairs
    for c in range(3):
        x = BA_PAD + c * (2 * 128 + BA_GAP + BA_PAD)
        assert tuple(arr[y, x + 64]) == RED and tuple(arr[y, x + 128 + BA_GAP + 64]) == BLUE


def test_videos_show_their_first_frame(tmp_path):
    before = torch.stack([solid(2, RED), solid(2, (0, 255, 0))], dim=1)  # [n, F, 3, H, W]
    after = torch.stack([solid(2, BLUE), solid(2, (0, 255, 0))], dim=1)
    arr = np.asarray(Image.open(before_after(before, after, [], tmp_path / "v.png")).convert("RGB"))
    assert box(arr, RED)[4] == box(arr, BLUE)[4] == 2 * 128 * 128
    assert not (arr == (0, 255, 0)).all(-1).any()


def test_captions_render_above_their_pair(tmp_path):
    plain = draw(tmp_path, n=2, name="plain")
    long = "a red circle above a small blue square " * 4
    arr = draw(tmp_path, n=2, captions=["a red circle", long], name="cap")
    top_plain, top = box(plain, RED)[0], box(arr, RED)[0]
    assert top > top_plain + 20  # a caption band of several (wrapped) lines
    band = dark(arr[top_plain - BA_PAD // 2 : top])
    pair_w = 2 * 128 + BA_GAP
    assert band[:, BA_PAD : BA_PAD + pair_w].sum() > 20  # first caption
    assert band[:, 2 * BA_PAD + pair_w :].sum() > band[:, BA_PAD : BA_PAD + pair_w].sum()  # the longer one
    assert not dark(plain[top_plain:]).any()  # no captions: nothing drawn among the images


def test_header_names_columns_and_metrics(tmp_path):
    plain = draw(tmp_path, n=2, name="plain", before_label="before (step 0)", after_label="after (step 9)")
    arr = draw(
        tmp_path,
        n=2,
        name="metrics",
        before_label="before (step 0)",
        after_label="after (step 9)",
        before_metrics={"shapes": 0.31, "text": "ignored"},
        after_metrics={"shapes": 0.52, "text": "ignored", "only_after": 1.0},
    )
    top_plain, top = box(plain, RED)[0], box(arr, RED)[0]
    assert dark(plain[:top_plain]).sum() > 50  # the column names
    assert top > top_plain  # one more header line for the metrics
    assert dark(arr[top_plain - BA_PAD : top - BA_PAD]).sum() > 50  # and it holds text
    assert arr.shape[0] - top == plain.shape[0] - top_plain


def test_mismatched_shapes_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="same shape"):
        before_after(solid(2, RED), solid(3, BLUE), [], tmp_path / "x.png")


def test_a_caption_count_other_than_the_pairs_is_an_error_as_a_shape_mismatch_is(tmp_path):
    """1 caption for 4 pairs was drawn over the first pair alone (and 5 cut to 4), silently."""
    for captions in (["one"], ["a", "b", "c", "d", "e"]):
        with pytest.raises(ValueError, match=rf"{len(captions)} caption\(s\) for 4 before/after pairs"):
            before_after(solid(4, RED), solid(4, BLUE), captions, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    for captions in (None, [], list("abcd")):  # none, or one a pair
        assert before_after(solid(4, RED), solid(4, BLUE), captions, tmp_path / "x.png").is_file()


def test_a_report_of_a_folder_that_is_no_run_directory_is_a_user_error(tmp_path):
    """``write_report("no/such/run")`` was a raw FileNotFoundError; an unrelated folder got a report of nothing."""
    (tmp_path / "file").write_text("")
    (tmp_path / "other").mkdir()
    for folder, what in [("no/such/run", "does not exist"), ("file", "is a file, not a folder"),
                         ("other", "holds none of .mmgrpo-run, config.yaml, metrics.jsonl, samples")]:  # fmt: skip
        fix = r"give a folder written by mmgrpo train \(runs/<name>, holding config.yaml, metrics.jsonl and samples/\)"
        with pytest.raises(UserError, match=rf"is not a run directory: it {what}; {fix}") as e:
            write_report(tmp_path / folder)
        assert str(tmp_path / folder) in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file", "other"]
    (tmp_path / "other" / ".mmgrpo-run").write_text("")  # a run that has not logged yet
    assert "No metrics yet" in write_report(tmp_path / "other").read_text()


def test_report_plots_the_methods_metrics_beside_the_trainers(tmp_path):
    """A method's switch shows in its own metrics (PEARL's gate, Scaf-GRPO's re-rolls), which report.html did not
    plot: only metrics.jsonl held them (the method walkthrough of 2026-12-07)."""
    lines = [{"step": s, "reward/mean": 0.1 * s, "loss/policy": 0.01, "pearl/gate_mean": 0.1 * s,
              "rewrite/groups": float(s % 2), "time/step_s": 1.0, "adv/mean": 0.0} for s in range(1, 4)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    html = write_report(tmp_path).read_text()
    assert '<h2>Methods</h2><img src="method_curves.png">' in html
    picture = Image.open(tmp_path / "method_curves.png")
    assert picture.width == round(3.2 * 2 * 100)  # two panels: pearl/gate_mean, rewrite/groups (no time/, adv/)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in m.items() if "/" not in k or
                                         k.startswith(("reward", "loss"))}) + "\n" for m in lines))  # fmt: skip
    assert "Methods" not in write_report(plain).read_text() and not (plain / "method_curves.png").exists()


def test_report_shows_before_after_first_and_once(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/shapes": 0.3}) + "\n")
    samples = tmp_path / "samples"
    samples.mkdir()
    Image.new("RGB", (4, 4)).save(samples / "step_000000.png")
    html = write_report(tmp_path).read_text()
    assert "samples/before_after.png" not in html and "Before / after" not in html
    before_after(solid(1, RED), solid(1, BLUE), ["x"], samples / "before_after.png")
    html = write_report(tmp_path).read_text()
    assert html.count("samples/before_after.png") == 1
    assert html.index("samples/before_after.png") < html.index("<h2>Reward") < html.index("step_000000.png")


def test_completion_records_are_plain_json_in_order(tmp_path):
    prompts = ["Locate it.", {"question": "How many?", "options": ["1", "2"]}]
    records = completion_records(
        prompts,
        ["<answer>(1,2),(3,4)</answer>", "<answer>B</answer>"],
        box=[(1.0, 2.0, 3.0, 4.0), torch.tensor([5.0, 6.0, 7.0, 8.0])],
        iou=[np.float32(0.25), 1.0],
        kind=[None, "count"],  # None: the key is left out of that record
    )
    assert records == [
        {"prompt": "Locate it.", "completion": "<answer>(1,2),(3,4)</answer>", "box": [1.0, 2.0, 3.0, 4.0],
         "iou": 0.25},
        {"prompt": "How many? A) 1 B) 2", "completion": "<answer>B</answer>", "box": [5.0, 6.0, 7.0, 8.0],
         "iou": 1.0, "kind": "count"},
    ]  # fmt: skip
    path = save_completions(records, tmp_path / "samples" / "completions_step_000002.jsonl")
    assert [json.loads(x) for x in path.read_text().splitlines()] == records  # plain JSON: reads back equal
    with pytest.raises(ValueError, match=r"2 completions but \{'iou': 1\}"):
        completion_records(prompts, ["a", "b"], iou=[1.0])


def test_report_shows_vlm_completions_as_a_table_not_as_broken_images(tmp_path):
    """A VLM run's samples are completions_step_*.jsonl: report.html showed each as an <img> that could not load.
    Now: a table of the first 8 examples, the ground truth once, the completion and score at the first and the
    latest evaluation (escaped), and links to every file; a torn line is skipped."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.3}) + "\n")
    rows = lambda step: [  # noqa: E731
        {
            "prompt": f"How many? ({i})",
            "completion": f"<answer>{step}</answer>",
            "answer": "B",
            "correct": float(step > 0),
        }
        for i in range(10)
    ]
    for step in (0, 3, 6):
        save_completions(rows(step), tmp_path / "samples" / f"completions_step_{step:06d}.jsonl")
    with open(tmp_path / "samples" / "completions_step_000006.jsonl", "a") as f:
        f.write('{"prompt": "torn')
    html = write_report(tmp_path).read_text()
    assert '.jsonl"><' not in html and '<img src="samples/completions' not in html
    table = html[html.index("<h2>Completions</h2>") : html.index("<h2>Samples</h2>")]
    assert "<th>prompt</th><th>answer</th><th>completion, step_000000</th><th>correct, step_000000</th>" in table
    assert "<th>completion, step_000006</th><th>correct, step_000006</th>" in table and "step_000003</th>" not in table
    assert table.count("<tr>") == 1 + 8 and "How many? (7)" in table and "How many? (8)" not in table
    assert (
        "<td>&lt;answer&gt;0&lt;/answer&gt;</td><td>0</td><td>&lt;answer&gt;6&lt;/answer&gt;</td><td>1</td>" in table
    )
    assert all(f'href="samples/completions_step_{s:06d}.jsonl"' in table for s in (0, 3, 6))
    assert "No images: see Completions." in html
