"""Other VLM data formats, converted to the project's QA record ``{question, answer, images | image, ...}``.

- TRL's conversational format: ``{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
  "text": ...}]}], "images": [path], "solution": ...}`` (``answer`` instead of ``solution`` also works);
- LLaVA / ShareGPT: ``{"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": ...}]}``.

A record already in the project's format passes through unchanged. Grounding records (``{image, question, box}``)
also come from these two formats and from VLM-R1's referring-expression files (``{image, problem, solution}``), the
answer or solution being the box ``[x1, y1, x2, y2]`` in pixels of the image (a list, or text holding it, such as
``"<answer>[12, 30, 80, 95]</answer>"``): :func:`to_grounding_record`. See docs/data.md.
"""

from __future__ import annotations

import re
from typing import Any

from mmgrpo.core.errors import UserError, quoted


def _text_of(content: Any, where: str) -> str:
    """The text of a chat message's ``content``: a string, or the 'text' parts of a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict) and "text" in part)
    raise UserError(f"{where}: a message's 'content' must be a string or a list of parts, got {quoted(content)}")


def from_trl(rec: dict, where: str) -> dict:
    """TRL's conversational prompt (the user turns' text is the question; 'solution' or 'answer' the answer)."""
    messages = rec["prompt"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise UserError(f"{where}: 'prompt' must be a list of {{role, content}} messages, got {quoted(messages)}")
    question = "\n".join(_text_of(m.get("content"), where) for m in messages if m.get("role", "user") == "user")
    if "solution" not in rec and "answer" not in rec:
        raise UserError(f"{where}: a TRL conversational example needs a 'solution' (or 'answer'); got {sorted(rec)}")
    out = {k: v for k, v in rec.items() if k not in ("prompt", "solution")}
    out["question"] = question.strip()
    out["answer"] = rec["solution"] if "solution" in rec else rec["answer"]
    return out


def from_llava(rec: dict, where: str) -> dict:
    """LLaVA conversations: the first human turn (without '<image>') is the question, the next gpt turn the answer."""
    turns = rec["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} turns, got {quoted(turns)}")
    human = next((i for i, t in enumerate(turns) if t.get("from") in ("human", "user")), None)
    gpt = next((t for t in turns[(human or 0) + 1 :] if t.get("from") in ("gpt", "assistant")), None)
    if human is None or gpt is None:
        raise UserError(f"{where}: 'conversations' needs a 'human' turn followed by a 'gpt' turn; got {quoted(turns)}")
    question = str(turns[human].get("value", "")).replace("<image>", "").strip()
    out = {k: v for k, v in rec.items() if k != "conversations"}
    out.update(question=question, answer=str(gpt.get("value", "")).strip())
    return out


def to_qa_record(rec: Any, where: str) -> Any:
    """``rec`` in the project's QA format (unchanged when it already is, or when it is no known format)."""
    if not isinstance(rec, dict) or "question" in rec:
        return rec
    if isinstance(rec.get("prompt"), list):
        return from_trl(rec, where)
    if "conversations" in rec:
        return from_llava(rec, where)
    return rec


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_box_value(value: Any, where: str) -> list[float]:
    """``[x1, y1, x2, y2]`` from a list of 4 numbers or from text holding exactly one bracketed list of 4 numbers
    (``"[12, 30, 80, 95]"``, ``"<answer>[12,30,80,95]</answer>"``); anything else is a UserError naming ``where``."""
    if isinstance(value, list | tuple) and len(value) == 4 and all(isinstance(v, int | float) for v in value):
        return [float(v) for v in value]
    if isinstance(value, str):
        lists = re.findall(r"\[([^\[\]]*)\]", value)
        numbers = [_NUMBER.findall(x) for x in lists]
        found = [n for n in numbers if len(n) == 4]
        if len(found) == 1:
            return [float(v) for v in found[0]]
    raise UserError(
        f"{where}: box must be [x1, y1, x2, y2] in image pixels (a list, or text holding one such list); "
        f"got {quoted(value)}"
    )


def to_grounding_record(rec: Any, where: str) -> Any:
    """``rec`` as the project's grounding record ``{image, question, box, ...}``: TRL conversational and LLaVA
    records (their answer is the box), VLM-R1's ``{image, problem, solution}``; the project's own and unknown records
    pass through unchanged (the caller names missing keys)."""
    if not isinstance(rec, dict) or "box" in rec:
        return rec
    if "problem" in rec and "solution" in rec and "question" not in rec:  # VLM-R1 REC
        out = {k: v for k, v in rec.items() if k not in ("problem", "solution")}
        out.update(question=str(rec["problem"]), box=parse_box_value(rec["solution"], where))
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
