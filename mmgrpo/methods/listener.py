"""Listener-rewarded thinking: a frozen VLM re-reads the reasoner's chain of thought and must reach the right answer.
The whole method: the rewards ``listener`` (any scorer) and ``vlm_listener`` (a frozen VLM loaded like the policy).

"Listener-Rewarded Thinking in VLMs for Image Preferences" (Gambashidze et al. 2025): besides format and accuracy,
each completion earns the *listener's confidence* in the correct answer. The reasoner's chain of thought, with its
final answer removed, is shown to a frozen "listener" VLM together with the original prompt; the listener scores
every candidate answer (log-prob of the candidate as its reply) and the confidence is the softmax over the
candidates, read at the correct one. A correct answer whose reasoning does not convince the listener earns less
than one whose reasoning does:

    reward = w_fmt * format + w_acc * accuracy + w_lis * confidence        (defaults 1, 0.5, 0.5)

``format`` is the R1 template check and ``accuracy`` the graded final answer (both as in :mod:`mmgrpo.rewards.text`).

The listener is a ``scorer(prompts, meta, reasoning_texts, candidate_answers) -> Tensor[n, C]`` of log-probs
(C = the most candidates of any row; entries past a row's own candidates are ignored). Pass ``scorer=`` directly,
or ``model=<checkpoint dir or hub id>`` to build :class:`HFListenerScorer` on the first call: transformers
``AutoModelForImageTextToText`` + ``AutoProcessor`` (safetensors only), scoring each candidate as the assistant's
reply to "<prompt> <reasoning> Based on this reasoning, the answer is:", summing the candidate's token log-probs.

Candidates come from ``meta[candidates_key]`` (a list of answers) or, failing that, the letters A, B, ... of
``meta[options_key]``; the correct candidate is the first one that :func:`mmgrpo.rewards.text.grade` accepts for
``meta[answer_key]``. Rows without a ground-truth answer get None.

``vlm_listener`` is ``listener`` with a scorer that fits the ``vlm_reasoning`` recipe:

- the listener VLM is loaded by :func:`mmgrpo.policies.vlm.load_vlm`, the policy's own loading path (safetensors,
  the family's class, ``dtype``), lazily on the first call, frozen (no grad, eval);
- its prompt is the question WITH its lettered options (``question_text``: "How many ...? A) 1 B) 2 C) 3"; the
  plain ``listener`` reads only ``text``/``prompt``/``content`` keys and would see an empty question), then the
  reasoning, in the model's chat template with the row's images (resized to ``max_pixels`` like the policy's);
- candidates are the option letters A, B, ... (the policy copies a prompt's ``options`` into each row's meta) or
  ``meta["candidates"]``; each candidate's log-prob is the sum of its tokens' log-probs as the assistant's reply.

The method is a reward: listing ``listener`` or ``vlm_listener`` under ``rewards:`` runs it; ``methods: {listener:
{}}`` also checks that one is listed and that the recipe is ``vlm_reasoning`` (:data:`METHOD`).

>>> strip_answer("<think>the left image is sharper</think> <answer>Image 1</answer>")
'the left image is sharper'
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmgrpo.core.errors import UserError, bad_option
from mmgrpo.core.extras import needs
from mmgrpo.core.safe_weights import NO_HUB_KERNELS, refuse_pickle_weights
from mmgrpo.methods.registry import Method, register_method
from mmgrpo.policies.sources import ModelSource, resolve_source
from mmgrpo.policies.vlm import VLMPolicyOptions, load_vlm
from mmgrpo.policies.vlm_families import VLM_FAMILIES
from mmgrpo.policies.vlm_inputs import load_image, question_text
from mmgrpo.rewards.registry import register
from mmgrpo.rewards.text import answer_or_completion, check_mode, completion_text, grade, has_valid_format

Scorer = Callable[[list[Any], list[dict], list[str], list[list[str]]], torch.Tensor]


def _blocks(tag: str) -> re.Pattern:
    t = re.escape(tag)
    return re.compile(rf"<{t}>(.*?)</{t}>", re.DOTALL)


def strip_answer(completion: str, think_tag: str = "think", answer_tag: str = "answer") -> str:
    """The reasoning only: every ``<answer>`` block removed, then the ``<think>`` block's content if there is one.

    Only tagged answers are removed: an untagged "so the answer is B" inside the reasoning stays (it is reasoning).
    """
    text = _blocks(answer_tag).sub("", completion)
    thinks = _blocks(think_tag).findall(text)
    return (" ".join(t.strip() for t in thinks) if thinks else text).strip()


def candidate_answers(meta: dict, candidates_key: str = "candidates", options_key: str = "options") -> list[str]:
    """The answers the listener chooses between: meta[candidates_key], else (missing or empty, as the load-time check
    reads it) letters A.. for meta[options_key]."""
    cands = meta.get(candidates_key)
    if not cands and meta.get(options_key):
        cands = list(string.ascii_uppercase[: len(meta[options_key])])
    if not cands:
        raise UserError(
            f"listener: a row has no candidate answers; set meta[{candidates_key!r}] = ['Image 1', 'Image 2', ...] "
            f"or meta[{options_key!r}] = [option texts] (candidates are then the letters A, B, ...)"
        )
    return [str(c) for c in cands]


def correct_index(candidates: list[str], gt: Any, mode: str = "auto") -> int:
    """Index of the first candidate that grades as correct for ``gt``."""
    for i, c in enumerate(candidates):
        if grade(c, gt, mode):
            return i
    raise UserError(f"listener: none of the candidates {candidates} matches the ground truth {gt!r}; fix the meta")


def listener_confidence(logp: torch.Tensor, counts: list[int], correct: list[int]) -> torch.Tensor:
    """Softmax over each row's candidates at its correct one.

    logp [n, C] log-probs, counts [n] candidates per row (<= C), correct [n] index -> confidence [n] (fp32).
    """
    logp = logp.detach().float().cpu()
    n, C = logp.shape
    if len(counts) != n or max(counts, default=0) > C:
        raise ValueError(f"listener: scorer returned shape {tuple(logp.shape)} for {n} rows of {counts} candidates")
    valid = torch.arange(C)[None, :] < torch.tensor(counts)[:, None]  # [n, C]
    probs = torch.softmax(logp.masked_fill(~valid, float("-inf")), dim=-1)  # [n, C]
    return probs[torch.arange(n), torch.tensor(correct, dtype=torch.long)]


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: a str, ``{"text"|"prompt"|"content": str}``, or chat messages (their text parts)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        for key in ("text", "prompt", "content"):
            if key in prompt:
                return prompt_text(prompt[key])
    if isinstance(prompt, list | tuple):
        return "\n".join(t for t in (prompt_text(p) for p in prompt) if t)
    return ""


def _images(meta: dict) -> list[Any]:
    """meta["images"] (list) or meta["image"]: PIL images or paths (opened as RGB)."""
    imgs = meta.get("images")
    if imgs is None:
        imgs = [meta["image"]] if meta.get("image") is not None else []
    out = []
    for im in imgs:
        if isinstance(im, str | Path):
            im = load_image(im)  # as the policy sees it: upright, 16-bit and transparent images as they look
        out.append(im)
    return out


def _extend(inputs: dict[str, torch.Tensor], shape: torch.Size, extra: int) -> dict[str, torch.Tensor]:
    """Per-token processor outputs [1, L] (attention mask, token types) extended by ``extra`` answer tokens.

    The answer tokens are attended (mask 1) and are text (token type 0); other inputs (pixels, grids) are unchanged.
    """
    out = {}
    for k, v in inputs.items():
        if v.shape == shape:
            pad = torch.ones if k == "attention_mask" else torch.zeros
            v = torch.cat([v, pad((1, extra), dtype=v.dtype, device=v.device)], dim=1)
        out[k] = v
    return out


class HFListenerScorer:
    """A frozen transformers VLM scoring candidate answers after a reasoning: ``sum_t log p(candidate_t | prefix)``.

    The prefix is the processor's chat template (user turn: the images, the prompt, the reasoning and "Based on this
    reasoning, the answer is:"; then the assistant header); the candidate's tokens (tokenised alone, no special
    tokens) are appended to the prefix ids, so the split between prefix and answer is exact. One forward per
    (row, candidate), fp32 log-softmax. Images only (meta "images"/"image"); video rows are scored from text.
    """

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu"):
        self.model, self.processor, self.device = model.eval(), processor, torch.device(device)

    @classmethod
    def from_pretrained(
        cls, path: str | Path | ModelSource, device: str = "cpu", dtype: str = "float32"
    ) -> HFListenerScorer:
        """The frozen VLM at ``path``: a local folder, a hub id or a resolved source (revision, variant)."""
        with needs("vlm", "the vlm_listener reward"):
            from transformers import AutoModelForImageTextToText, AutoProcessor

        src = resolve_source(path, "rewards.<listener>.options.model")
        refuse_pickle_weights(src.path, src.key, "transformers.AutoModelForImageTextToText")
        hint = "Pass a checkpoint of an image-text-to-text model (safetensors + processor)"
        try:
            with src.errors(hint):
                processor = AutoProcessor.from_pretrained(src.path, **src.files())
                model = AutoModelForImageTextToText.from_pretrained(
                    src.path, dtype=getattr(torch, dtype), **src.weights(), **NO_HUB_KERNELS
                )
        except (ValueError, AttributeError) as e:
            raise UserError(f"listener: cannot load a VLM from model={src.describe()}: {e}. {hint}") from e
        model.requires_grad_(False)
        return cls(model.to(device), processor, device)

    def _prefix(self, prompt: Any, meta: dict, reasoning: str) -> dict[str, torch.Tensor]:
        images = _images(meta)
        text = f"{prompt_text(prompt)}\n\nReasoning:\n{reasoning}\n\nBased on this reasoning, the answer is:"
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        chat = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(text=[chat], images=images or None, return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    @torch.no_grad()
    def __call__(self, prompts, meta, reasoning_texts, candidate_answers) -> torch.Tensor:  # -> [n, C]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        C = max(len(c) for c in candidate_answers)
        out = torch.full((len(prompts), C), float("-inf"))
        for i, (p, m, r, cands) in enumerate(zip(prompts, meta, reasoning_texts, candidate_answers)):
            prefix = self._prefix(p, m, r)
            ids = prefix.pop("input_ids")  # [1, L]
            for j, cand in enumerate(cands):
                cand_ids = torch.tensor([tokenizer(cand, add_special_tokens=False)["input_ids"]], device=self.device)
                full = torch.cat([ids, cand_ids], dim=1)  # [1, L + l]
                logits = self.model(input_ids=full, **_extend(prefix, ids.shape, cand_ids.shape[1])).logits
                # fp32: candidate log-probs are compared across candidates; bf16 rounding would reorder close ones
                logp = torch.log_softmax(logits[0, ids.shape[1] - 1 : -1].float(), dim=-1)  # [l, V]
                out[i, j] = logp.gather(-1, cand_ids[0, :, None]).sum().cpu()
        return out


@dataclass
class ListenerReward:
    """The ``listener`` reward callable; a ``model`` scorer is built on the first call (``scorer`` None before)."""

    scorer: Scorer | None
    model: ModelSource | None
    weights: tuple[float, float, float]  # (w_fmt, w_acc, w_lis)
    mode: str = "auto"
    answer_key: str = "answer"
    candidates_key: str = "candidates"
    options_key: str = "options"
    device: str = "cpu"
    think_tag: str = "think"
    answer_tag: str = "answer"

    def __call__(self, samples, prompts, meta, ctx) -> list[float | None]:  # samples: N completions; meta: N dicts
        if len(samples) != len(meta):
            raise ValueError(f"listener: {len(samples)} samples but {len(meta)} meta dicts")
        texts = [completion_text(s) for s in samples]
        rows = [i for i, m in enumerate(meta) if m.get(self.answer_key) is not None]
        out: list[float | None] = [None] * len(texts)
        if not rows:
            return out
        cands = [candidate_answers(meta[i], self.candidates_key, self.options_key) for i in rows]
        correct = [correct_index(c, meta[i][self.answer_key], self.mode) for c, i in zip(cands, rows)]
        if self.scorer is None:
            self.scorer = HFListenerScorer.from_pretrained(self.model, self.device)
        reasoning = [strip_answer(texts[i], self.think_tag, self.answer_tag) for i in rows]
        logp = self.scorer([prompts[i] for i in rows], [meta[i] for i in rows], reasoning, cands)  # [n, C]
        conf = listener_confidence(torch.as_tensor(logp), [len(c) for c in cands], correct)  # [n]
        w_fmt, w_acc, w_lis = self.weights
        for i, c in zip(rows, conf.tolist()):
            fmt = float(has_valid_format(texts[i], self.think_tag, self.answer_tag))
            acc = float(grade(answer_or_completion(texts[i], self.answer_tag), meta[i][self.answer_key], self.mode))
            out[i] = w_fmt * fmt + w_acc * acc + w_lis * c
        return out


@register("listener")
def listener(
    model: str | None = None,
    scorer: Scorer | None = None,
    w_fmt: float = 1.0,
    w_acc: float = 0.5,
    w_lis: float = 0.5,
    mode: str = "auto",
    answer_key: str = "answer",
    candidates_key: str = "candidates",
    options_key: str = "options",
    device: str = "cpu",
    think_tag: str = "think",
    answer_tag: str = "answer",
    revision: str | None = None,
    variant: str | None = None,
):
    """Listener-rewarded thinking: w_fmt * format + w_acc * accuracy + w_lis * frozen-VLM confidence in the answer.

    ``model``: an image-text-to-text checkpoint, a local folder or a hub id (``revision``, ``variant``: as the
    policy's options), loaded lazily and frozen; or ``scorer``: a callable ``(prompts, meta, reasoning_texts,
    candidate_answers) -> Tensor[n, C]`` of log-probs. Rows without meta[answer_key] get None.
    """
    if (model is None) == (scorer is None):
        raise UserError("listener: give exactly one of model=<VLM folder or hub id> or scorer=<callable>")
    check_mode("listener", mode)
    source = None
    if model is not None:
        source = resolve_source(model, "rewards.<listener>.options.model", revision, variant)
    weights = (float(w_fmt), float(w_acc), float(w_lis))
    return ListenerReward(
        scorer, source, weights, mode, answer_key, candidates_key, options_key, device, think_tag, answer_tag
    )


# ---------------------------------------- vlm_listener: the frozen listener is a VLM loaded like the policy


class VLMListenerScorer(HFListenerScorer):
    """:class:`HFListenerScorer` reading recipe prompts ``{question, options}`` and meta images (arrays, paths)."""

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu", max_pixels: int | None = None):
        super().__init__(model, processor, device)
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        family: str = "auto",
        revision: str | None = None,
        variant: str | None = None,
        **kw: Any,
    ) -> VLMListenerScorer:
        """The frozen listener VLM, loaded by :func:`~mmgrpo.policies.vlm.load_vlm` as the policy is."""
        # it writes nothing (it scores the candidates): the policy's default of 128 new tokens refused a listener
        # with a context of 128 or less, naming policy.options.max_new_tokens, which it does not read
        options = VLMPolicyOptions(path=str(path), dtype=dtype, family=family, revision=revision, variant=variant,
                                   max_new_tokens=1)  # fmt: skip
        model, processor = load_vlm(str(path), options, key="rewards.<vlm_listener>.options.model")
        model.requires_grad_(False)
        return cls(model.to(device), processor, device, kw.get("max_pixels"))

    def _prefix(self, prompt: Any, meta: dict, reasoning: str) -> dict[str, torch.Tensor]:
        images = meta.get("images") or ([meta["image"]] if meta.get("image") is not None else [])
        images = [load_image(im, self.max_pixels) for im in images]
        return super()._prefix({"text": question_text(prompt)}, {"images": images}, reasoning)


class LazyListener:
    """Scorer callable that loads the frozen VLM on its first call (a reward factory must not load weights)."""

    def __init__(self, path: str, **options: Any):
        self.path, self.options = path, options
        self.scorer: VLMListenerScorer | None = None

    def __call__(self, prompts, meta, reasoning_texts, candidate_answers) -> torch.Tensor:  # -> [n, C]
        if self.scorer is None:
            self.scorer = VLMListenerScorer.from_pretrained(self.path, **self.options)
        return self.scorer(prompts, meta, reasoning_texts, candidate_answers)


@register("vlm_listener")
def vlm_listener(
    model: str = "",
    w_fmt: float = 1.0,
    w_acc: float = 0.5,
    w_lis: float = 0.5,
    mode: str = "auto",
    answer_key: str = "answer",
    device: str = "cpu",
    dtype: str = "float32",
    family: str = "auto",
    max_pixels: int | None = None,
    think_tag: str = "think",
    answer_tag: str = "answer",
    revision: str | None = None,
    variant: str | None = None,
):
    """Listener reward with a frozen VLM loaded like the policy: w_fmt*format + w_acc*accuracy + w_lis*confidence.

    ``model``: a local VLM directory (e.g. assets/tiny_qwen2_vl) or a hub id, with ``revision`` / ``variant`` as the
    policy's options. Candidates: the option letters of each row.
    """
    if not model:
        raise UserError("vlm_listener: model is empty; give a VLM checkpoint directory (e.g. assets/tiny_qwen2_vl, "
                        "written by `python scripts/make_tiny_vlm.py`) or a hub id")  # fmt: skip
    check_mode("vlm_listener", mode)
    src = resolve_source(model, "rewards.<vlm_listener>.options.model", revision, variant)
    scorer = LazyListener(src.path, device=device, dtype=dtype, family=family, max_pixels=max_pixels,
                          revision=src.revision, variant=src.variant)  # fmt: skip
    weights = (float(w_fmt), float(w_acc), float(w_lis))
    return ListenerReward(
        scorer, None, weights, mode, answer_key, "candidates", "options", device, think_tag, answer_tag
    )


def _check_vlm_listener(prefix: str, family: str = "auto", max_pixels: int | None = None) -> None:
    """At config load: the listener VLM is loaded lazily in the first step, where a bad family (blamed on
    policy.options.family) or max_pixels -1 (a math domain error) left a run directory behind."""
    if family != "auto" and family not in VLM_FAMILIES and "." not in family:
        raise bad_option(f"{prefix}.family", family, "use auto (the family of the listener's config.model_type) or "
                         f"a registered family. {VLM_FAMILIES.unknown_message(family)}")  # fmt: skip
    if max_pixels is not None and max_pixels < 1:
        raise bad_option(f"{prefix}.max_pixels", max_pixels, "the listener's images are resized to at most this many "
                         "pixels: set a number >= 1, or null for the processor's own limit")  # fmt: skip


vlm_listener.check = _check_vlm_listener  # type: ignore[attr-defined]


METHOD = register_method(
    Method(
        name="listener",
        paper="Listener-rewarded thinking (Gambashidze et al. 2025): a frozen VLM must be convinced by the reasoning",
        pipelines=("vlm_reasoning",),
        rewards=("listener", "vlm_listener"),
        reward_switched=True,
        data_keys=("answer", "options"),
        data_keys_needed={"answer": "none", "options": "each"},  # the recipe checks the answer; candidate_answers
        data_key_stand_ins={"options": ("candidates",)},  # fails on a row without candidates or options
    )
)
