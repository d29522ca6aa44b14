"""Recipe: R1-style visual reasoning with GRPO (configs/vlm_reasoning_tiny.yaml); paper methods plug in by methods:.

A VLM (:class:`~mmgrpo.policies.vlm.VLMPolicy`: Qwen2-VL, Qwen2.5-VL, generic image-text-to-text) answers questions
about images or videos in the ``<think> ... </think><answer> ... </answer>`` format of DeepSeek-R1 (Guo et al. 2025),
as in R1-V and VLM-R1 (Shen et al. 2025); rewards are the verifiable ``format`` and ``accuracy`` of
mmgrpo/rewards/text.py.

Data, one example = ``{question, options?, answer, image | images | video, checklist?, ...}``:

- ``data.options.path``: a JSONL file of such examples (media paths relative to the file; other keys go to meta), or
  of TRL conversational / LLaVA ``conversations`` records, converted on load, or ``hf:PATH[:SPLIT]``, a Hugging Face
  dataset of such rows (a save_to_disk folder; images as ``Image`` features or paths) (docs/data.md);
- ``path: ""``: the built-in synthetic shapes QA, questions about scenes of the shapes world (mmgrpo/data/shapes.py)
  rendered on the fly: "How many red circles are there? A) 1 B) 2 C) 3", "Is there a blue square? A) yes B) no",
  each with a perception checklist: [["How many red objects are there?", "2"], ["Is there a triangle?", "yes"]]
  and three tiered hints (``hints``, :func:`mmgrpo.data.shapes_qa.tiered_hints`; Scaf-GRPO's re-rolls read them).

A seeded split holds out ``heldout_fraction`` of the examples; evaluation reports their accuracy and format rate
under greedy decoding.

Paper methods are switched on by the config's top-level ``methods:`` block, never by this recipe's options
(configs/vlm_<method>.yaml runs each on the tiny asset; each method is one module of :mod:`mmgrpo.methods`):
``methods: {pearl: {cap: 0.5, checklist_weight: 0.1}}`` (PEARL perception checklists: the examples' ``checklist``
answered by a second group per example; rewards without a stream test are restricted with ``streams: [reasoning]``),
``methods: {tempsamp: {anchor_factor: 1.2}}`` (TempSamp-R1: the ground truth as a teacher-forced row of every group;
pair it with ``advantage.shaping: tempsamp_soft``), and the reward-shaped ones: ``acre``, ``listener``
(``vlm_listener`` reward), ``mmupt`` (``majority_vote``), ``medloc`` (``iou_curriculum`` on examples with a ``box``),
and those that re-roll all-fail groups from rewritten prompts: ``scaf_grpo`` (tiered hints), ``hill`` (a hinter's
hints), ``cog_drift`` (cloze / multiple-choice variants).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mmgrpo.core import progress
from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.core.types import PromptBatch
from mmgrpo.data import shapes, shapes_qa
from mmgrpo.data.hf_datasets import (
    opened,
)
from mmgrpo.data.vlm_records import (  # noqa: F401  (re-exported: the recipes' and tests' readers)
    NOT_JSON,
    Example,
    check_media,
    check_text,
    example_identity,
    hf_records,
    jsonl_records,
    load_jsonl,
    load_jsonl_lines,
    media_base,
)
from mmgrpo.methods.registry import check_example_keys
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from mmgrpo.policies.vlm_inputs import question_text
from mmgrpo.policies.vlm_load import context_length
from mmgrpo.rewards.text import answer_or_completion, grade, has_valid_format
from mmgrpo.train.components import PIPELINES, Components, EvalResult, Pipeline, completion_records
from mmgrpo.train.config import Config, options_from

SHAPES_IMAGE_SIZES = (16, 512)
"""the image sides (pixels) source shapes renders, both included (shapes_qa's are ``shapes_qa.IMAGE_SIZES``): the
world is drawn for 32-64, and a side of 100000 is a 30 GB image"""


def check_scene_count(key: str, value: int, what: str) -> None:
    """A synthetic shapes source's count ``key`` (``value`` >= its minimum, checked by the caller) is at most
    :data:`~mmgrpo.data.shapes_qa.MAX_SCENES`; ``what`` names the source."""
    if value > shapes_qa.MAX_SCENES:
        raise bad_option(key, value, f"{what} draws at most {shapes_qa.MAX_SCENES:,} scenes (a run of 4 prompts a "
                         "step takes 250,000 steps to see a million once, and all are drawn when the run starts); "
                         "set it to that or fewer, e.g. 4096")  # fmt: skip


def check_vlm_data(split_seed: int, eval_examples: int) -> None:
    """The numbers of ``data.options`` both VLM recipes share: a split seed numpy takes, an evaluation that asks
    something (``eval_examples`` 0 gave NaN metrics, -1 silently all held-out examples but the last)."""
    if split_seed < 0:
        raise bad_option("data.options.split_seed", split_seed, "a seed is an integer >= 0; set it to 0 or more "
                         "(0 is the split assets/shapes_vlm was pretrained on)")  # fmt: skip
    if eval_examples < 1:
        raise bad_option("data.options.eval_examples", eval_examples, "an evaluation needs at least 1 held-out "
                         "example; set it to 1 or more, e.g. 32 (never evaluate: trainer.eval_every=0)")  # fmt: skip


@dataclass
class VLMReasoningDataOptions:
    path: str = ""
    """JSONL file of {question, options?, answer, image | images | video}, or hf:PATH[:SPLIT] for a Hugging Face
    dataset of such rows (docs/data.md); "" = synthetic shapes QA"""
    source: str = "shapes"
    """synthetic QA when path is "": shapes (counting / existence, below) or shapes_qa (count / colour / position
    multiple choice of mmgrpo/data/shapes_qa.py: num_examples train and eval_examples held-out scenes, split by scene
    seed as assets/shapes_vlm was pretrained)"""
    heldout_fraction: float = 0.1
    """fraction of the examples held out for evaluation"""
    split_seed: int = 0
    """seed of the train / held-out split"""
    num_examples: int = 512
    """synthetic shapes QA: number of distinct examples (train + held-out)"""
    image_size: int = 64
    """synthetic shapes QA: rendered image side in pixels"""
    train_kinds: list[str] = field(default_factory=list)
    """source shapes_qa: question kinds of the TRAINING stream (a subset of count, color, position; [] = all three);
    the held-out evaluation always asks all three"""
    difficulty: str = "normal"
    """source shapes_qa: normal, near_miss (3-object scenes of near misses) or shuffled (options in an order that moves
    the answer off its usual letter; bench/learning_vlm.py's hard split), for training AND the held-out evaluation
    (mmgrpo/data/shapes_qa.py)"""
    eval_examples: int = 32
    """held-out examples answered (greedily) at each evaluation"""
    eval_batch: int = 8
    """prompts per generate call during evaluation"""

    def __post_init__(self) -> None:
        # checked when the config loads (Pipeline.check), before the model does
        check_vlm_data(self.split_seed, self.eval_examples)
        if self.path:  # the numbers below only shape the synthetic data
            return
        if self.source == "shapes" and self.num_examples < 2:
            raise bad_option("data.options.num_examples", self.num_examples, "the synthetic shapes QA needs at least "
                             "2 examples (train + held-out); set it to 2 or more, e.g. 512")  # fmt: skip
        if self.source == "shapes_qa" and self.num_examples < 1:
            raise bad_option("data.options.num_examples", self.num_examples, "source shapes_qa needs at least 1 "
                             "train scene; set it to 1 or more, e.g. 4096")  # fmt: skip
        check_scene_count("data.options.num_examples", self.num_examples, f"source {self.source}")
        if self.source == "shapes_qa":  # its held-out scenes are drawn to order (source shapes holds out a fraction)
            check_scene_count("data.options.eval_examples", self.eval_examples, "source shapes_qa")
        lo, hi = shapes_qa.IMAGE_SIZES if self.source == "shapes_qa" else SHAPES_IMAGE_SIZES  # what each can draw
        if not lo <= self.image_size <= hi:
            raise bad_option("data.options.image_size", self.image_size, f"source {self.source} renders images of "
                             f"a side in {lo}..{hi} pixels; the shapes world is drawn for 32-64, e.g. 64")  # fmt: skip


def shapes_question(index: int, seed: int = 0, size: int = 64) -> Example:
    """Synthetic shapes QA example ``index`` (deterministic in (seed, index)): a counting or an existence question."""
    rng = np.random.default_rng([seed, index])
    color, shape = str(rng.choice(shapes.COLORS)), str(rng.choice(shapes.SHAPES))
    if rng.random() < 0.5:
        n = int(rng.integers(1, 4))
        scene = shapes.sample_scene(f"{shapes.COUNT_WORDS[n]} {color} {shape}{'s' if n > 1 else ''}", rng, 1)
        question, options, answer = f"How many {color} {shape}s are there?", ["1", "2", "3"], "ABC"[n - 1]
        kind = "count"
    else:
        present = bool(rng.random() < 0.5)
        prompt = f"a {color} {shape}"
        scene = shapes.sample_scene(prompt, rng, 2) if present else shapes.sample_mismatched_scene(prompt, rng)
        question, options, answer = f"Is there a {color} {shape}?", ["yes", "no"], "A" if present else "B"
        kind = "exists"
    image = shapes.render(scene, size=size)
    objects = [(o.color, o.shape) for o in scene.objects]
    meta = {"answer": answer, "images": [image], "image_size": (size, size), "objects": objects, "index": index}
    meta["checklist"] = shapes_checklist(objects, color, np.random.default_rng([seed, index, 1]))
    meta["entities"] = list(dict.fromkeys(f"{c} {s}" for c, s in objects))  # E-GRPO's ground-truth entities
    meta["hints"] = list(shapes_qa.tiered_hints(kind, scene, color, shape, size))  # Scaf-GRPO's tiers
    return {"question": question, "options": options}, meta


def shapes_checklist(objects: list[tuple[str, str]], color: str, rng: np.random.Generator) -> list[list[str]]:
    """PEARL perception checklist of a scene: how many objects of ``color``, is there a (random) shape."""
    shape = str(rng.choice(shapes.SHAPES))
    n = sum(c == color for c, _ in objects)
    present = any(s == shape for _, s in objects)
    return [[f"How many {color} objects are there?", str(n)], [f"Is there a {shape}?", "yes" if present else "no"]]


def warn_short_evaluation(path: str, n_heldout: int, eval_examples: int) -> None:
    """A split holding fewer held-out examples than ``eval_examples`` evaluates all it holds: say so once, so that a
    metric over 3 examples is not read as one over 32. A file's split (``path``) or a synthetic one (``path`` "": the
    shapes QA holds out ``heldout_fraction`` of its ``num_examples``; shapes_qa and the shapes grounding scenes draw
    ``eval_examples`` held-out scenes, never fewer)."""
    if n_heldout >= eval_examples:
        return
    what, more = (
        (f"data.options.path={path!r}", "data.options.heldout_fraction")
        if path
        else ("the synthetic shapes QA", "data.options.num_examples or data.options.heldout_fraction")
    )
    warnings.warn(
        f"{what}: the split holds {n_heldout} held-out example(s), fewer than data.options.eval_examples="
        f"{eval_examples}; each evaluation answers only {n_heldout} (raise {more} for more)",
        stacklevel=3,
    )


def warn_repeated_heldout(
    path: str, records: list[Example] | None, lines: list[str], train: list[int], heldout: list[int]
) -> None:
    """A file that repeats an example can put one copy in each split, and the held-out evaluation then scores what
    the policy trained on: say so once, naming the first repeat's lines."""
    if not path or records is None:
        return

    def key(i: int) -> str:
        return json.dumps(records[i], sort_keys=True, default=str)

    seen = {key(i): i for i in train}
    both = [(i, seen[k]) for i in heldout if (k := key(i)) in seen]
    if both:
        held, trained = both[0]
        warnings.warn(
            f"data.options.path={path!r}: {len(both)} of the {len(heldout)} held-out example(s) also appear in the "
            f"training split (the file repeats them; the first: {lines[held]} = {lines[trained]}), so the held-out "
            "evaluation scores examples the policy trains on; remove the repeated lines",
            stacklevel=3,
        )


def check_question_lengths(policy: VLMPolicy, lines: list[str], records: list[Example] | None) -> None:
    """No question of a data file is longer than the model's context (``max_position_embeddings``) less
    ``max_new_tokens``: such a prompt (a file with a missing line break, a pasted document) would be rolled out
    group_size times at a size the model was not made for, and run out of memory in the first step."""
    limit = context_length(getattr(getattr(policy.model, "vlm", None), "config", None))
    if not records or limit is None:
        return
    room = limit - policy.options.max_new_tokens
    for where, (prompt, _) in zip(lines, records):
        text = question_text(prompt)
        if 4 * len(text) < room:  # a token is at least 1 byte, a character at most 4: surely short enough
            continue
        n = len(policy.tokenizer(text)["input_ids"])
        if n > room:
            raise UserError(f"{where}: the question is {n} tokens ({len(text)} characters), more than the "
                            f"{room} the model's context of {limit} leaves beside policy.options.max_new_tokens="
                            f"{policy.options.max_new_tokens}; shorten it (or check the line for a missing line "
                            "break)")  # fmt: skip


def check_heldout_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise UserError(f"data.options.heldout_fraction={fraction} must be in (0, 1), e.g. 0.1")


def seeded_split(n: int, heldout_fraction: float, split_seed: int, what: str) -> tuple[list[int], list[int]]:
    """(train, held-out) sorted index lists of ``n`` examples: a seeded permutation, at least one in each part."""
    if n < 2:
        raise UserError(f"{what} holds {n} example(s); the seeded train / held-out split (data.options."
                        "heldout_fraction) needs at least 2: add examples")  # fmt: skip
    perm = np.random.default_rng(split_seed).permutation(n)
    n_held = min(max(1, round(heldout_fraction * n)), n - 1)
    return sorted(perm[n_held:].tolist()), sorted(perm[:n_held].tolist())


class QAExamples:
    """Example pool: synthetic (rendered on demand) or loaded from JSONL; a seeded train / held-out split."""

    def __init__(self, data: VLMReasoningDataOptions):
        check_heldout_fraction(data.heldout_fraction)
        self.data = data
        lines = load_jsonl_lines(data.path) if data.path else None
        self.records = [ex for _, ex in lines] if lines is not None else None
        self.lines = [where for where, _ in lines] if lines is not None else []
        """where each record is: ``"PATH line N"``"""
        self.train_kinds: tuple[str, ...] = shapes_qa.MC_KINDS
        if data.source not in ("shapes", "shapes_qa"):
            raise UserError(f"data.options.source={data.source!r}; use 'shapes' or 'shapes_qa'")
        if self.records is None and data.source == "shapes_qa":  # indices are scene seeds (shapes_qa's own split)
            self.train = shapes_qa.train_seeds(data.num_examples, data.split_seed, data.heldout_fraction)
            self.heldout = shapes_qa.heldout_seeds(data.eval_examples, data.split_seed, data.heldout_fraction)
            self.train_kinds = tuple(data.train_kinds) or shapes_qa.MC_KINDS
            bad = [k for k in self.train_kinds if k not in shapes_qa.MC_KINDS]
            if bad:
                raise UserError(
                    f"data.options.train_kinds={list(data.train_kinds)}: {bad} not multiple-choice kinds; use a "
                    f"subset of {list(shapes_qa.MC_KINDS)} or []"
                )
            if data.difficulty not in shapes_qa.DIFFICULTIES:
                raise UserError(
                    f"data.options.difficulty={data.difficulty!r}; use one of {', '.join(shapes_qa.DIFFICULTIES)}"
                )
            return
        if data.train_kinds:
            raise UserError("data.options.train_kinds needs source: shapes_qa and path: ''; remove it")
        if data.difficulty != "normal":
            raise UserError("data.options.difficulty needs source: shapes_qa and path: ''; remove it")
        n = len(self.records) if self.records is not None else data.num_examples
        what = f"data.options.path={data.path!r}" if data.path else "the synthetic shapes QA"
        self.train, self.heldout = seeded_split(n, data.heldout_fraction, data.split_seed, what)

    def example(self, i: int, kinds: tuple[str, ...] = shapes_qa.MC_KINDS) -> Example:
        """Example ``i``; ``kinds``: the question kinds a shapes_qa scene draws from (held-out: all three)."""
        if self.records is not None:
            prompt, meta = self.records[i]
            return dict(prompt), {**meta, "images": opened(meta["images"])}  # a hf: dataset's images decoded
        if self.data.source == "shapes_qa":
            d = self.data
            ex = shapes_qa.make_example(i, None, d.split_seed, d.image_size, kinds, d.difficulty)
            return ex.prompt(), ex.meta()
        return shapes_question(i, self.data.split_seed, self.data.image_size)

    def train_example(self, i: int) -> Example:
        """Train example ``i``: shapes_qa asks only ``data.train_kinds`` (all three by default)."""
        return self.example(i, self.train_kinds)

    def identity(self, i: int) -> str:
        """What defines train example ``i`` (:meth:`QAPrompts.fingerprint`): a file's record
        (:func:`example_identity`), or the options a synthetic example is drawn from and its index; the same options
        draw the same scene, and rendering every scene to hash it would cost a run seconds at each resume."""
        if self.records is not None:
            return example_identity(self.records[i])
        d = self.data
        return json.dumps([d.source, d.split_seed, d.image_size, d.difficulty, list(self.train_kinds), i])


class QAPrompts:
    """Stream position i -> a train example, in a fresh seeded permutation for every pass over the train set.

    ``example``: index -> example of the stream (default ``examples.example``; the reasoning recipe passes
    :meth:`QAExamples.train_example`, which asks only ``data.train_kinds``)."""

    fingerprint_scheme = 2  # 1 (before 2026-12-07): each image or video file by its name and size

    def __init__(self, examples: Any, order_seed: int, example: Callable[[int], Example] | None = None):
        self.examples, self.order_seed = examples, order_seed
        self.example = example or examples.example
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        """P: the train examples of one pass (stream positions 0 .. P - 1 are each of them once)."""
        return len(self.examples.train)

    def fingerprint(self) -> str:
        """SHA-256 of the train examples' identities in the split's order (``examples.identity``: a file's questions,
        answers and media, or a synthetic source's options): a checkpoint keeps it, so that a resume notices a question
        file edited to the same length (the stream positions already trained would then name other examples)."""
        if self._fingerprint is None:  # the examples do not change during a run; every checkpoint asks
            h = hashlib.sha256()
            for i in self.examples.train:
                h.update(self.examples.identity(i).encode("utf-8", "surrogatepass") + b"\0")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def example_at(self, i: int) -> int:
        train = self.examples.train
        epoch, pos = divmod(i, len(train))
        return train[_permutation(self.order_seed, epoch, len(train))[pos]]

    def get(self, indices: list[int]) -> PromptBatch:
        picked = [self.example(self.example_at(i)) for i in indices]
        return PromptBatch(prompts=[p for p, _ in picked], meta=[m for _, m in picked])


@lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


FIRST_COMPLETIONS = "samples/completions_step_000000.jsonl"
"""in the run directory: the step-0 evaluation's records, one JSON object per example (written by the trainer's
``evaluate``, as every evaluation's ``completions_step_XXXXXX.jsonl``): a resumed run's "before" of the gains"""


def first_completions(comp: Components) -> Path | None:
    """The run's :data:`FIRST_COMPLETIONS`, in the directory the trainer writes (``comp.run_dir``, set once the
    recipe is built: a ``Trainer(cfg, run_dir)`` may write elsewhere than ``run.output_dir / run.name``); None
    outside a run."""
    return None if comp.run_dir is None else Path(comp.run_dir) / FIRST_COMPLETIONS


class PairedScores:
    """Standard errors of held-out metrics, and of their change since step 0 on the SAME examples (paired).

    ``__call__(step, {name: per-example values}, prompts) -> {name_se, name_gain, name_gain_se}``: ``name_se`` is the
    standard error of the mean over the examples; at step 0 the values are kept, and every later call adds the mean
    change per example since then (``name_gain``) and its standard error ``std(after - before) / sqrt(n)`` -- the SE
    of a before -> after difference measured on one evaluation set, far smaller than either mean's own SE when most
    answers do not change.

    A run resumed past step 0 reads its baseline back from what the run wrote of the step-0 evaluation: ``first()``
    (:func:`first_completions`, plain JSONL), whose records ``scores`` turns into the per-example values (the same
    function the evaluation scores its own records with, so the gains are the uninterrupted run's). It is used only
    when its records are of the same examples (``prompts``, the evaluation's prompt texts, in order); without it (no
    step-0 evaluation, or no ``first``) there is no gain, as before.
    """

    def __init__(
        self,
        first: Callable[[], Path | None] | None = None,
        scores: Callable[[list[dict]], dict[str, list[float]]] | None = None,
    ) -> None:
        self.baseline: dict[str, np.ndarray] = {}
        self.first, self.scores = first, scores
        self._read = False  # the file is read once, at the first evaluation after step 0

    def __call__(
        self, step: int, scores: dict[str, list[float]], prompts: list[str] | None = None
    ) -> dict[str, float]:
        if step != 0 and not self.baseline and not self._read:
            self._read = True
            self.baseline = self._read_first(prompts)
        out: dict[str, float] = {}
        for name, values in scores.items():
            v = np.asarray(values, dtype=np.float64)
            out[f"{name}_se"] = _se(v)
            if step == 0:
                self.baseline[name] = v
            elif name in self.baseline and len(self.baseline[name]) == len(v):
                d = v - self.baseline[name]
                out[f"{name}_gain"], out[f"{name}_gain_se"] = float(d.mean()), _se(d)
        return out

    def _read_first(self, prompts: list[str] | None) -> dict[str, np.ndarray]:
        """The step-0 values from ``first``, or {} (none written, unreadable, or of other examples: said once)."""
        path = self.first() if self.first is not None else None  # asked late: the run directory is set by then
        if path is None or self.scores is None or not path.is_file():
            return {}
        why = ""
        try:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            if prompts is not None and [r.get("prompt") for r in records] != list(prompts):
                why = "it holds other held-out examples than this evaluation (the data options changed at the resume)"
            else:
                return {k: np.asarray(v, dtype=np.float64) for k, v in self.scores(records).items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"it is unreadable ({type(e).__name__}: {e})"
        warnings.warn(f"{self.first}: {why}, so this resumed run logs no eval/*_gain against step 0", stacklevel=3)
        return {}


def _se(v: np.ndarray) -> float:
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def score_accuracy(
    policy: VLMPolicy, examples: QAExamples, n: int, batch: int
) -> tuple[list[Example], list[str], list[float]]:
    """Greedy answers to the first ``n`` held-out examples: (the examples, texts, correct 0/1 per example)."""
    held = [examples.example(i) for i in examples.heldout[:n]]
    texts: list[str] = []
    for lo in progress.batches(len(held), batch, unit="question"):
        part = held[lo : lo + batch]
        texts += policy.generate(PromptBatch(prompts=[p for p, _ in part], meta=[m for _, m in part]), greedy=True)
    correct = [float(grade(answer_or_completion(t), m["answer"])) for t, (_, m) in zip(texts, held)]
    return held, texts, correct


def evaluate_accuracy(
    policy: VLMPolicy, examples: QAExamples, n: int, batch: int, paired: PairedScores | None = None, step: int = 0
) -> EvalResult:
    """Greedy answers to the first ``n`` held-out examples: accuracy, format rate, accuracy per question kind (when
    the examples have one, e.g. shapes_qa) and, with ``paired``, the standard errors of :class:`PairedScores`; the
    records (:func:`~mmgrpo.train.components.completion_records`) hold prompt, completion, answer, correct, kind."""
    held, texts, correct = score_accuracy(policy, examples, n, batch)
    kinds = [m.get("kind") for _, m in held]
    metrics = {"accuracy": float(np.mean(correct)), "format": float(np.mean([has_valid_format(t) for t in texts]))}
    for kind in sorted({k for k in kinds if k is not None}):
        metrics[f"accuracy_{kind}"] = float(np.mean([c for c, k in zip(correct, kinds) if k == kind]))
    answers = [m["answer"] for _, m in held]
    records = completion_records([p for p, _ in held], texts, answer=answers, correct=correct, kind=kinds)
    if paired is not None:
        metrics.update(paired(step, accuracy_scores(records), [r["prompt"] for r in records]))
    return EvalResult(metrics=metrics, captions=texts, records=records)


def accuracy_scores(records: list[dict]) -> dict[str, list[float]]:
    """The per-example values :class:`PairedScores` pairs, from an evaluation's records (in memory, or read back
    from a run's :data:`FIRST_COMPLETIONS`): ``accuracy``, each answer's ``correct`` 0/1."""
    return {"accuracy": [float(r["correct"]) for r in records]}


def load_vlm_policy(cfg: Config, accelerator: Any, example_path: str) -> VLMPolicy:
    """The recipe's VLMPolicy from ``policy.options`` (with a reference model when ``loss.beta`` > 0);
    ``example_path``: what the error for an empty path suggests."""
    popts = options_from(VLMPolicyOptions, cfg.policy.options, "the config", "policy.options")
    if not popts.path:
        raise UserError(f"policy.options.path is empty; point it at a VLM directory or hub id, e.g. {example_path}")
    device = accelerator.device if accelerator is not None else None
    return VLMPolicy.from_pretrained(popts.path, popts, reference=cfg.loss.beta > 0, device=device)


def build_vlm_reasoning(cfg: Config, accelerator: Any = None) -> Components:
    data = options_from(VLMReasoningDataOptions, cfg.data.options, "the config", "data.options")
    examples = QAExamples(data)  # the data first: a bad file is named before the model loads
    check_example_keys(cfg, [(w, {**p, **m}) for w, (p, m) in zip(examples.lines, examples.records or [])])
    warn_short_evaluation(data.path, len(examples.heldout), data.eval_examples)
    warn_repeated_heldout(data.path, examples.records, examples.lines, examples.train, examples.heldout)
    policy = load_vlm_policy(cfg, accelerator, "assets/tiny_qwen2_vl (written by `python scripts/make_tiny_vlm.py`)")
    check_question_lengths(policy, examples.lines, examples.records)

    def evaluate(policy: VLMPolicy, step: int) -> EvalResult:
        return evaluate_accuracy(policy, examples, data.eval_examples, data.eval_batch, paired, step)

    prompts = QAPrompts(examples, cfg.run.seed, examples.train_example)
    comp = Components(policy=policy, prompts=prompts, evaluate=evaluate)
    paired = PairedScores(lambda: first_completions(comp), accuracy_scores)
    return comp


PIPELINES.add(
    "vlm_reasoning",
    Pipeline(
        build=build_vlm_reasoning,
        policy_options=VLMPolicyOptions,
        data_options=VLMReasoningDataOptions,
        description="R1-style GRPO of a VLM on image/video QA: format + accuracy (configs/vlm_reasoning_tiny.yaml)",
    ),
)
