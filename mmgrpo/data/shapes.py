"""The shapes world: a finite prompt grammar, scenes that satisfy (or violate) a prompt, and a renderer.

This is the library's embedded demo and learning benchmark. Like GenEval (Ghosh et al., 2023, "GenEval: An
Object-Focused Framework for Evaluating Text-to-Image Alignment"), "better" is verified from pixels: a tiny
text-to-image model is RL-trained against the verifier in ``mmgrpo/rewards/shapes.py``, and a tiny VLM answers
questions about rendered scenes.

Vocabulary: 3 shapes x 4 colours, 5 absolute positions, counts one..three, 4 relations. Prompt kinds::

    single    "a red circle"
    count     "one red circle" / "two red circles" / "three blue squares"
    position  "a green triangle on the left" / "... at the top" / "... in the center"
    relation  "a blue square left of a yellow triangle" / "a red circle above a green square"
    pair      "a red circle and a blue triangle"

Geometry (normalised coordinates, x right, y down, image = [0, 1]^2): an object's ``(cx, cy)`` is the centroid
of its area (for the upright triangle that is 1/6 of its height below its bounding-box centre), ``size`` is
the side of its bounding box (circle diameter, square side, triangle base = height). Squares are axis aligned,
triangles upright, so the verifier can tell shapes apart from pixel moments alone.

Low resolution by design: the generator is trained at 32x32 or 48x48, so objects are at least 1/4 of the image
side (8 px at 32 px), bounding boxes keep a gap of 0.08 (2.5 px at 32 px) so blur cannot merge them, and the
palette has high chroma on an achromatic background, so blur and noise change *how much* colour a pixel has but
not *which* colour (mixing with grey keeps the hue).

Everything random takes a ``numpy.random.Generator``; the same seed gives the same scenes and images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from mmgrpo.core.errors import UserError
from mmgrpo.core.registry import nearest

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
KINDS = ("single", "count", "position", "relation", "pair")

# Saturated palette (RGB uint8). Hues 0, 120, 227, 55 degrees: at least 55 degrees apart, so the verifier's
# nearest-hue rule has +-27 degrees of slack for a generator's colour drift.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 180, 25),
    "blue": (25, 70, 230),
    "yellow": (240, 220, 20),
}
BACKGROUND = (255, 255, 255)

_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

SIZE_RANGE = (0.25, 0.375)
"""object size (bounding-box side, fraction of the image side); 0.25 is 8 px at 32 px"""
GAP = 0.08
"""minimum gap between two objects' bounding boxes (2.5 px at 32 px: a 3x3 blur cannot join them)"""
EDGE = 0.02
"""minimum gap between a bounding box and the image border"""
REGION_MARGIN = 0.05
"""sampled centroids stay this far inside (or outside, for violations) a named region"""
RELATION_GAP = 0.2
"""sampled "A left of B" scenes have B.cx - A.cx >= 0.2 (the verifier asks for > RELATION_MARGIN)"""
RELATION_MARGIN = 0.1
"""a relation holds when the centroids differ by more than this along its axis"""


# ----------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Mention:
    """One object phrase of a prompt: a colour and a shape."""

    color: str
    shape: str

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise UserError(f"shapes world: unknown colour {self.color!r}; use one of {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise UserError(f"shapes world: unknown shape {self.shape!r}; use one of {', '.join(SHAPES)}")

    def phrase(self, plural: bool = False) -> str:
        return f"{self.color} {self.shape}{'s' if plural else ''}"


@dataclass(frozen=True)
class Prompt:
    """A prompt of the shapes grammar; ``.text`` renders it and :func:`parse_prompt` inverts ``.text``.

    ``objects`` holds 1 mention (single, count, position) or 2 (relation, pair: the relation reads
    ``objects[0] <relation> objects[1]``).
    """

    kind: str
    objects: tuple[Mention, ...]
    count: int = 1
    position: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        n_obj = 2 if self.kind in ("relation", "pair") else 1
        if self.kind not in KINDS:
            raise UserError(f"shapes world: unknown prompt kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if len(self.objects) != n_obj:
            raise UserError(f"shapes world: a {self.kind} prompt names {n_obj} object(s), got {len(self.objects)}")
        if n_obj == 2 and self.objects[0] == self.objects[1]:
            raise UserError(f"shapes world: the two objects of a {self.kind} prompt must differ, got {self.objects}")
        if self.count not in COUNT_WORDS or (self.kind != "count" and self.count != 1):
            raise UserError(f"shapes world: count {self.count} must be 1..3, and 1 unless kind='count'")
        if (self.position is not None) != (self.kind == "position") or (
            self.position is not None and self.position not in POSITIONS
        ):
            raise UserError(f"shapes world: position {self.position!r} needs kind='position' and one of {POSITIONS}")
        if (self.relation is not None) != (self.kind == "relation") or (
            self.relation is not None and self.relation not in RELATIONS
        ):
            raise UserError(f"shapes world: relation {self.relation!r} needs kind='relation' and one of {RELATIONS}")

    @property
    def text(self) -> str:
        a = self.objects[0]
        if self.kind == "single":
            return f"a {a.phrase()}"
        if self.kind == "count":
            return f"{COUNT_WORDS[self.count]} {a.phrase(plural=self.count > 1)}"
        if self.kind == "position":
            return f"a {a.phrase()} {_POSITION_PHRASE[self.position]}"
        b = self.objects[1]
        if self.kind == "relation":
            return f"a {a.phrase()} {self.relation} a {b.phrase()}"
        return f"a {a.phrase()} and a {b.phrase()}"

    def key(self) -> tuple:
        """Semantic identity: "A left of B" == "B right of A", "A and B" == "B and A" (used by the split)."""
        if self.kind == "relation":
            a, b = self.objects
            flipped = (b, _OPPOSITE[self.relation], a)
            return ("relation", *min((a, self.relation, b), flipped, key=repr))
        if self.kind == "pair":
            return ("pair", *sorted(self.objects, key=repr))
        return (self.kind, self.objects, self.count, self.position)


def _mentions() -> list[Mention]:
    return [Mention(c, s) for c in COLORS for s in SHAPES]  # 12


@lru_cache(maxsize=1)
def _grammar() -> dict[str, Prompt]:
    """text -> Prompt for every prompt of the grammar (768 of them), in a fixed order."""
    ms = _mentions()
    prompts = [Prompt("single", (m,)) for m in ms]
    prompts += [Prompt("count", (m,), count=n) for n in COUNT_WORDS for m in ms]
    prompts += [Prompt("position", (m,), position=p) for p in POSITIONS for m in ms]
    prompts += [Prompt("relation", (a, b), relation=r) for r in RELATIONS for a in ms for b in ms if a != b]
    prompts += [Prompt("pair", (a, b)) for a in ms for b in ms if a != b]
    return {p.text: p for p in prompts}


def all_prompts() -> list[str]:
    """Every prompt text of the grammar: 12 single + 36 count + 60 position + 528 relation + 132 pair = 768."""
    return list(_grammar())


def parse_prompt(text: str) -> Prompt:
    """The :class:`Prompt` whose ``.text`` is ``text`` (case and surrounding/double spaces are forgiven)."""
    if isinstance(text, Prompt):
        return text
    norm = " ".join(str(text).lower().split())
    grammar = _grammar()
    if norm in grammar:
        return grammar[norm]
    hint = nearest(norm, grammar)
    raise UserError(
        f"shapes world: prompt {text!r} is outside the grammar; use e.g. 'a red circle', 'two blue squares', "
        f"'a green triangle on the left', 'a red circle above a green square', 'a red circle and a blue triangle' "
        f"(mmgrpo.data.shapes.all_prompts() lists all {len(grammar)})" + (f"; did you mean {hint!r}?" if hint else "")
    )


def split_prompts(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Deterministic train/held-out split, stratified by prompt kind, grouped by :meth:`Prompt.key`.

    Each kind puts round(fraction * its groups) groups (at least 1, at most all but 1) in held-out, so every
    kind appears in both lists, and "A left of B" never leaks into train as "B right of A". Lists keep the
    order of :func:`all_prompts`.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise UserError(f"split_prompts: heldout_fraction={heldout_fraction} must be in (0, 1), e.g. 0.2")
    rng = np.random.default_rng(seed)
    heldout_keys: set[tuple] = set()
    for kind in KINDS:
        keys = list(dict.fromkeys(p.key() for p in _grammar().values() if p.kind == kind))
        n_held = min(max(1, round(heldout_fraction * len(keys))), len(keys) - 1)
        heldout_keys.update(keys[i] for i in rng.permutation(len(keys))[:n_held])
    train = [t for t, p in _grammar().items() if p.key() not in heldout_keys]
    heldout = [t for t, p in _grammar().items() if p.key() in heldout_keys]
    return train, heldout


# ------------------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class Obj:
    """An object of a scene: centroid (cx, cy) and bounding-box side ``size``, normalised to [0, 1]."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def extent(self) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1); the upright triangle's centroid sits 2/3 of its height below the apex."""
        h = self.size
        up, down = (2 * h / 3, h / 3) if self.shape == "triangle" else (h / 2, h / 2)
        return self.cx - h / 2, self.cy - up, self.cx + h / 2, self.cy + down


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...] = field(default_factory=tuple)


def in_region(cx: float, cy: float, region: str) -> bool:
    """Whether a centroid lies in a named region: the outer third of the image, or the middle ninth (center)."""
    if region == "left":
        return cx < 1 / 3
    if region == "right":
        return cx > 2 / 3
    if region == "top":
        return cy < 1 / 3
    if region == "bottom":
        return cy > 2 / 3
    if region == "center":
        return 1 / 3 <= cx <= 2 / 3 and 1 / 3 <= cy <= 2 / 3
    raise UserError(f"shapes world: unknown position {region!r}; use one of {', '.join(POSITIONS)}")


def relation_holds(a_xy: tuple[float, float], b_xy: tuple[float, float], relation: str, margin: float) -> bool:
    """Whether "A <relation> B" holds for centroids a_xy, b_xy (y grows downwards), by more than ``margin``."""
    (ax, ay), (bx, by) = a_xy, b_xy
    if relation == "left of":
        return bx - ax > margin
    if relation == "right of":
        return ax - bx > margin
    if relation == "above":
        return by - ay > margin
    if relation == "below":
        return ay - by > margin
    raise UserError(f"shapes world: unknown relation {relation!r}; use one of {', '.join(RELATIONS)}")


@dataclass(frozen=True)
class _Spec:
    """What to place: colour, shape and the allowed centroid ranges."""

    color: str
    shape: str
    xr: tuple[float, float] = (0.0, 1.0)
    yr: tuple[float, float] = (0.0, 1.0)


def _region_ranges(region: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centroid ranges (x, y) well inside ``region`` (REGION_MARGIN from its border)."""
    lo, hi, m = 1 / 3 - REGION_MARGIN, 2 / 3 + REGION_MARGIN, REGION_MARGIN
    return {
        "left": ((0.0, lo), (0.0, 1.0)),
        "right": ((hi, 1.0), (0.0, 1.0)),
        "top": ((0.0, 1.0), (0.0, lo)),
        "bottom": ((0.0, 1.0), (hi, 1.0)),
        "center": ((1 / 3 + m, 2 / 3 - m), (1 / 3 + m, 2 / 3 - m)),
    }[region]


def _outside_ranges(region: str, rng: np.random.Generator) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centroid ranges (x, y) well outside ``region`` (for scenes that violate a position)."""
    lo, hi = 1 / 3 + REGION_MARGIN, 2 / 3 - REGION_MARGIN
    options = {
        "left": [((lo, 1.0), (0.0, 1.0))],
        "right": [((0.0, hi), (0.0, 1.0))],
        "top": [((0.0, 1.0), (lo, 1.0))],
        "bottom": [((0.0, 1.0), (0.0, hi))],
        "center": [_region_ranges(r) for r in ("left", "right", "top", "bottom")],
    }[region]
    return options[rng.integers(len(options))]


def _separated(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.extent()
    bx0, by0, bx1, by1 = b.extent()
    return bx0 - ax1 >= GAP or ax0 - bx1 >= GAP or by0 - ay1 >= GAP or ay0 - by1 >= GAP


def _draw(spec: _Spec, rng: np.random.Generator, size_range: tuple[float, float]) -> Obj | None:
    """One object of ``spec`` with a random size and a random centroid in its ranges (None if they cannot fit)."""
    s = float(rng.uniform(*size_range))
    up, down = (2 * s / 3, s / 3) if spec.shape == "triangle" else (s / 2, s / 2)
    x0, x1 = max(spec.xr[0], s / 2 + EDGE), min(spec.xr[1], 1 - s / 2 - EDGE)
    y0, y1 = max(spec.yr[0], up + EDGE), min(spec.yr[1], 1 - down - EDGE)
    if x0 > x1 or y0 > y1:
        return None
    return Obj(spec.shape, spec.color, float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)), s)


def _place(specs: list[_Spec], rng: np.random.Generator, relations=(), tries: int = 300) -> Scene:
    """Rejection-sample non-overlapping objects for ``specs`` that satisfy ``relations`` [(i, j, relation)].

    Each relation is placed with RELATION_GAP between centroids. After each ``tries`` failures the largest
    size shrinks by 0.025 down to the smallest, then both shrink by 10% a round (rare: crowded 3-object
    relation scenes); deterministic for a given rng state.
    """
    lo, hi = SIZE_RANGE
    for r in range(20):
        shrink = 0.9 ** max(0, r - 5)
        size_range = (lo * shrink, max(lo, hi - 0.025 * r) * shrink)
        for _ in range(tries):
            objs = [_draw(sp, rng, size_range) for sp in specs]
            if any(o is None for o in objs):
                continue
            if not all(_separated(objs[i], objs[j]) for i in range(len(objs)) for j in range(i)):
                continue
            xy = [(o.cx, o.cy) for o in objs]
            if all(relation_holds(xy[i], xy[j], rel, RELATION_GAP) for i, j, rel in relations):
                return Scene(tuple(objs))
    raise RuntimeError(f"could not place {specs} with {relations}")  # a bug: every spec used here fits


def _other_mentions(exclude: list[Mention]) -> list[Mention]:
    return [m for m in _mentions() if m not in exclude]


def _near_miss(m: Mention, exclude: list[Mention], rng: np.random.Generator) -> Mention:
    """A mention differing from ``m`` in colour, shape or both, and not in ``exclude``."""
    options = [o for o in _other_mentions(exclude + [m]) if o.color == m.color or o.shape == m.shape]
    if rng.random() < 0.25 or not options:
        options = _other_mentions(exclude + [m])
    return options[rng.integers(len(options))]


def _distractors(exclude: list[Mention], k: int, rng: np.random.Generator) -> list[_Spec]:
    others = _other_mentions(exclude)
    return [_Spec(m.color, m.shape) for m in (others[i] for i in rng.integers(len(others), size=k))]


def _shuffle(scene: Scene, rng: np.random.Generator) -> Scene:
    """Random object order, so nothing downstream can lean on the prompt's order."""
    return Scene(tuple(scene.objects[i] for i in rng.permutation(len(scene.objects))))


def sample_scene(prompt: str | Prompt, rng: np.random.Generator, max_distractors: int = 0) -> Scene:
    """A random scene that satisfies ``prompt`` (1-3 non-overlapping objects, random sizes and positions).

    ``max_distractors`` > 0 adds up to that many extra objects (never of a mentioned colour+shape, at most 3
    objects in all); the default 0 draws exactly what the prompt says (the text-to-image training data).
    """
    p = parse_prompt(prompt)
    a = p.objects[0]
    specs = [_Spec(a.color, a.shape)] * p.count
    relations = ()
    if p.kind == "position":
        specs = [_Spec(a.color, a.shape, *_region_ranges(p.position))]
    elif p.kind in ("relation", "pair"):
        b = p.objects[1]
        specs = [_Spec(a.color, a.shape), _Spec(b.color, b.shape)]
        relations = ((0, 1, p.relation),) if p.kind == "relation" else ()
    k = int(rng.integers(0, min(max_distractors, 3 - len(specs)) + 1)) if max_distractors > 0 else 0
    specs = specs + _distractors(list(p.objects), k, rng)
    return _shuffle(_place(specs, rng, relations), rng)


def sample_mismatched_scene(prompt: str | Prompt, rng: np.random.Generator) -> Scene:
    """A random scene that violates at least one atom of ``prompt``, by construction; mostly near misses.

    single: no object of that colour+shape (a colour or shape swap). count: 0-3 of them but not the asked
    number. position: the object well outside the region, or a swapped object inside it. relation: the
    order reversed, or one object swapped. pair: one object swapped. Extra objects never carry a mentioned
    colour+shape, so they cannot repair the violation.
    """
    p = parse_prompt(prompt)
    a = p.objects[0]
    spec_a = _Spec(a.color, a.shape)
    relations = ()
    if p.kind == "single":
        m = _near_miss(a, [], rng)
        specs = [_Spec(m.color, m.shape)] + _distractors([a], int(rng.integers(0, 3)), rng)
    elif p.kind == "count":
        n = int(rng.choice([c for c in (0, 1, 2, 3) if c != p.count]))
        specs = [spec_a] * n + _distractors([a], int(rng.integers(1 if n == 0 else 0, 3 - n + 1)), rng)
    elif p.kind == "position":
        if rng.random() < 0.5:
            specs = [_Spec(a.color, a.shape, *_outside_ranges(p.position, rng))]
        else:
            m = _near_miss(a, [], rng)
            specs = [_Spec(m.color, m.shape, *_region_ranges(p.position))]
        specs += _distractors([a], int(rng.integers(0, 3)), rng)
    else:
        b = p.objects[1]
        spec_b = _Spec(b.color, b.shape)
        swap = p.kind == "pair" or rng.random() < 0.5
        if swap:  # replace one mentioned object by a near miss that is neither mentioned object
            i = int(rng.integers(2))
            m = _near_miss(p.objects[i], [a, b], rng)
            specs = [_Spec(m.color, m.shape), spec_b] if i == 0 else [spec_a, _Spec(m.color, m.shape)]
        else:
            specs = [spec_a, spec_b]
        if p.kind == "relation":  # the relation reversed, or kept while one object is swapped
            relations = ((0, 1, p.relation if swap else _OPPOSITE[p.relation]),)
        specs += _distractors([a, b], int(rng.integers(0, 2)), rng)
    return _shuffle(_place(specs, rng, relations), rng)


def place_scene(
    objects: list[tuple[str, str]], rng: np.random.Generator, regions: dict[int, str] | None = None
) -> Scene:
    """A scene of exactly ``objects`` [(colour, shape)] (1-3, repeats allowed), non-overlapping, random sizes and
    positions, object i's centroid well inside ``regions[i]`` (one of POSITIONS) where given; in random order."""
    if not 1 <= len(objects) <= 3:
        raise UserError(f"place_scene: {len(objects)} objects; the shapes world places 1..3")
    regions = regions or {}
    specs = []
    for i, (color, shape) in enumerate(objects):
        Mention(color, shape)  # checks the names
        if regions.get(i, "left") not in POSITIONS:
            raise UserError(f"place_scene: unknown region {regions[i]!r}; use one of {', '.join(POSITIONS)}")
        ranges = _region_ranges(regions[i]) if i in regions else ((0.0, 1.0), (0.0, 1.0))
        specs.append(_Spec(color, shape, *ranges))
    return _shuffle(_place(specs, rng), rng)


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A scene of 1-3 (or ``n_objects``) random objects, colour+shape drawn with replacement."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise UserError(f"random_scene: n_objects={n} must be 1..3")
    ms = _mentions()
    return _place([_Spec(m.color, m.shape) for m in (ms[i] for i in rng.integers(len(ms), size=n))], rng)


# --------------------------------------------------------------------------------------------- rendering
def render(
    scene: Scene, size: int = 64, background: tuple[int, int, int] = BACKGROUND, supersample: int = 4
) -> np.ndarray:
    """Draw ``scene`` as uint8 [H, W, 3] (H = W = size), anti-aliased by drawing at ``supersample`` x size.

    The background must be achromatic (grey levels only): the verifier segments objects by chroma.
    """
    if size < 16:
        raise UserError(f"render: size={size} is too small for the shapes world; use 32 or more")
    if max(background) - min(background) > 16:
        raise UserError(f"render: background={background} must be grey (r = g = b), e.g. (255, 255, 255)")
    s = size * supersample
    canvas = Image.new("RGB", (s, s), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        fill = PALETTE[o.color]
        x0, y0, x1, y1 = (v * s for v in o.extent())
        # PIL boxes include their last pixel and polygon vertices sit on pixel centres: the -1 and -0.5 make
        # the drawn area [x0, x1) x [y0, y1), so rendered centroids match (cx, cy) to < 0.2 px
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon([(o.cx * s - 0.5, y0 - 0.5), (x0 - 0.5, y1 - 0.5), (x1 - 0.5, y1 - 0.5)], fill=fill)
    if supersample > 1:
        canvas = canvas.reduce(supersample)  # box filter: each pixel = mean of its supersample^2 block
    return np.asarray(canvas, dtype=np.uint8).copy()


def render_prompt(prompt_text: str, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, Scene]:
    """A random scene satisfying ``prompt_text`` and its rendering: (uint8 [H, W, 3], Scene)."""
    scene = sample_scene(prompt_text, rng)
    return render(scene, size=size), scene


def to_tensor(img: np.ndarray):
    """uint8 [H, W, 3] -> torch float [3, H, W] in [0, 1]."""
    import torch

    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UserError(f"to_tensor: expected an image [H, W, 3], got shape {arr.shape}")
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / scale


def hue_degrees(rgb: tuple[int, int, int] | np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of RGB values [..., 3] (any scale); 0 where the chroma is 0."""
    x = np.asarray(rgb, dtype=np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    c = np.where(mx - mn > 0, mx - mn, 1.0)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return np.where(mx - mn > 0, 60.0 * h, 0.0) % 360.0


PALETTE_HUE = {name: float(hue_degrees(rgb)) for name, rgb in PALETTE.items()}
PALETTE_CHROMA = {name: (max(rgb) - min(rgb)) / 255.0 for name, rgb in PALETTE.items()}
