"""Shapes-world question answering: seeded multiple-choice and grounding questions about rendered scenes.

The VLM side of the shapes world (:mod:`mmgrpo.data.shapes`): a scene is drawn, rendered (32-64 px) and asked
about. Kinds, each answered by the scene by construction::

    count      "How many red circles are there?"    A) 0 B) 1 C) 2 D) 3        -> letter of the count
    color      "What colour is the square?"          A) red B) green C) blue D) yellow   (the square is unique)
    position   "Where is the blue triangle?"         A) left B) right C) top D) bottom
    grounding  "Locate the red circle."              -> box [x1, y1, x2, y2] in absolute pixels of the image

Position regions are the outer thirds of :func:`mmgrpo.data.shapes.in_region`; a position scene puts the object
in exactly one of the four (never in a corner, where "left" and "top" would both hold). Grounding boxes are the
object's bounding box from its normalised ``(cx, cy, size)`` (:meth:`~mmgrpo.data.shapes.Obj.extent`, the
triangle's centroid sits 2/3 of its height below the apex) times the image side; they are stored in ABSOLUTE
pixels of the original image and converted to a model family's convention only by ``mmgrpo/rewards/boxes.py``.

Difficulty (``difficulty``): ``normal`` is the world above (the shipped VLM's pretraining data). ``near_miss`` asks
the same questions about scenes of exactly 3 objects built to defeat shortcuts that ignore half of the asked phrase:

    count      the other objects are near misses of the asked one (its colour with another shape, or its shape in
               another colour), so counting by colour alone or by shape alone is wrong; the answer is still 0-3
               uniformly
    color      the other two objects are the two other shapes in two other colours (three distinct colours)
    position   the other two objects are near misses of the asked one, anywhere in the image

``shuffled`` keeps the normal scenes and lists the options in a random order per scene ("A) 2 B) 0 C) 3 D) 1"), one
that never leaves the right option at its usual letter, drawn from its own generator (the scene is the normal one):
a model that answers the letter of the fixed order without reading the options is always wrong.

Measured on the shipped ``assets/shapes_vlm`` (configs/shapes_vlm_grpo.yaml's sampling, temperature 0.5, 256 training
groups each): the share of all-wrong groups of G = 8 is 0.14 normal, 0.28 near_miss, 0.69 shuffled (G = 2: 0.27 normal,
0.81 shuffled); the sampled accuracy 0.62, 0.33, 0.14. Near misses make the model unsure rather than wrong (its samples
spread over the options), the shuffled order makes it confidently wrong: ``shuffled`` is the benchmark's hard split.

Every example carries a perception checklist (PEARL, Zhang et al. 2025, arXiv 2511.18437): short sub-questions
about the same image with known answers, e.g. ``("How many objects are there?", "2")``,
``("Is there a red circle?", "yes")``, ``("What colour is the square?", "red")``.

Every example also carries three tiered hints (Scaf-GRPO, Zhang et al. 2025, arXiv 2510.19807: abstract concept ->
plan -> concrete steps), ``meta["hints"]``, written from the scene without any random draw (:func:`tiered_hints`),
e.g. for "How many red circles are there?": "Count only the objects that are both red and circles; ...", "Go
through the objects one by one ...", "The image shows a red circle, a blue square and a red circle. Of these, 2 are
red circles." The last tier gives the solution's steps, not the option letter.

Split by scene seed: example ``scene_seed`` is drawn from ``numpy.random.default_rng([seed, scene_seed])``, and a
hash of ``(split_seed, scene_seed)`` puts a fixed ``heldout_fraction`` of the scene seeds in the held-out set, so
training can stream as many fresh train scenes as it likes (:func:`train_seeds`) and never meets a held-out one
(:func:`heldout_seeds`).

>>> ex = make_example(3, kind="count")
>>> ex.prompt()["options"], ex.answer in "ABCD"
(['0', '1', '2', '3'], True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmgrpo.core.errors import UserError
from mmgrpo.data import shapes
from mmgrpo.data.shapes import COLORS, COUNT_WORDS, SHAPES, Obj, Scene

QA_KINDS = ("count", "color", "position", "grounding")
MC_KINDS = ("count", "color", "position")
DIFFICULTIES = ("normal", "near_miss", "shuffled")
IMAGE_SIZES = (32, 512)
"""the image sides (pixels) an example can be rendered at, both included; the world is drawn for 32-64"""
MAX_SCENES = 1_000_000
"""the most scenes a synthetic shapes source is asked for, train or held out (``data.options.num_examples`` &
co.): a run of 4 prompts a step would take 250,000 steps to see a million once, and the split's seeds (and a
permutation of them) are all made when the run starts, so a billion ran out of memory there"""
COUNT_OPTIONS = ("0", "1", "2", "3")
COLOR_OPTIONS = COLORS  # red, green, blue, yellow
POSITION_OPTIONS = ("left", "right", "top", "bottom")
LETTERS = "ABCD"
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_MAX_TRIES = 200  # rejection sampling of scenes (colour: unique shape; position: exactly one region)


@dataclass(frozen=True)
class QAExample:
    """One question about one rendered scene.

    ``answer`` is the option letter (multiple choice) or None (grounding); ``box`` is [x1, y1, x2, y2] in absolute
    pixels of ``image`` (grounding) or None; ``image`` is uint8 [H, W, 3] with H = W = ``image_size``.
    """

    kind: str
    question: str
    options: tuple[str, ...]
    answer: str | None
    box: tuple[float, float, float, float] | None
    checklist: tuple[tuple[str, str], ...]
    scene: Scene
    image: np.ndarray = field(repr=False, compare=False)
    scene_seed: int = 0
    image_size: int = 64
    target: tuple[str, str] = ("", "")
    """(colour, shape) the question is about ("" for none)"""
    hints: tuple[str, ...] = ()
    """tiered hints (concept, plan, concrete steps) for Scaf-GRPO's re-rolls (:func:`tiered_hints`)"""

    def prompt(self) -> dict:
        """The VLM prompt: ``{question, options}`` (VLMPolicy appends " A) ... B) ..." to the question)."""
        return {"question": self.question, "options": list(self.options) or None}

    def meta(self) -> dict:
        """Per-prompt metadata the rewards and evaluation read: answer, box, image, image_size (W, H), checklist,
        entities (the distinct "colour shape" objects of the scene: E-GRPO's ground-truth entities)."""
        out = {
            "images": [self.image],
            "image_size": (self.image_size, self.image_size),
            "kind": self.kind,
            "scene_seed": self.scene_seed,
            "checklist": [list(item) for item in self.checklist],
            "entities": list(dict.fromkeys(f"{o.color} {o.shape}" for o in self.scene.objects)),
            "hints": list(self.hints),
        }
        if self.answer is not None:
            out["answer"] = self.answer
        if self.box is not None:
            out["box"] = list(self.box)
        return out


# ------------------------------------------------------------------------------------------------- split
def is_heldout(scene_seed: int, split_seed: int = 0, heldout_fraction: float = 0.1) -> bool:
    """Whether scene ``scene_seed`` is held out: a hash of (split_seed, scene_seed) below ``heldout_fraction``."""
    if not 0.0 < heldout_fraction < 1.0:
        raise UserError(f"shapes_qa: heldout_fraction={heldout_fraction} must be in (0, 1), e.g. 0.1")
    u = np.random.SeedSequence([split_seed, int(scene_seed), 0x5EED]).generate_state(1, dtype=np.uint32)[0]
    return float(u) / 2**32 < heldout_fraction


MAX_SCANNED = 10_000_000
"""the most scene seeds the split may scan to find the scenes asked for (7 us each: 74 s); a held-out fraction of
1e-9 (or a train fraction of 1e-9) would have scanned for hours"""


def _seeds(n: int, heldout: bool, split_seed: int, heldout_fraction: float, start: int = 0) -> list[int]:
    if n < 0:
        raise UserError(f"shapes_qa: asked for {n} scene seeds; give n >= 0")
    share = heldout_fraction if heldout else 1.0 - heldout_fraction
    if n and n / max(share, 1e-300) > MAX_SCANNED:
        part = "held-out" if heldout else "train"
        raise UserError(f"data.options.heldout_fraction={heldout_fraction}: {n} {part} scenes at a {part} share of "
                        f"{share:.3g} need about {n / max(share, 1e-300):.3g} scene seeds drawn, more than "
                        f"{MAX_SCANNED:,}; set data.options.heldout_fraction nearer 0.1 (or ask for fewer "
                        "scenes)")  # fmt: skip
    out, s = [], start
    while len(out) < n:
        if is_heldout(s, split_seed, heldout_fraction) == heldout:
            out.append(s)
        s += 1
    return out


def train_seeds(n: int, split_seed: int = 0, heldout_fraction: float = 0.1, start: int = 0) -> list[int]:
    """The first ``n`` train scene seeds >= ``start`` (never held out)."""
    return _seeds(n, False, split_seed, heldout_fraction, start)


def heldout_seeds(n: int, split_seed: int = 0, heldout_fraction: float = 0.1) -> list[int]:
    """The first ``n`` held-out scene seeds (the evaluation set every shapes-QA recipe uses)."""
    return _seeds(n, True, split_seed, heldout_fraction)


# ------------------------------------------------------------------------------------------------ scenes
def _count_text(n: int, color: str, shape: str) -> str:
    return f"{COUNT_WORDS[n]} {color} {shape}{'s' if n > 1 else ''}"


def _count(scene: Scene, color: str, shape: str) -> int:
    return sum((o.color, o.shape) == (color, shape) for o in scene.objects)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _count_scene(rng: np.random.Generator) -> tuple[Scene, str, str, int]:
    """(scene, colour, shape, n): n in 0..3 uniformly; n = 0 asks about a near miss of an object in the scene."""
    n = int(rng.integers(0, 4))
    if n > 0:
        color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
        return shapes.sample_scene(_count_text(n, color, shape), rng, max_distractors=3 - n), color, shape, n
    scene = shapes.random_scene(rng)
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    color, shape = _pick(rng, near or absent)
    return scene, color, shape, 0


def _unique_shape_scene(rng: np.random.Generator) -> tuple[Scene, str, str]:
    """(scene, colour, shape) where ``shape`` occurs exactly once (so "the square" is well defined)."""
    for _ in range(_MAX_TRIES):
        color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
        scene = shapes.sample_scene(f"a {color} {shape}", rng, max_distractors=2)
        if sum(o.shape == shape for o in scene.objects) == 1:
            return scene, color, shape
    raise RuntimeError("shapes_qa: no scene with a unique shape")  # a bug: most draws qualify


def region_of(o: Obj) -> str | None:
    """The one of left/right/top/bottom holding the centroid of ``o``, or None (center, a corner)."""
    hits = [r for r in POSITION_OPTIONS if shapes.in_region(o.cx, o.cy, r)]
    return hits[0] if len(hits) == 1 else None


def _position_scene(rng: np.random.Generator) -> tuple[Scene, str, str, str]:
    """(scene, colour, shape, region): the (unique) object lies in exactly one of the four outer regions."""
    region, color, shape = _pick(rng, POSITION_OPTIONS), _pick(rng, COLORS), _pick(rng, SHAPES)
    for _ in range(_MAX_TRIES):
        scene = shapes.sample_scene(f"a {color} {shape} {_POSITION_PHRASE[region]}", rng, max_distractors=2)
        obj = next(o for o in scene.objects if (o.color, o.shape) == (color, shape))
        if region_of(obj) == region:
            return scene, color, shape, region
    raise RuntimeError(f"shapes_qa: no scene with the object only {region}")  # a bug: about half the draws qualify


def _near_misses(color: str, shape: str, k: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``k`` (colour, shape)s, with replacement, sharing exactly one of colour and shape with (color, shape)."""
    pool = [(c, shape) for c in COLORS if c != color] + [(color, s) for s in SHAPES if s != shape]  # 3 + 2
    return [pool[int(i)] for i in rng.integers(len(pool), size=k)]


def _hard_count_scene(rng: np.random.Generator) -> tuple[Scene, str, str, int]:
    """(scene, colour, shape, n): 3 objects, n in 0..3 uniformly of (colour, shape), the rest near misses."""
    n, color, shape = int(rng.integers(0, 4)), _pick(rng, COLORS), _pick(rng, SHAPES)
    objects = [(color, shape)] * n + _near_misses(color, shape, 3 - n, rng)
    return shapes.place_scene(objects, rng), color, shape, n


def _hard_unique_shape_scene(rng: np.random.Generator) -> tuple[Scene, str, str]:
    """(scene, colour, shape): one object of each shape, in three distinct colours."""
    colors = [COLORS[int(i)] for i in rng.permutation(len(COLORS))[:3]]
    scene = shapes.place_scene(list(zip(colors, SHAPES)), rng)
    shape = _pick(rng, SHAPES)
    return scene, colors[SHAPES.index(shape)], shape


def _hard_position_scene(rng: np.random.Generator) -> tuple[Scene, str, str, str]:
    """(scene, colour, shape, region): the asked object only in ``region``, two near misses anywhere."""
    region, color, shape = _pick(rng, POSITION_OPTIONS), _pick(rng, COLORS), _pick(rng, SHAPES)
    for _ in range(_MAX_TRIES):
        scene = shapes.place_scene([(color, shape), *_near_misses(color, shape, 2, rng)], rng, {0: region})
        obj = next(o for o in scene.objects if (o.color, o.shape) == (color, shape))
        if region_of(obj) == region:
            return scene, color, shape, region
    raise RuntimeError(f"shapes_qa: no near-miss scene with the object only {region}")  # a bug: most draws qualify


def pixel_box(o: Obj, size: int) -> tuple[float, float, float, float]:
    """Bounding box [x1, y1, x2, y2] of ``o`` in absolute pixels of a ``size`` x ``size`` rendering."""
    x0, y0, x1, y1 = o.extent()
    return (x0 * size, y0 * size, x1 * size, y1 * size)


def checklist(scene: Scene, rng: np.random.Generator) -> tuple[tuple[str, str], ...]:
    """PEARL perception items answered by the scene: the object count, every present colour+shape ("yes"), one
    absent near miss ("no"), and the colour of each shape that occurs exactly once."""
    objs = scene.objects
    items = [("How many objects are there?", str(len(objs)))]
    present = list(dict.fromkeys((o.color, o.shape) for o in objs))
    items += [(f"Is there a {c} {s}?", "yes") for c, s in present]
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    c, s = _pick(rng, near or absent)
    items.append((f"Is there a {c} {s}?", "no"))
    for shape in SHAPES:
        same = [o for o in objs if o.shape == shape]
        if len(same) == 1:
            items.append((f"What colour is the {shape}?", same[0].color))
    return tuple(items)


_SHAPE_CUE = {"circle": "round, no corners", "square": "four equal sides", "triangle": "three corners"}


def _listing(scene: Scene) -> str:
    """'a red circle, a blue square and a green triangle' (the scene's objects in drawing order)."""
    items = [f"a {o.color} {o.shape}" for o in scene.objects]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def tiered_hints(kind: str, scene: Scene, color: str, shape: str, size: int = 64) -> tuple[str, str, str]:
    """Three hints for a question about the ``color`` ``shape`` of ``scene``, from abstract to concrete (Scaf-GRPO's
    knowledge -> planning -> solution tiers). Deterministic: no random draw, so examples stay what they were."""
    objs = [o for o in scene.objects if (o.color, o.shape) == (color, shape)]
    if kind == "count":
        n = len(objs)
        return (
            f"Count only the objects that are both {color} and {shape}s; objects of another colour or another shape "
            "do not count, and the count may be 0.",
            f"Go through the objects one by one, name the colour and shape of each, keep the {color} {shape}s, then "
            "pick the option equal to how many you kept.",
            f"The image shows {_listing(scene)}. Of these, {n} {'is a' if n == 1 else 'are'} {color} "
            f"{shape}{'' if n == 1 else 's'}.",
        )
    if kind == "color":
        return (
            f"Only one object in the image is a {shape}; its colour is the answer, the other objects do not matter.",
            f"Find the {shape} by its outline ({_SHAPE_CUE[shape]}), read its fill colour, then match it with an "
            "option.",
            f"The image shows {_listing(scene)}; the {shape} is the one to read the colour of.",
        )
    if kind == "exists":  # "Is there a red circle?" (the recipe's default shapes questions)
        return (
            f"Look for an object that is both {color} and a {shape}; an object with only one of the two does not "
            "count.",
            f"Name the colour and the shape of every object, then check whether one of them is a {color} {shape}.",
            f"The image shows {_listing(scene)}.",
        )
    o = objs[0]
    if kind == "position":
        return (
            "Left and right depend on where the object's centre lies across the image, top and bottom on where it "
            "lies down the image; the object is in exactly one of the four outer thirds.",
            f"Find the {color} {shape}, then check whether its centre is in the left, right, top or bottom third of "
            "the image.",
            f"The {color} {shape} has its centre {round(o.cx * 100)}% of the width from the left edge and "
            f"{round(o.cy * 100)}% of the height from the top edge.",
        )
    return (  # grounding
        "A box is [x1, y1, x2, y2] in pixels: the top-left corner of the object, then its bottom-right corner.",
        f"Find the {color} {shape}, then read the pixel positions of its left, top, right and bottom edges in the "
        f"{size} x {size} image.",
        f"The {color} {shape} is centred near ({o.cx * size:.0f}, {o.cy * size:.0f}) pixels.",
    )


# ---------------------------------------------------------------------------------------------- examples
def make_example(
    scene_seed: int,
    kind: str | None = None,
    seed: int = 0,
    size: int = 64,
    kinds: tuple[str, ...] = QA_KINDS,
    difficulty: str = "normal",
) -> QAExample:
    """The example of ``scene_seed`` (deterministic in (seed, scene_seed, kind, size, difficulty)).

    ``kind`` None draws one of ``kinds`` uniformly from the scene's generator; ``difficulty`` (module doc): normal,
    near_miss or shuffled (the last two: multiple-choice kinds only).
    """
    if not IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1]:
        raise UserError(f"shapes_qa: image size={size} must be in 32..512 (the shapes world is drawn for 32-64 px)")
    if difficulty not in DIFFICULTIES:
        raise UserError(f"shapes_qa: difficulty={difficulty!r}; use one of {', '.join(DIFFICULTIES)}")
    hard = difficulty == "near_miss"
    rng = np.random.default_rng([seed, int(scene_seed)])
    if kind is None:
        bad = [k for k in kinds if k not in QA_KINDS]
        if not kinds or bad:
            raise UserError(f"shapes_qa: kinds={list(kinds)} must be a non-empty subset of {', '.join(QA_KINDS)}")
        kind = kinds[int(rng.integers(len(kinds)))]
    options: tuple[str, ...] = ()
    answer, box = None, None
    if difficulty != "normal" and kind not in MC_KINDS:
        raise UserError(f"shapes_qa: difficulty {difficulty} asks {', '.join(MC_KINDS)} only; got kind {kind!r}")
    if kind == "count":
        scene, color, shape, n = (_hard_count_scene if hard else _count_scene)(rng)
        question, options, answer = f"How many {color} {shape}s are there?", COUNT_OPTIONS, LETTERS[n]
    elif kind == "color":
        scene, color, shape = (_hard_unique_shape_scene if hard else _unique_shape_scene)(rng)
        question, options, answer = f"What colour is the {shape}?", COLOR_OPTIONS, LETTERS[COLORS.index(color)]
    elif kind == "position":
        scene, color, shape, region = (_hard_position_scene if hard else _position_scene)(rng)
        question, options = f"Where is the {color} {shape}?", POSITION_OPTIONS
        answer = LETTERS[POSITION_OPTIONS.index(region)]
    elif kind == "grounding":
        color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
        scene = shapes.sample_scene(f"a {color} {shape}", rng, max_distractors=2)
        obj = next(o for o in scene.objects if (o.color, o.shape) == (color, shape))
        question, box = f"Locate the {color} {shape}.", pixel_box(obj, size)
    else:
        raise UserError(f"shapes_qa: unknown question kind {kind!r}; known: {', '.join(QA_KINDS)}")
    if difficulty == "shuffled":  # options in a random order that moves the answer off its usual letter
        right, shuffle_rng = LETTERS.index(answer), np.random.default_rng([seed, int(scene_seed), 1])
        order = list(range(len(options)))
        while order.index(right) == right:
            order = [int(i) for i in shuffle_rng.permutation(len(options))]
        answer = LETTERS[order.index(right)]
        options = tuple(options[i] for i in order)
    return QAExample(
        kind=kind,
        question=question,
        options=tuple(options),
        answer=answer,
        box=box,
        checklist=checklist(scene, rng),
        scene=scene,
        image=shapes.render(scene, size=size),
        scene_seed=int(scene_seed),
        image_size=size,
        target=(color, shape),
        hints=tiered_hints(kind, scene, color, shape, size),
    )


def make_examples(
    scene_seeds: list[int],
    kinds: tuple[str, ...] = QA_KINDS,
    seed: int = 0,
    size: int = 64,
    difficulty: str = "normal",
) -> list[QAExample]:
    """One example per scene seed, the kind drawn from ``kinds`` by each scene's generator."""
    return [make_example(s, None, seed, size, kinds, difficulty) for s in scene_seeds]
