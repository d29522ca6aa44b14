"""Progress bars for long work inside a run that is not a training step: an evaluation's batches (the grounding
recipe's 512 held-out scenes take minutes on a CPU, with nothing on screen but the paused step bar).

The trainer decides whether bars are shown (``trainer.progress``, the main process) and names them with
:func:`shown`; code that batches long work calls :func:`batches`, which draws a bar only inside ``shown`` and is a
plain ``range`` anywhere else (tests, library callers, other ranks)."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmgrpo_progress_label", default=None)


@contextmanager
def shown(label: str | None) -> Iterator[None]:
    """Within this block :func:`batches` draws a bar described by ``label`` (None: no bars)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def batches(total: int, size: int, unit: str = "example") -> Iterator[int]:
    """The start indices ``0, size, 2 size, ...`` below ``total`` (``size`` at least 1), with a bar of ``total``
    ``unit``s inside :func:`shown` when there is more than one batch; it is cleared when done (``leave=False``), so
    the step bar under it stays the one line a run leaves."""
    size = max(1, int(size))
    label = _LABEL.get()
    if label is None or total <= size:
        yield from range(0, total, size)
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=label, unit=unit, leave=False) as bar:
        for lo in range(0, total, size):
            yield lo
            bar.update(min(size, total - lo))
