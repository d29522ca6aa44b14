"""Recipe: R1-style visual reasoning with GRPO (see configs/vlm_reasoning_tiny.yaml).

A VLM (:class:`~mmgrpo.policies.vlm.VLMPolicy`: Qwen2-VL, Qwen2.5-VL, generic image-text-to-text) answers questions
about images or videos in the ``<think> ... </think><answer> ... </answer>`` format of DeepSeek-R1 (Guo et al. 2025),
as in R1-V and VLM-R1 (Shen et al. 2025); rewards are the verifiable ``format`` and ``accuracy`` of rewards/text.py.

Data, one example = ``{question, options?, answer, image | images | video, ...}``:

- ``data.options.path``: a JSONL file of such examples (media paths relative to the file; other keys go to meta);
- ``path: ""``: the built-in synthetic shapes QA, questions about scenes of the shapes world (mmgrpo/data/shapes.py)
  rendered on the fly: "How many red circles are there? A) 1 B) 2 C) 3", "Is there a blue square? A) yes B) no".

A seeded split holds out ``heldout_fraction`` of the examples; evaluation reports their accuracy and format rate
under greedy decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mmgrpo.core.components import PIPELINES, Components, EvalResult, Pipeline
from mmgrpo.core.config import Config, options_from
from mmgrpo.core.errors import UserError
from mmgrpo.core.types import PromptBatch
from mmgrpo.data import shapes
from mmgrpo.policies.vlm import VLMPolicy, VLMPolicyOptions
from rewards.text import answer_or_completion, grade, has_valid_format


@dataclass
class VLMReasoningDataOptions:
    path: str = ""
    """JSONL file of {question, options?, answer, image | images | video}; "" = synthetic shapes QA"""
    heldout_fraction: float = 0.1
    """fraction of the examples held out for evaluation"""
    split_seed: int = 0
    """seed of the train / held-out split"""
    num_examples: int = 512
    """synthetic shapes QA: number of distinct examples (train + held-out)"""
    image_size: int = 64
    """synthetic shapes QA: rendered image side in pixels"""
    eval_examples: int = 32
    """held-out examples answered (greedily) at each evaluation"""
    eval_batch: int = 8
    """prompts per generate call during evaluation"""


Example = tuple[dict, dict]  # (prompt {question, options}, meta {answer, images | video, ...})


def shapes_question(index: int, seed: int = 0, size: int = 64) -> Example:
    """Synthetic shapes QA example ``index`` (deterministic in (seed, index)): a counting or an existence question."""
    rng = np.random.default_rng([seed, index])
    color, shape = str(rng.choice(shapes.COLORS)), str(rng.choice(shapes.SHAPES))
    if rng.random() < 0.5:
        n = int(rng.integers(1, 4))
        scene = shapes.sample_scene(f"{shapes.COUNT_WORDS[n]} {color} {shape}{'s' if n > 1 else ''}", rng, 1)
        question, options, answer = f"How many {color} {shape}s are there?", ["1", "2", "3"], "ABC"[n - 1]
    else:
        present = bool(rng.random() < 0.5)
        prompt = f"a {color} {shape}"
        scene = shapes.sample_scene(prompt, rng, 2) if present else shapes.sample_mismatched_scene(prompt, rng)
        question, options, answer = f"Is there a {color} {shape}?", ["yes", "no"], "A" if present else "B"
    image = shapes.render(scene, size=size)
    objects = [(o.color, o.shape) for o in scene.objects]
    meta = {"answer": answer, "images": [image], "image_size": (size, size), "objects": objects, "index": index}
    return {"question": question, "options": options}, meta


def load_jsonl(path: str | Path) -> list[Example]:
    """Examples of a JSONL file; media paths are resolved against the file's directory."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data.options.path={str(path)!r} not found; give a JSONL file, or '' for synthetic shapes QA")
    out = []
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {i + 1} is not valid JSON: {e}") from e
        if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
            raise UserError(f"{path} line {i + 1}: each example needs 'question' and 'answer' keys; got {line[:80]!r}")
        meta = {k: v for k, v in rec.items() if k not in ("question", "options", "image", "images", "video")}
        images = rec.get("images") or ([rec["image"]] if rec.get("image") else [])
        meta["images"] = [str(p.parent / im) for im in images]
        if rec.get("video"):
            meta["video"] = str(p.parent / rec["video"])
        out.append(({"question": rec["question"], "options": rec.get("options")}, meta))
    if not out:
        raise UserError(f"{path} holds no examples")
    return out


class QAExamples:
    """Example pool: synthetic (rendered on demand) or loaded from JSONL; a seeded train / held-out split."""

    def __init__(self, data: VLMReasoningDataOptions):
        if not 0.0 < data.heldout_fraction < 1.0:
            raise UserError(f"data.options.heldout_fraction={data.heldout_fraction} must be in (0, 1), e.g. 0.1")
        self.data = data
        self.records = load_jsonl(data.path) if data.path else None
        n = len(self.records) if self.records is not None else data.num_examples
        if n < 2:
            raise UserError(f"the VLM reasoning data need at least 2 examples (train + held-out); got {n}")
        perm = np.random.default_rng(data.split_seed).permutation(n)
        n_held = min(max(1, round(data.heldout_fraction * n)), n - 1)
        self.heldout, self.train = sorted(perm[:n_held].tolist()), sorted(perm[n_held:].tolist())

    def example(self, i: int) -> Example:
        if self.records is not None:
            prompt, meta = self.records[i]
            return dict(prompt), dict(meta)
        return shapes_question(i, self.data.split_seed, self.data.image_size)


class QAPrompts:
    """Stream position i -> a train example, in a fresh seeded permutation for every pass over the train set."""

    def __init__(self, examples: QAExamples, order_seed: int):
        self.examples, self.order_seed = examples, order_seed

    def example_at(self, i: int) -> int:
        train = self.examples.train
        epoch, pos = divmod(i, len(train))
        return train[_permutation(self.order_seed, epoch, len(train))[pos]]

    def get(self, indices: list[int]) -> PromptBatch:
        picked = [self.examples.example(self.example_at(i)) for i in indices]
        return PromptBatch(prompts=[p for p, _ in picked], meta=[m for _, m in picked])


@lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def evaluate_accuracy(policy: VLMPolicy, examples: QAExamples, n: int, batch: int) -> EvalResult:
    """Greedy answers to the first ``n`` held-out examples: accuracy and format rate."""
    held = [examples.example(i) for i in examples.heldout[:n]]
    texts: list[str] = []
    for lo in range(0, len(held), max(1, batch)):
        part = held[lo : lo + batch]
        texts += policy.generate(PromptBatch(prompts=[p for p, _ in part], meta=[m for _, m in part]), greedy=True)
    correct = [float(grade(answer_or_completion(t), m["answer"])) for t, (_, m) in zip(texts, held)]
    fmt = [float(has_valid_format(t)) for t in texts]
    return EvalResult(metrics={"accuracy": float(np.mean(correct)), "format": float(np.mean(fmt))}, captions=texts)


def build_vlm_reasoning(cfg: Config, accelerator: Any = None) -> Components:
    data = options_from(VLMReasoningDataOptions, cfg.data.options, "the config", "data.options")
    popts = options_from(VLMPolicyOptions, cfg.policy.options, "the config", "policy.options")
    if not popts.model:
        raise UserError(
            "policy.options.model is empty; point it at a VLM directory or hub id, e.g. assets/tiny_qwen2_vl "
            "(written by `python pipelines/make_tiny_vlm.py`)"
        )
    device = accelerator.device if accelerator is not None else None
    policy = VLMPolicy.from_pretrained(popts.model, popts, reference=cfg.loss.beta > 0, device=device)
    examples = QAExamples(data)

    def evaluate(policy: VLMPolicy, step: int) -> EvalResult:
        return evaluate_accuracy(policy, examples, data.eval_examples, data.eval_batch)

    return Components(policy=policy, prompts=QAPrompts(examples, cfg.run.seed), evaluate=evaluate)


PIPELINES.add(
    "vlm_reasoning",
    Pipeline(
        build=build_vlm_reasoning,
        policy_options=VLMPolicyOptions,
        data_options=VLMReasoningDataOptions,
        description="R1-style GRPO of a VLM on image/video QA: format + accuracy (configs/vlm_reasoning_tiny.yaml)",
    ),
)
