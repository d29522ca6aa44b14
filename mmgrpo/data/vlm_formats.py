"""Other VLM data formats, converted to the project's QA record ``{question, answer, images | image, ...}``.

- TRL's conversational format: ``{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
  "text": ...}]}], "images": [path], "solution": ...}`` (``answer`` instead of ``solution`` also works);
- LLaVA / ShareGPT: ``{"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": ...}]}``.

A record already in the project's format passes through unchanged. See docs/data.md.
"""

from __future__ import annotations

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
