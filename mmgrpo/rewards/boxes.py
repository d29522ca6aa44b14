"""Box coordinate conventions: THE one place coordinates are converted (docs/architecture.md, the VLM reasoner).

A box is ``[x1, y1, x2, y2]`` (top-left, bottom-right; x to the right, y down). Each VLM family speaks its own
coordinates, and ground truth is always stored in *absolute pixels of the original image*:

- ``qwen2_vl``: a 0..1000 normalised grid of the image (Qwen2-VL, Wang et al. 2024, sec. 2.2 "visual grounding":
  ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` with coordinates in [0, 1000)); independent of any resize.
- ``qwen2_5_vl``: absolute pixels of the image *as the processor resized it* (Qwen2.5-VL, Bai et al. 2025,
  "absolute coordinates"); converting to the original image scales by original / resized size.
- ``absolute``: absolute pixels of the original image (identity).

Sizes are ``(W, H)`` pairs: ``image_size`` is the original image, ``resized_size`` the size the processor resized
it to (None: not resized, i.e. the same as ``image_size``).

>>> to_absolute([500, 250, 1000, 750], "qwen2_vl", image_size=(640, 480))
[320.0, 120.0, 640.0, 360.0]
>>> box_iou([0, 0, 2, 2], [1, 1, 3, 3])  # intersection 1, union 4 + 4 - 1 = 7
0.14285714285714285
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from mmgrpo.core.errors import UserError

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "absolute")
QWEN2_VL_GRID = 1000.0  # Qwen2-VL boxes live on a 0..1000 grid of the image

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_BOX_TAG_RE = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.DOTALL)
_PAIRS_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_LIST_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_NUM_RE = re.compile(rf"(?<![\w.]){_NUM}")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UserError(f"unknown box family {family!r}; known: {', '.join(FAMILIES)}")


def _check_size(size: Sequence[float] | None, name: str, family: str) -> tuple[float, float]:
    if size is None:
        raise UserError(f"box family {family!r} needs {name} = (W, H) of the image; got None (set it in meta)")
    try:
        w, h = (float(v) for v in size)
    except (TypeError, ValueError) as e:
        raise UserError(f"{name} must be a (W, H) pair of positive numbers; got {size!r}") from e
    if w <= 0 or h <= 0:
        raise UserError(f"{name} must be a (W, H) pair of positive numbers; got {size!r}")
    return w, h


def _check_box(box: Sequence[float]) -> list[float]:
    vals = [float(v) for v in box]
    if len(vals) != 4:
        raise UserError(f"a box is [x1, y1, x2, y2] (4 numbers); got {len(vals)} values: {list(box)!r}")
    return vals


def _scale(family: str, image_size, resized_size) -> tuple[float, float]:
    """(sx, sy) such that absolute-original = family-coordinates * (sx, sy)."""
    _check_family(family)
    if family == "absolute":
        return 1.0, 1.0
    w, h = _check_size(image_size, "image_size", family)
    if family == "qwen2_vl":
        return w / QWEN2_VL_GRID, h / QWEN2_VL_GRID
    rw, rh = _check_size(resized_size, "resized_size", family) if resized_size is not None else (w, h)
    return w / rw, h / rh


def to_absolute(
    box: Sequence[float],
    family: str,
    image_size: Sequence[float] | None = None,
    resized_size: Sequence[float] | None = None,
) -> list[float]:
    """A ``family`` box -> absolute pixels of the original image ``image_size = (W, H)``.

    qwen2_vl: x * W / 1000, y * H / 1000. qwen2_5_vl: x * W / W', y * H / H' with ``resized_size = (W', H')``.
    absolute: unchanged.
    """
    x1, y1, x2, y2 = _check_box(box)
    sx, sy = _scale(family, image_size, resized_size)
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def from_absolute(
    box: Sequence[float],
    family: str,
    image_size: Sequence[float] | None = None,
    resized_size: Sequence[float] | None = None,
) -> list[float]:
    """Absolute pixels of the original image -> a ``family`` box (the inverse of :func:`to_absolute`).

    Values are not rounded: a prompt or target that needs integers rounds them itself.
    """
    x1, y1, x2, y2 = _check_box(box)
    sx, sy = _scale(family, image_size, resized_size)
    return [x1 / sx, y1 / sy, x2 / sx, y2 / sy]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes; 0.0 if either is degenerate (x2 <= x1 or y2 <= y1).

    Boxes are continuous (a box [0, 0, 2, 2] has area 4, not 9 as in the inclusive-pixel convention).
    """
    ax1, ay1, ax2, ay2 = _check_box(a)
    bx1, by1, bx2, by2 = _check_box(b)
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return 0.0
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union


def _last_match(regex: re.Pattern, text: str) -> list[float] | None:
    hits = list(regex.finditer(text))
    return [float(v) for v in hits[-1].groups()] if hits else None


def _json_box(text: str) -> list[float] | None:
    """A box from a JSON answer: ``[x1, y1, x2, y2]``, ``[[...]]`` or ``{"bbox_2d": [...]}`` (Qwen2.5-VL)."""
    try:
        obj = json.loads(text)
    except (ValueError, TypeError):
        return None
    for _ in range(4):  # unwrap [[...]], [{"bbox_2d": ...}], {"bbox": ...}
        if isinstance(obj, list) and len(obj) == 1:
            obj = obj[0]
        elif isinstance(obj, dict):
            vals = [v for k, v in obj.items() if "box" in k.lower()]
            if len(vals) != 1:
                return None
            obj = vals[0]
        else:
            break
    if isinstance(obj, list) and len(obj) == 4 and all(isinstance(v, int | float) for v in obj):
        return [float(v) for v in obj]
    return None


def parse_box(text: str) -> list[float] | None:
    """Parse one ``[x1, y1, x2, y2]`` box from a model's answer text; None if there is none.

    Tried in order (the last occurrence wins when a form appears several times, as the final answer comes last):
    a JSON answer (``[x1, y1, x2, y2]``, ``[[...]]``, ``{"bbox_2d": [...]}``); the Qwen2-VL form
    ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``; ``(x1,y1),(x2,y2)``; a bracketed list of four numbers; and finally
    a text containing exactly four numbers (``"10 20 30 40"``). Coordinates are returned as written, in the
    family's convention (convert with :func:`to_absolute`); x1 > x2 is kept (it scores IoU 0).
    """
    text = text.strip()
    box = _json_box(text)
    if box is not None:
        return box
    tags = _BOX_TAG_RE.findall(text)
    if tags:
        box = _last_match(_PAIRS_RE, tags[-1])
        if box is not None:
            return box
    for regex in (_PAIRS_RE, _LIST_RE):
        box = _last_match(regex, text)
        if box is not None:
            return box
    nums = _NUM_RE.findall(text)
    return [float(v) for v in nums] if len(nums) == 4 else None
