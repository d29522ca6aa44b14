"""Recipe: visual grounding with GRPO -- a VLM answers "Locate the red circle." with a box (configs/
shapes_grounding_medloc.yaml).

As in Visual-RFT (Liu et al. 2025) and VLM-R1 (Shen et al. 2025), the policy (:class:`~mmgrpo.policies.vlm.VLMPolicy`)
writes ``<think> ... </think><answer> BOX </answer>`` and is rewarded by the IoU of BOX with the ground truth: the
dense ``iou`` reward, or MedLoc-R1's curriculum ``iou_curriculum`` (``1[IoU >= tau]`` with tau raised as the policy
improves; the paper's module is mmgrpo/methods/medloc.py, ``methods: {medloc: {}}``). BOX is written in the model
family's convention -- Qwen2-VL: ``(x1,y1),(x2,y2)`` on a 0..1000 grid of the image; Qwen2.5-VL: absolute pixels of
the image as the processor resized it -- and ground truth is stored in absolute pixels of the ORIGINAL image.
Coordinates are converted only by ``mmgrpo/rewards/boxes.py`` (the rewards read the prediction with ``to_absolute``;
:func:`box_answer` writes a ground-truth box as a target with ``from_absolute``).

Data, one example = ``{image, question, box [x1, y1, x2, y2] (original-image pixels), image_size (W, H)}``:

- ``data.options.path``: a JSONL file of such examples (image paths relative to the file; a seeded split holds out
  ``heldout_fraction`` of them), or ``hf:PATH[:SPLIT]``, a Hugging Face dataset of such rows (docs/data.md);
- ``path: ""``: grounding questions of the shapes world (mmgrpo/data/shapes_qa.py), split by scene seed like every
  shapes-QA recipe and the pretraining of ``assets/shapes_vlm``, so held-out scenes were never trained on.

Evaluation: greedy answers to held-out examples -> ``mean_iou``, ``acc_at_0.5`` (fraction with IoU >= 0.5) and the
format rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmgrpo.core import progress
from mmgrpo.core.errors import UserError, bad_option, quoted
from mmgrpo.core.files import check_image
from mmgrpo.core.types import PromptBatch
from mmgrpo.data import shapes_qa
from mmgrpo.data.hf_datasets import StoredImage, opened
from mmgrpo.data.vlm_formats import parse_box_value, to_grounding_record
from mmgrpo.data.vlm_records import check_text, example_identity, jsonl_records, media_base
from mmgrpo.methods.registry import check_example_keys
from mmgrpo.pipelines.vlm_reasoning import (
    PairedScores,
    QAPrompts,
    check_heldout_fraction,
    check_question_lengths,
    check_scene_count,
    check_vlm_data,
    first_completions,
    load_vlm_policy,
    seeded_split,
    warn_repeated_heldout,
    warn_short_evaluation,
)
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.rewards.boxes import from_absolute
from mmgrpo.rewards.text import has_valid_format, iou_reward
from mmgrpo.train.components import PIPELINES, Components, EvalResult, Pipeline, completion_records
from mmgrpo.train.config import Config, options_from

BOX_REWARDS = ("iou", "iou_curriculum")


@dataclass
class VLMGroundingDataOptions:
    path: str = ""
    """JSONL file of {image, question, box, image_size}, or hf:PATH[:SPLIT] for a Hugging Face dataset of such rows
    (docs/data.md); "" = shapes-world grounding questions (shapes_qa)"""
    heldout_fraction: float = 0.1
    """fraction held out: of the JSONL examples, or of the shapes scene seeds (keep 0.1 for assets/shapes_vlm)"""
    split_seed: int = 0
    """seed of the train / held-out split (shapes: keep 0, the split assets/shapes_vlm was pretrained on)"""
    num_train: int = 2048
    """shapes: number of distinct train scenes the prompt stream cycles through"""
    image_size: int = 64
    """shapes: rendered image side in pixels (32..64 is the shapes world's range)"""
    question_suffix: str = ""
    """appended to every question (e.g. a format hint such as " Answer (x1,y1),(x2,y2).")"""
    eval_examples: int = 64
    """held-out examples answered (greedily) at each evaluation"""
    eval_batch: int = 8
    """prompts per generate call during evaluation"""

    def __post_init__(self) -> None:
        # checked when the config loads (Pipeline.check), before the model does
        check_vlm_data(self.split_seed, self.eval_examples)
        if self.path:  # the numbers below only shape the synthetic scenes
            return
        lo, hi = shapes_qa.IMAGE_SIZES
        if not lo <= self.image_size <= hi:
            raise bad_option("data.options.image_size", self.image_size, f"the shapes grounding scenes are rendered "
                             f"with a side in {lo}..{hi} pixels (drawn for 32-64); set it to e.g. 64")  # fmt: skip
        check_scene_count("data.options.num_train", self.num_train, "the shapes grounding source")
        check_scene_count("data.options.eval_examples", self.eval_examples, "the shapes grounding source")


Example = tuple[dict, dict]  # (prompt {question}, meta {box, image_size, images})


def box_answer(
    box: list[float], family: str, image_size: tuple[int, int], resized_size: tuple[int, int] | None = None
) -> str:
    """A ground-truth box (original-image pixels) as the answer a ``family`` model writes (a pretraining target).

    qwen2_vl: ``"(x1,y1),(x2,y2)"``, integers on the 0..1000 grid; qwen2_5_vl / absolute: ``"[x1, y1, x2, y2]"``,
    integer pixels (of the resized image for qwen2_5_vl). The conversion is ``mmgrpo.rewards.boxes.from_absolute``.

    >>> box_answer([16, 8, 48, 40], "qwen2_vl", (64, 64))  # 16 / 64 * 1000 = 250, 8 / 64 * 1000 = 125, ...
    '(250,125),(750,625)'
    """
    b = from_absolute(box, family, image_size, resized_size)
    if family == "qwen2_vl":
        x1, y1, x2, y2 = (min(max(round(v), 0), 1000) for v in b)
        return f"({x1},{y1}),({x2},{y2})"
    return "[" + ", ".join(str(round(v)) for v in b) + "]"


def load_grounding_jsonl(path: str | Path) -> list[Example]:
    """Examples of a JSONL file of {image, question, box, image_size?} (or TRL conversational, LLaVA conversations or
    VLM-R1 {image, problem, solution} records whose answer is the box: docs/data.md); image paths are relative to
    the file."""
    return [ex for _, ex in load_grounding_lines(path)]


def load_grounding_lines(path: str | Path) -> list[tuple[str, Example]]:
    """(``"PATH line N"``, example) of each example of :func:`load_grounding_jsonl`."""
    base = media_base(path)
    out = []
    for where, rec in jsonl_records(path, ("image", "question", "box"), "shapes grounding", to_grounding_record):
        box = parse_box_value(rec["box"], where)
        question = check_text(rec, "question", where)
        if rec.get("images") is not None:
            raise UserError(f"{where}: give 'image' (one path), not 'images' as well; a grounding example has one "
                            "image")  # fmt: skip
        image = rec["image"]
        if not isinstance(image, str | StoredImage) or isinstance(image, str) and not image.strip():
            raise UserError(f"{where}: a grounding example has one image: 'image' must be a path, got "
                            f"{quoted(rec['image'], 80)}")  # fmt: skip
        image = image if isinstance(image, StoredImage) else str(base / image)
        size = check_box(box, rec.get("image_size"), image, where)  # the image opened once here, not mid-training
        meta = {k: v for k, v in rec.items() if k not in ("image", "question", "box", "image_size")}
        meta.update(box=box, image_size=size, images=[image])
        out.append((where, ({"question": question}, meta)))
    if not out:
        raise UserError(f"{path} holds no examples")
    return out


def _same_shape(a: tuple, b: tuple) -> bool:
    """Do sizes ``a`` and ``b`` (W, H) have the same aspect ratio, within 2% (rounding of a resize)?"""
    return abs(a[0] / a[1] - b[0] / b[1]) <= 0.02 * b[0] / b[1]


def check_box(box: list[float], image_size: Any, image: str | StoredImage, where: str) -> tuple[int, int]:
    """The (W, H) a box is in -- ``image_size`` when given (the original image's, for a file that is a resized copy),
    else the image file's -- after checking that the box lies in it with x1 < x2 and y1 < y2 (an inverted, empty or
    outside box gives every answer IoU 0: a reward without signal)."""
    # as shown (EXIF orientation applied), like the image the model sees; a hf: dataset's was checked as it was read
    dims = image.size if isinstance(image, StoredImage) else check_image(image, where)
    if image_size is None:
        size = dims
    elif (
        isinstance(image_size, list)
        and len(image_size) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 1 for v in image_size)
    ):
        size = (image_size[0], image_size[1])
        if not _same_shape(size, dims):  # a resized copy keeps the shape; [H, W] is the usual slip
            swapped = " (it looks like [height, width])" if _same_shape(size, dims[::-1]) else ""
            raise UserError(f"{where}: image_size {quoted(image_size, 40)} does not have the shape of the "
                            f"{dims[0]}x{dims[1]} image{swapped}; write [width, height] of the image the box was "
                            "drawn on, or leave image_size out")  # fmt: skip
    else:
        raise UserError(f"{where}: 'image_size' must be [width, height] in pixels (numbers >= 1), got "
                        f"{quoted(image_size, 80)}; or leave it out to read the size from the image")  # fmt: skip
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise UserError(f"{where}: box {quoted(box, 80)} has x2 <= x1 or y2 <= y1; a box is [x1, y1, x2, y2] with "
                        "(x1, y1) the top-left and (x2, y2) the bottom-right corner, in pixels")  # fmt: skip
    w, h = size
    if min(x1, y1) < 0 or x2 > w or y2 > h:
        raise UserError(f"{where}: box {quoted(box, 80)} reaches outside the {w:g}x{h:g} image; give it in pixels "
                        "of the image (0 <= x1 < x2 <= width, 0 <= y1 < y2 <= height), or the original size as "
                        "image_size when the file was resized")  # fmt: skip
    return size


class GroundingExamples:
    """Example pool with ``train`` / ``heldout`` index lists and ``example(i)`` (what QAPrompts streams)."""

    def __init__(self, data: VLMGroundingDataOptions):
        check_heldout_fraction(data.heldout_fraction)
        self.data = data
        lines = load_grounding_lines(data.path) if data.path else None
        self.records = [ex for _, ex in lines] if lines is not None else None
        self.lines = [where for where, _ in lines] if lines is not None else []
        """where each record is: ``"PATH line N"``"""
        if self.records is not None:  # a seeded permutation of the file's examples
            what = f"data.options.path={data.path!r}"
            split = seeded_split(len(self.records), data.heldout_fraction, data.split_seed, what)
            self.train, self.heldout = split
        else:  # shapes: indices ARE scene seeds, split by shapes_qa's hash of the seed
            if data.num_train < 1:
                raise UserError(f"data.options.num_train={data.num_train} must be >= 1")
            self.train = shapes_qa.train_seeds(data.num_train, data.split_seed, data.heldout_fraction)
            self.heldout = shapes_qa.heldout_seeds(data.eval_examples, data.split_seed, data.heldout_fraction)

    def example(self, i: int) -> Example:
        if self.records is not None:
            prompt, meta = self.records[i]
            prompt, meta = dict(prompt), {**meta, "images": opened(meta["images"])}  # a hf: dataset's decoded
        else:
            ex = shapes_qa.make_example(i, "grounding", self.data.split_seed, self.data.image_size)
            prompt, meta = ex.prompt(), ex.meta()
        prompt["question"] += self.data.question_suffix
        return prompt, meta

    def identity(self, i: int) -> str:
        """What defines train example ``i`` (:meth:`~mmgrpo.pipelines.vlm_reasoning.QAPrompts.fingerprint`): a
        file's record and the question suffix (:func:`~mmgrpo.data.vlm_records.example_identity`), or a
        shapes scene's options and seed (the same options draw the same scene)."""
        d = self.data
        if self.records is not None:
            return example_identity(self.records[i], d.question_suffix)
        return json.dumps(["grounding", d.split_seed, d.image_size, d.question_suffix, i])


def grounding_scores(policy: VLMPolicy, examples: list[Example], texts: list[str]) -> list[float]:
    """IoU of each answer text with its example's box, read in ``policy.box_family`` (the ``iou`` reward's maths).

    Qwen2.5-VL answers are in pixels of the resized image, so its size (from the processor) is added to meta.
    """
    metas = []
    for prompt, meta in examples:
        m = dict(meta)
        if policy.box_family == "qwen2_5_vl":
            m.setdefault("resized_size", policy.prepare(prompt, meta).resized_size)
        metas.append(m)
    return [float(v) for v in iou_reward(family=policy.box_family)(texts, [p for p, _ in examples], metas, None)]


def evaluate_grounding(
    policy: VLMPolicy, examples: list[Example], batch: int = 8, paired: PairedScores | None = None, step: int = 0
) -> EvalResult:
    """Greedy answers to ``examples``: mean IoU, accuracy at IoU >= 0.5, format rate; with ``paired``, the standard
    errors of :class:`~mmgrpo.pipelines.vlm_reasoning.PairedScores` (``mean_iou_se``, ``mean_iou_gain``, ...); the
    records (:func:`~mmgrpo.train.components.completion_records`) hold prompt, completion, box (ground truth, pixels
    of the original image) and iou."""
    texts: list[str] = []
    for lo in progress.batches(len(examples), batch, unit="example"):
        part = examples[lo : lo + batch]
        texts += policy.generate(PromptBatch(prompts=[p for p, _ in part], meta=[m for _, m in part]), greedy=True)
    ious = grounding_scores(policy, examples, texts)
    metrics = {
        "mean_iou": float(np.mean(ious)),
        "acc_at_0.5": float(np.mean([x >= 0.5 for x in ious])),
        "format": float(np.mean([has_valid_format(t) for t in texts])),
    }
    records = completion_records([p for p, _ in examples], texts, box=[m["box"] for _, m in examples], iou=ious)
    if paired is not None:
        metrics.update(paired(step, iou_scores(records), [r["prompt"] for r in records]))
    return EvalResult(metrics=metrics, captions=texts, records=records)


def iou_scores(records: list[dict]) -> dict[str, list[float]]:
    """The per-example values :class:`~mmgrpo.pipelines.vlm_reasoning.PairedScores` pairs, from an evaluation's
    records (in memory, or read back from the run's step-0 completions): ``mean_iou`` and ``acc_at_0.5``."""
    ious = [float(r["iou"]) for r in records]
    return {"mean_iou": ious, "acc_at_0.5": [float(x >= 0.5) for x in ious]}


def check_box_rewards(cfg: Config, box_family: str) -> None:
    """A box reward reading another family's coordinates would score garbage: refuse it."""
    for i, spec in enumerate(cfg.rewards):
        family = spec.options.get("family", "qwen2_5_vl")  # the iou rewards' default
        if spec.name in BOX_REWARDS and family != box_family:
            raise UserError(
                f"rewards.{i}.options.family={family!r}: reward {spec.name!r} would read boxes as family {family!r} "
                f"but the policy writes {box_family!r} boxes; set rewards.{i}.options.family={box_family}"
            )


def build_vlm_grounding(cfg: Config, accelerator: Any = None) -> Components:
    data = options_from(VLMGroundingDataOptions, cfg.data.options, "the config", "data.options")
    examples = GroundingExamples(data)  # the data first: a bad file is named before the model loads
    check_example_keys(cfg, [(w, {**p, **m}) for w, (p, m) in zip(examples.lines, examples.records or [])])
    warn_short_evaluation(data.path, len(examples.heldout), data.eval_examples)
    warn_repeated_heldout(data.path, examples.records, examples.lines, examples.train, examples.heldout)
    example = "assets/shapes_vlm (written by `python -m scripts.pretrain_shapes_vlm`)"
    policy = load_vlm_policy(cfg, accelerator, example)
    check_box_rewards(cfg, policy.box_family)
    check_question_lengths(policy, examples.lines, examples.records)
    held = [examples.example(i) for i in examples.heldout[: data.eval_examples]]

    def evaluate(policy: VLMPolicy, step: int) -> EvalResult:
        return evaluate_grounding(policy, held, data.eval_batch, paired, step)

    comp = Components(policy=policy, prompts=QAPrompts(examples, cfg.run.seed), evaluate=evaluate)
    paired = PairedScores(lambda: first_completions(comp), iou_scores)
    return comp


PIPELINES.add(
    "vlm_grounding",
    Pipeline(
        build=build_vlm_grounding,
        policy_options=VLMPolicyOptions,
        data_options=VLMGroundingDataOptions,
        description="GRPO of a VLM on visual grounding: IoU / MedLoc-R1 curriculum + format "
        "(configs/shapes_grounding_medloc.yaml)",
    ),
)
