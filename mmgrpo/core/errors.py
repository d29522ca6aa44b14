"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a typo'd key, a missing file, an unknown name).
The CLI prints its message as one paragraph without a traceback (``--debug`` shows it); every other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


def quoted(value: object, limit: int = 120) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (a 500 kB prompt must not be echoed)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
