"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a typo'd key, a missing file, an unknown name).
The CLI prints its message as one paragraph without a traceback (``--debug`` shows it); every other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


def as_shown(message: object, width: int = 100) -> str:
    """A message (a UserError, a warning's text) as the CLI prints it: its first line, the paragraph, wrapped to
    ``width`` columns with words and hyphenated names kept whole; the lines after it (the lines of a YAML file an
    error points at, each with a caret under the spot) kept as they are, since wrapping would run them into the
    paragraph and move the caret."""
    import textwrap

    head, *rest = str(message).split("\n")
    return "\n".join([textwrap.fill(head, width=width, break_long_words=False, break_on_hyphens=False), *rest])


def quoted(value: object, limit: int = 120) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (a 500 kB prompt must not be echoed); a
    bool or None as YAML and the command line spell it (``true``, ``false``, ``null``): what the user wrote."""
    text = ("true" if value else "false") if isinstance(value, bool) else "null" if value is None else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def listed(items: list, limit: int = 8) -> str:
    """``a, b, c, ...``: the first ``limit`` items of a list for an error message (rows, keys)."""
    return ", ".join(map(str, items[:limit])) + (", ..." if len(items) > limit else "")


def bad_option(key: str, value: object, rule: str) -> UserError:
    """The error of an option out of its range, as one paragraph: ``key=value: rule``, where ``rule`` says what is
    valid and the fix (``data.options.num_arms=0: a bandit needs at least 2 arms; set it to 2 or more``)."""
    return UserError(f"{key}={quoted(value, 60)}: {rule}")


def add_note(error: BaseException, note: str) -> None:
    """``note`` where the user reads it: in a UserError's one paragraph (the CLI prints only its message), else
    among the exception's notes (printed under its traceback; ``BaseException.add_note`` is Python 3.11's, so on
    3.10 the list is kept by hand, which the CLI's own printing of notes reads)."""
    if isinstance(error, UserError) and error.args:
        error.args = (f"{str(error.args[0]).rstrip('. ')}. {note}", *error.args[1:])
    elif hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: torch's (CUDA) ``OutOfMemoryError``, or the CPU allocator's
    ``RuntimeError`` ("can't allocate memory"); the callers turn it into a UserError naming the settings to lower."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to ``limit`` characters at the end of a sentence where one
    ends in them (torch's CUDA out-of-memory line runs to ~600 characters of allocator statistics)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[: end + 1] + " ..." if end > 0 else text[:limit] + "..."
