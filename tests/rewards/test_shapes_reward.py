"""The shapes pixel verifier: components, colour, shape, atoms, partial scores, rewards and accuracy."""

import time
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from mmgrpo.core.errors import UserError
from mmgrpo.core.types import RewardContext
from mmgrpo.data.shapes import (
    COLORS,
    KINDS,
    PALETTE,
    SHAPES,
    Obj,
    Scene,
    all_prompts,
    parse_prompt,
    random_scene,
    render,
    sample_mismatched_scene,
    sample_scene,
    to_tensor,
)
from mmgrpo.rewards import registry
from mmgrpo.rewards.shapes import atoms, detect, label_components, palette_alpha, read_image, score


def _bfs_labels(classes: np.ndarray) -> np.ndarray:
    """Reference 4-connectivity labelling (plain BFS), numbered by first pixel in raster order."""
    h, w = classes.shape
    out = -np.ones((h, w), dtype=int)
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if classes[y0, x0] < 0 or out[y0, x0] >= 0:
                continue
            out[y0, x0] = n
            queue = deque([(y0, x0)])
            while queue:
                y, x = queue.popleft()
                for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= yy < h and 0 <= xx < w and out[yy, xx] < 0 and classes[yy, xx] == classes[y, x]:
                        out[yy, xx] = n
                        queue.append((yy, xx))
            n += 1
    return out


def _blur(img: np.ndarray) -> np.ndarray:
    """3x3 box blur of float [H, W, 3] (edge padding)."""
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(p[i : i + img.shape[0], j : j + img.shape[1]] for i in range(3) for j in range(3)) / 9


# --------------------------------------------------------------------------------------- pixels -> objects
def test_label_components_hand_made():
    classes = np.array(
        [
            [0, 0, -1, 1],
            [-1, 0, -1, 1],
            [2, -1, -1, -1],
            [2, 2, -1, 0],
        ]
    )
    labels, n = label_components(classes)
    # {(0,0),(0,1),(1,1)} class 0 | {(0,3),(1,3)} class 1 | {(2,0),(3,0),(3,1)} class 2 | {(3,3)} class 0
    expected = np.array(
        [
            [0, 0, -1, 1],
            [-1, 0, -1, 1],
            [2, -1, -1, -1],
            [2, 2, -1, 3],
        ]
    )
    assert n == 4 and np.array_equal(labels, expected)
    diagonal = np.array([[0, -1], [-1, 0]])
    assert label_components(diagonal, connectivity=4)[1] == 2
    assert label_components(diagonal, connectivity=8)[1] == 1
    assert label_components(np.array([[0, 1, 1, 0]]))[1] == 3  # touching pixels of different colours split
    assert label_components(-np.ones((3, 3), dtype=int))[1] == 0
    with pytest.raises(UserError, match="connectivity=6"):
        label_components(diagonal, connectivity=6)


def test_label_components_matches_bfs_and_handles_a_snake():
    rng = np.random.default_rng(0)
    for p in (0.3, 0.55, 0.7):
        classes = np.where(rng.random((24, 24)) < p, rng.integers(0, 2, (24, 24)), -1)
        labels, n = label_components(classes)
        ref = _bfs_labels(classes)
        assert n == ref.max() + 1 and np.array_equal(labels, ref)
    snake = -np.ones((16, 16), dtype=int)  # one long path: every other row, joined alternately at the ends
    snake[::2] = 0
    snake[1::4, -1] = 0
    snake[3::4, 0] = 0
    assert label_components(snake)[1] == 1


def test_palette_alpha_by_hand():
    # blue (25, 70, 230) half-mixed with white -> (140, 162.5, 242.5): chroma 102.5 = half of 205 -> alpha 0.5
    blue, white = np.array(PALETTE["blue"], float), np.full(3, 255.0)
    pixels = np.stack([blue, 0.5 * blue + 0.5 * white, white, np.full(3, 128.0), np.array(PALETTE["yellow"], float)])
    k, alpha = palette_alpha(pixels[None] / 255)
    assert alpha[0].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0, 1.0])
    assert [COLORS[i] for i in k[0, [0, 1, 4]]] == ["blue", "blue", "yellow"]


@pytest.mark.parametrize("size", [32, 64])
def test_detect_single_rendered_shapes(size):
    # every shape x colour at the smallest, a middle and the largest size, off-centre
    for shape in SHAPES:
        for color in COLORS:
            for s, cx, cy in ((0.25, 0.3, 0.6), (0.31, 0.55, 0.45), (0.375, 0.7, 0.3)):
                obj = Obj(shape, color, cx, cy, s)
                (det,) = detect(render(Scene((obj,)), size=size))
                assert (det.color, det.shape) == (color, shape), (obj, det)
                assert (det.cx, det.cy) == pytest.approx((cx, cy), abs=0.25 / size)  # within a quarter pixel
                area = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[shape] * s * s
                assert det.area == pytest.approx(area, rel=0.1)


def test_detect_ignores_background_noise_and_specks():
    rng = np.random.default_rng(0)
    white = np.ones((32, 32, 3))
    assert detect(np.clip(white + rng.normal(0, 0.05, white.shape), 0, 1)) == []
    assert detect(np.full((32, 32, 3), 0.5)) == [] and detect(np.zeros((32, 32, 3))) == []  # grey, black
    img = np.full((32, 32, 3), 255, dtype=np.uint8)
    img[2:5, 2:5] = PALETTE["red"]  # 9 px < 0.01 * 1024 = 10.24 px: noise
    img[20:30, 20:30] = PALETTE["green"]  # 100 px: a green square
    assert [(d.color, d.shape) for d in detect(img)] == [("green", "square")]


def test_detect_accepts_every_image_format():
    img = render(Scene((Obj("triangle", "yellow", 0.3, 0.6, 0.3), Obj("circle", "blue", 0.75, 0.3, 0.3))), 32)
    ref = detect(img)  # uint8 [H, W, 3]
    assert [(d.color, d.shape) for d in ref] == [("blue", "circle"), ("yellow", "triangle")]
    for other in (to_tensor(img), to_tensor(img).numpy(), img / 255.0, Image.fromarray(img), torch.from_numpy(img)):
        got = detect(other)
        assert [(d.color, d.shape) for d in got] == [(d.color, d.shape) for d in ref]
        assert [v for d in got for v in (d.cx, d.cy, d.area)] == pytest.approx(
            [v for d in ref for v in (d.cx, d.cy, d.area)], abs=1e-5
        )
    with pytest.raises(UserError, match=r"\(x \+ 1\) / 2"):
        detect(to_tensor(img) * 2 - 1.0 - 0.6)
    with pytest.raises(UserError, match="shape"):
        detect(np.zeros((32, 32)))


# --------------------------------------------------------------------------------------- atoms and scores
def test_atom_lists_per_kind():
    s = lambda t: [str(a) for a in atoms(t)]  # noqa: E731
    assert s("a red circle") == ["color(red)", "shape(circle)", "present(red circle)"]
    assert s("two red circles") == ["present(red circle)", "count(red circle)=2"]
    assert s("a green triangle on the left") == ["present(green triangle)", "position(green triangle, left)"]
    assert s("a blue square left of a yellow triangle") == [
        "present(blue square)",
        "present(yellow triangle)",
        "relation(blue square left of yellow triangle)",
    ]
    assert s("a red circle and a blue triangle") == ["present(red circle)", "present(blue triangle)"]


def test_exact_adds_a_total_atom_per_prompt():
    s = lambda t: [str(a) for a in atoms(t, exact=True)]  # noqa: E731
    assert s("a red circle") == ["color(red)", "shape(circle)", "present(red circle)", "total=1"]
    assert s("three red circles") == ["present(red circle)", "count(red circle)=3", "total=3"]
    assert s("a green triangle on the left")[-1] == "total=1"
    assert s("a blue square left of a yellow triangle")[-1] == "total=2"
    assert s("a red circle and a blue triangle") == ["present(red circle)", "present(blue triangle)", "total=2"]


def test_exact_punishes_the_hedging_third_object():
    """A right scene plus an unmentioned object: shapes 3/3 (GenEval-style), shapes_exact 3/4."""
    square, tri = Obj("square", "blue", 0.25, 0.3, 0.25), Obj("triangle", "yellow", 0.75, 0.3, 0.25)
    extra = Obj("circle", "red", 0.5, 0.8, 0.25)
    prompt = "a blue square left of a yellow triangle"
    hedged, clean = render(Scene((square, tri, extra)), 32), render(Scene((square, tri)), 32)
    assert score(prompt, hedged)[:2] == (1.0, True)
    assert score(prompt, hedged, exact=True)[:2] == (0.75, False)
    assert score(prompt, clean, exact=True)[:2] == (1.0, True)
    # "two red circles" drawn as one: [present=1, count=0, total(2)=0] -> 1/3
    assert score("two red circles", render(Scene((extra,)), 32), exact=True)[0] == pytest.approx(1 / 3)
    rows = torch.stack([to_tensor(hedged), to_tensor(clean)])
    for name, want in (("shapes", [1.0, 1.0]), ("shapes_exact", [0.75, 1.0]), ("shapes_strict", [1.0, 1.0])):
        got = registry.get(name)(rows, [prompt, prompt], [{}, {}], RewardContext(group_size=2))
        assert got.tolist() == want, name


def _score(prompt, *objs, size=32):
    frac, ok, details = score(prompt, render(Scene(objs), size=size))
    return frac, ok, {str(a): v for a, v in details}


def test_partial_scores_hand_computed():
    red_circle = Obj("circle", "red", 0.25, 0.5, 0.3)
    # "two red circles", one red circle: [present=1, count(=2)=0] -> 1/2
    assert _score("two red circles", red_circle) == (
        0.5,
        False,
        {"present(red circle)": True, "count(red circle)=2": False},
    )
    # two red circles side by side: [1, 1] -> 1
    assert _score("two red circles", red_circle, Obj("circle", "red", 0.75, 0.5, 0.3))[:2] == (1.0, True)
    # "a red circle" with a blue circle: [color(red)=0, shape(circle)=1, present=0] -> 1/3
    assert _score("a red circle", Obj("circle", "blue", 0.5, 0.5, 0.3))[0] == pytest.approx(1 / 3)
    # ... with a red square: [1, 0, 0] -> 1/3; with the red circle: 3/3
    assert _score("a red circle", Obj("square", "red", 0.5, 0.5, 0.3))[0] == pytest.approx(1 / 3)
    assert _score("a red circle", red_circle)[:2] == (1.0, True)
    # green triangle at cx = 0.8 for "on the left": [present=1, position=0] -> 1/2; at cx = 0.2: 2/2
    assert _score("a green triangle on the left", Obj("triangle", "green", 0.8, 0.5, 0.3))[0] == 0.5
    assert _score("a green triangle on the left", Obj("triangle", "green", 0.2, 0.5, 0.3))[0] == 1.0
    # relation reversed (square right of triangle): [present A=1, present B=1, relation=0] -> 2/3
    square, tri = Obj("square", "blue", 0.75, 0.5, 0.3), Obj("triangle", "yellow", 0.25, 0.5, 0.3)
    assert _score("a blue square left of a yellow triangle", square, tri)[0] == pytest.approx(2 / 3)
    assert _score("a blue square right of a yellow triangle", square, tri)[:2] == (1.0, True)
    # pair with the triangle in the wrong colour: [1, 0] -> 1/2
    green_tri = Obj("triangle", "green", 0.75, 0.5, 0.3)
    assert _score("a red circle and a blue triangle", red_circle, green_tri)[0] == 0.5
    # "above" compares y (down is +): circle at y 0.2 above square at y 0.7
    above = (Obj("circle", "red", 0.5, 0.2, 0.3), Obj("square", "green", 0.5, 0.7, 0.3))
    assert _score("a red circle above a green square", *above)[:2] == (1.0, True)
    assert _score("a red circle below a green square", *above)[0] == pytest.approx(2 / 3)


def test_atoms_agree_with_scene_ground_truth():
    """Object level (no pixels): sampled scenes satisfy every atom, mismatched ones violate at least one."""
    rng = np.random.default_rng(1)
    for t in all_prompts():
        good, bad = sample_scene(t, rng, max_distractors=2), sample_mismatched_scene(t, rng)
        assert all(a.holds(good.objects) for a in atoms(t)), (t, good)
        assert not all(a.holds(bad.objects) for a in atoms(t)), (t, bad)


# ------------------------------------------------------------------------------------ verifier quality
def _prompts_by_kind(n: int, rng: np.random.Generator) -> list[str]:
    """n prompts cycling through the kinds, each drawn uniformly within its kind."""
    by_kind = {k: [t for t in all_prompts() if parse_prompt(t).kind == k] for k in KINDS}
    return [by_kind[KINDS[i % 5]][rng.integers(len(by_kind[KINDS[i % 5]]))] for i in range(n)]


@pytest.mark.parametrize("size", [32, 64])
def test_verifier_accuracy_and_false_accepts(size):
    rng = np.random.default_rng(size)
    prompts = _prompts_by_kind(250, rng)
    correct = [score(t, render(sample_scene(t, rng, max_distractors=i % 2), size))[1] for i, t in enumerate(prompts)]
    false_accept = [score(t, render(sample_mismatched_scene(t, rng), size))[1] for t in prompts]
    assert np.mean(correct) >= 0.99  # measured 1.000
    assert np.mean(false_accept) <= 0.05  # measured 0.000
    # shapes_exact: scenes of exactly the mentioned objects pass, a distractor fails the total atom
    exact = [score(t, render(sample_scene(t, rng), size), exact=True)[1] for t in prompts]
    assert np.mean(exact) >= 0.99  # measured 1.000
    scenes = [sample_scene(t, rng, max_distractors=1) for t in prompts]  # 0 or 1 extra object
    with_extra = [len(sc.objects) > atoms(t, exact=True)[-1].n for t, sc in zip(prompts, scenes)]
    passed = [score(t, render(sc, size), exact=True)[1] for t, sc in zip(prompts, scenes)]
    assert 0.2 < np.mean(with_extra) < 0.8
    assert np.mean([p != e for p, e in zip(passed, with_extra)]) >= 0.99  # an extra object fails, none passes


def test_verifier_robust_to_noise_and_blur_at_32px():
    rng = np.random.default_rng(3)
    prompts = _prompts_by_kind(200, rng)
    images = [render(sample_scene(t, rng), 32) / 255.0 for t in prompts]
    noisy = [np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1) for x in images]
    assert np.mean([score(t, x)[1] for t, x in zip(prompts, noisy)]) >= 0.95  # measured 1.000
    assert np.mean([score(t, _blur(x))[1] for t, x in zip(prompts, images)]) >= 0.95  # measured 1.000
    assert np.mean([score(t, _blur(x))[1] for t, x in zip(prompts, noisy)]) >= 0.95  # measured 1.000


def test_detect_is_fast():
    rng = np.random.default_rng(0)
    for size, budget_ms in ((32, 5.0), (64, 20.0)):  # measured ~0.45 ms and ~1.3 ms on one CPU core
        images = [render(random_scene(rng, n_objects=3), size) for _ in range(30)]
        times = []
        for img in images:
            t0 = time.perf_counter()
            detect(img)
            times.append(time.perf_counter() - t0)
        assert np.median(times) * 1e3 < budget_ms


# ------------------------------------------------------------------------------------------- rewards
def test_registered_rewards_score_a_batch():
    red_circle, red_circle_2 = Obj("circle", "red", 0.25, 0.5, 0.3), Obj("circle", "red", 0.75, 0.5, 0.3)
    images = [render(Scene(objs), 32) for objs in ((red_circle, red_circle_2), (red_circle,), (red_circle_2,))]
    prompts = ["two red circles", "two red circles", "a blue square"]  # [1, 1] -> 1; [1, 0] -> 0.5; [0, 0, 0] -> 0
    samples = torch.stack([to_tensor(x) for x in images])  # [N=3, 3, 32, 32]
    ctx = RewardContext(group_size=3)
    frac = registry.get("shapes")(samples, prompts, [{}] * 3, ctx)
    strict = registry.get("shapes_strict")(samples, prompts, [{}] * 3, ctx)
    assert frac.dtype == torch.float32 and frac.shape == (3,)
    assert frac.tolist() == [1.0, 0.5, 0.0] and strict.tolist() == [1.0, 0.0, 0.0]
    as_pil = registry.get("shapes")([Image.fromarray(x) for x in images], prompts, [{}] * 3, ctx)
    as_uint8 = registry.get("shapes_strict")(images, prompts, [{}] * 3, ctx)
    assert as_pil.tolist() == frac.tolist() and as_uint8.tolist() == strict.tolist()
    assert {"shapes", "shapes_strict"} <= set(registry.available())


def test_reward_rejects_user_mistakes():
    fn = registry.get("shapes")
    samples = torch.ones(2, 3, 32, 32)
    with pytest.raises(UserError, match="2 samples but 1 prompts"):
        fn(samples, ["a red circle"], [{}], None)
    with pytest.raises(UserError, match="'a purple circle'"):
        fn(samples, ["a red circle", "a purple circle"], [{}, {}], None)
    with pytest.raises(UserError, match="bad options"):
        registry.get("shapes", min_alpah=0.4)


# ------------------------------------------------------------------------------------------ readability
def test_clutter_makes_an_image_unreadable_and_scores_zero():
    rng = np.random.default_rng(0)
    scene = Scene((Obj("circle", "red", 0.3, 0.5, 0.3), Obj("square", "blue", 0.75, 0.5, 0.3)))
    clean = render(scene, 32)
    prompt = "a red circle left of a blue square"
    assert score(prompt, clean)[:2] == (1.0, True) and read_image(clean).readable()
    # RL found this: multi-coloured noise, where some speck of every colour+shape satisfies "present" atoms
    noise = np.stack([PALETTE[c] for c in COLORS])[rng.integers(4, size=(32, 32))].astype(np.uint8)
    noise[rng.random((32, 32)) < 0.3] = 255
    reading = read_image(noise)
    assert reading.foreground > 0.45 and not reading.readable()
    assert score(prompt, noise)[0] == 0.0 and all(not ok for _, ok in score(prompt, noise)[2])
    # the same clean scene plus specks (each under min_area) over 5% of the image: unreadable
    specked = clean.copy()
    ys, xs = np.nonzero((np.arange(32)[:, None] % 3 == 0) & (np.arange(32)[None, :] % 3 == 0))
    for y, x in zip(ys, xs):
        if (specked[y, x] == 255).all():
            specked[y, x] = PALETTE["green"]
    r = read_image(specked)
    assert [(d.color, d.shape) for d in r.objects] == [(d.color, d.shape) for d in detect(clean)]
    assert r.stray > 0.05 and score(prompt, specked)[0] == 0.0
    assert score(prompt, specked, max_stray=1.0)[:2] == (1.0, True)  # the threshold is an option
    # five separate objects: more than the world ever draws (3) plus one spare
    five = render(Scene(tuple(Obj("square", "green", x, y, 0.2) for x, y in
                              ((0.15, 0.15), (0.85, 0.15), (0.5, 0.5), (0.15, 0.85), (0.85, 0.85)))), 32)  # fmt: skip
    assert len(detect(five)) == 5 and score("a green square", five)[0] == 0.0
    assert registry.get("shapes", max_objects=5)([five], ["a green square"], [{}], None).item() == 1.0


def test_rendered_scenes_are_always_readable():
    rng = np.random.default_rng(7)
    for size in (32, 64):
        for t in _prompts_by_kind(150, rng):
            for img in (render(sample_scene(t, rng, max_distractors=2), size),
                        render(sample_mismatched_scene(t, rng), size)):  # fmt: skip
                assert read_image(img).readable(), t
