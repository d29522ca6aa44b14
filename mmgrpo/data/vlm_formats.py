"""Other VLM data formats, converted to the project's QA record ``{question, answer, images | image, ...}``.

- TRL's conversational format: ``{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
  "text": ...}]}], "images": [path], "solution": ...}`` (``answer`` instead of ``solution`` also works; ``<image>``
  tags in the text are counted and removed as LLaVA's are);
- LLaVA / ShareGPT: ``{"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": ...}]}`` (``image`` may be a list of paths, as LLaVA-OneVision's multi-image records
  hold: they become ``images``).

A record already in the project's format passes through unchanged. A conversion never drops a part silently: an
unknown role, a conversation without a question or an answer, and a count of image placeholders (``{"type":
"image"}``, ``<image>``) other than the record's number of images are errors naming the line; the parts that are
read but not used (system turns, the turns after the first question and answer) are listed under ``IGNORED`` for
the loader to warn about once per file. Grounding records (``{image, question, box}``)
also come from these two formats and from VLM-R1's referring-expression files (``{image, problem, solution}``), the
answer or solution being the box ``[x1, y1, x2, y2]`` in pixels of the image (a list, or text holding it, such as
``"<answer>[12, 30, 80, 95]</answer>"``): :func:`to_grounding_record`. See docs/data.md.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mmgrpo.core.errors import UserError, quoted
from mmgrpo.data.hf_datasets import StoredImage

IGNORED = "_ignored"
"""key of a converted record: the parts of the original that were not used (a list of short descriptions)"""
TRL_ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _text_of(content: Any, where: str) -> str:
    """The text of a chat message's ``content``: a string, or the 'text' parts of a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict) and "text" in part)
    raise UserError(f"{where}: a message's 'content' must be a string or a list of parts, got {quoted(content)}")


def _n_images(rec: dict) -> int:
    """The number of images a record names: a list's length (``images``, or ``image`` as LLaVA-OneVision writes
    it), else 1 for one path (``image``, or ``images`` holding one path instead of a list), else 0. Counting only
    ``images`` lists and ``image`` paths told a record with two images in ``image`` that it named one."""
    for value in (rec.get("images"), rec.get("image")):
        if isinstance(value, list):
            return len(value)
        if value not in (None, ""):
            return 1
    return 0


def _image_list(rec: dict) -> dict:
    """A converted record with its images where the loader reads them: a list under ``image`` (LLaVA-OneVision's
    multi-image records) moved to ``images``, and one path (or stored image) under ``images`` made a list of it;
    a record naming both keys is left for the loader to refuse."""
    image, images = rec.get("image"), rec.get("images")
    if isinstance(image, list) and images is None:
        rec = {k: v for k, v in rec.items() if k != "image"}
        rec["images"] = image
    elif isinstance(images, str | StoredImage) and image is None:
        rec = {**rec, "images": [images]}
    return rec


def _check_placeholders(placeholders: int, rec: dict, what: str, where: str) -> None:
    if placeholders and placeholders != _n_images(rec):
        raise UserError(f"{where}: the question holds {placeholders} {what} placeholder(s) but the example names "
                        f"{_n_images(rec)} image(s); give one image per placeholder (image / images)")  # fmt: skip


def from_trl(rec: dict, where: str) -> dict:
    """TRL's conversational prompt (the user turns' text is the question; 'solution' or 'answer' the answer)."""
    messages = rec["prompt"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise UserError(f"{where}: 'prompt' must be a list of {{role, content}} messages, got {quoted(messages)}")
    roles = [m.get("role", "user") for m in messages]
    unknown = [r for r in roles if r not in TRL_ROLES]
    if unknown:
        raise UserError(f"{where}: unknown role {quoted(unknown[0], 40)} in 'prompt'; a message's role is one of "
                        f"{', '.join(TRL_ROLES)}")  # fmt: skip
    if "assistant" in roles:
        raise UserError(f"{where}: 'prompt' holds an 'assistant' turn; an example asks one question: keep the user "
                        "turn(s) in 'prompt' and put the answer in 'solution'")  # fmt: skip
    if "solution" not in rec and "answer" not in rec:
        raise UserError(f"{where}: a TRL conversational example needs a 'solution' (or 'answer'); got {sorted(rec)}")
    users = [m for m, r in zip(messages, roles) if r == "user"]
    question = "\n".join(_text_of(m.get("content"), where) for m in users)
    parts = [p for m in users if isinstance(m.get("content"), list) for p in m["content"]]
    _check_placeholders(sum(isinstance(p, dict) and p.get("type") == "image" for p in parts), rec, "image", where)
    # '<image>' tags in the text (string content, or a text part) are counted and removed as LLaVA's are: left in,
    # the model read the literal tag and a wrong count passed
    _check_placeholders(question.count("<image>"), rec, "<image>", where)
    question = question.replace("<image>", "").strip()
    if not question:
        raise UserError(f"{where}: 'prompt' has no user turn with text, so there is no question; got "
                        f"{quoted(messages)}")  # fmt: skip
    out = _image_list({k: v for k, v in rec.items() if k not in ("prompt", "solution")})
    out["question"] = question
    out["answer"] = rec["solution"] if "solution" in rec else rec["answer"]
    if "system" in roles:
        out[IGNORED] = ["a system turn"]
    return out


def from_llava(rec: dict, where: str) -> dict:
    """LLaVA conversations: the first human turn (without '<image>') is the question, the next gpt turn the answer."""
    turns = rec["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} turns, got {quoted(turns)}")
    for t in turns:
        if t.get("from") not in LLAVA_ROLES:
            raise UserError(f"{where}: unknown turn 'from': {quoted(t.get('from'), 40)} in 'conversations'; a turn "
                            f"is from one of {', '.join(LLAVA_ROLES)}")  # fmt: skip
        if not isinstance(t.get("value"), str | int | float) or isinstance(t.get("value"), bool):
            raise UserError(f"{where}: a {t['from']!r} turn's 'value' must be text, got {quoted(t.get('value'))}")
    roles = [LLAVA_ROLES[t["from"]] for t in turns]
    human = next((i for i, r in enumerate(roles) if r == "user"), None)
    gpt = next((i for i in range((human or 0) + 1, len(turns)) if roles[i] == "assistant"), None)
    if human is None or gpt is None:
        raise UserError(f"{where}: 'conversations' needs a 'human' turn followed by a 'gpt' turn; got {quoted(turns)}")
    text = str(turns[human]["value"])
    _check_placeholders(text.count("<image>"), rec, "<image>", where)
    out = _image_list({k: v for k, v in rec.items() if k != "conversations"})
    out.update(question=text.replace("<image>", "").strip(), answer=str(turns[gpt]["value"]).strip())
    ignored = ["a system turn"] if "system" in roles else []
    if any(r != "system" for r in roles[gpt + 1 :]):
        ignored.append("the turns after the first answer")
    if ignored:
        out[IGNORED] = ignored
    return out


def _without_image_tags(rec: Any, where: str) -> Any:
    """A record of the project's format with the ``<image>`` placeholders of its question removed (their count
    checked against its images)."""
    if isinstance(rec, dict) and isinstance(rec.get("question"), str) and "<image>" in rec["question"]:
        _check_placeholders(rec["question"].count("<image>"), rec, "<image>", where)
        return {**rec, "question": rec["question"].replace("<image>", "").strip()}
    return rec


def to_qa_record(rec: Any, where: str) -> Any:
    """``rec`` in the project's QA format (unchanged when it already is, or when it is no known format); a question
    of the project's format holding ``<image>`` placeholders has them removed, as LLaVA's are (the images are placed
    by the chat template), once their count matches the images."""
    if not isinstance(rec, dict) or "question" in rec:
        return _without_image_tags(rec, where)
    if isinstance(rec.get("prompt"), list):
        return from_trl(rec, where)
    if "conversations" in rec:
        return from_llava(rec, where)
    return rec


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_box_value(value: Any, where: str) -> list[float]:
    """``[x1, y1, x2, y2]`` from a list of 4 numbers or from text holding exactly one bracketed list of 4 numbers
    (``"[12, 30, 80, 95]"``, ``"<answer>[12,30,80,95]</answer>"``); anything else is a UserError naming ``where``."""
    box = None
    if isinstance(value, list | tuple) and len(value) == 4:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            try:
                box = [float(v) for v in value]
            except OverflowError:  # an integer past a float's range (a JSON file's is refused as it is parsed)
                box = None
    elif isinstance(value, str):
        lists = re.findall(r"\[([^\[\]]*)\]", value)
        numbers = [_NUMBER.findall(x) for x in lists]
        found = [n for n in numbers if len(n) == 4]
        if len(found) == 1:
            box = [float(v) for v in found[0]]
    if box is not None and all(math.isfinite(v) for v in box):
        return box
    raise UserError(
        f"{where}: box must be [x1, y1, x2, y2] in image pixels (a list, or text holding one such list); "
        f"got {quoted(value)}"
    )


def to_grounding_record(rec: Any, where: str) -> Any:
    """``rec`` as the project's grounding record ``{image, question, box, ...}``: TRL conversational and LLaVA
    records (their answer is the box), VLM-R1's ``{image, problem, solution}``; the project's own and unknown records
    pass through unchanged (the caller names missing keys)."""
    if not isinstance(rec, dict) or "box" in rec:
        return _without_image_tags(rec, where)
    if "problem" in rec and "solution" in rec and "question" not in rec:  # VLM-R1 REC
        out = {k: v for k, v in rec.items() if k not in ("problem", "solution")}
        out.update(question=rec["problem"], box=parse_box_value(rec["solution"], where))
        return _one_image(out, where)
    qa = to_qa_record(rec, where)
    if qa is rec or "answer" not in qa:
        return rec
    out = {k: v for k, v in qa.items() if k != "answer"}
    out["box"] = parse_box_value(qa["answer"], where)
    return _one_image(out, where)


def _one_image(rec: dict, where: str) -> dict:
    """Grounding asks about one image: ``images: [path]`` (TRL) becomes ``image``."""
    if "image" in rec or "images" not in rec:
        return rec
    images = rec.pop("images")
    if not isinstance(images, list) or len(images) != 1:
        raise UserError(f"{where}: a grounding example has exactly one image; got images={quoted(images)}")
    rec["image"] = images[0]
    return rec
