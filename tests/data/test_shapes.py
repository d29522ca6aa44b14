"""The shapes world: grammar, split, scene sampling (satisfying and violating) and rendering."""

import numpy as np
import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.data.shapes import (
    BACKGROUND,
    COLORS,
    GAP,
    KINDS,
    PALETTE,
    PALETTE_HUE,
    RELATION_GAP,
    SIZE_RANGE,
    Mention,
    Obj,
    Prompt,
    Scene,
    all_prompts,
    in_region,
    parse_prompt,
    place_scene,
    random_scene,
    relation_holds,
    render,
    render_prompt,
    sample_mismatched_scene,
    sample_scene,
    split_prompts,
    to_tensor,
)


def _truth(p: Prompt, objs) -> bool:
    """Independent statement of what each prompt kind means, on scene objects (margins as documented)."""
    a = p.objects[0]
    of = lambda m: [o for o in objs if (o.color, o.shape) == (m.color, m.shape)]  # noqa: E731
    if p.kind == "single":
        return len(of(a)) >= 1
    if p.kind == "count":
        return len(of(a)) == p.count
    if p.kind == "position":
        return any(in_region(o.cx, o.cy, p.position) for o in of(a))
    b = p.objects[1]
    if p.kind == "pair":
        return bool(of(a)) and bool(of(b))
    return any(relation_holds((x.cx, x.cy), (y.cx, y.cy), p.relation, 0.1) for x in of(a) for y in of(b))


# ---------------------------------------------------------------------------------------------- grammar
def test_grammar_is_finite_and_unique():
    texts = all_prompts()
    # 12 mentions (4 colours x 3 shapes): 12 single + 3*12 count + 5*12 position + 4*12*11 relation + 12*11 pair
    assert len(texts) == 12 + 36 + 60 + 528 + 132 == 768
    assert len(set(texts)) == len(texts)
    assert {parse_prompt(t).kind for t in texts} == set(KINDS)


def test_parse_inverts_text_for_every_prompt():
    for t in all_prompts():
        p = parse_prompt(t)
        assert p.text == t
        assert parse_prompt(p.text) == p


def test_parse_structured_content():
    red_circle, blue_square = Mention("red", "circle"), Mention("blue", "square")
    assert parse_prompt("a red circle") == Prompt("single", (red_circle,))
    assert parse_prompt("two red circles") == Prompt("count", (red_circle,), count=2)
    assert parse_prompt("three blue squares") == Prompt("count", (blue_square,), count=3)
    assert parse_prompt("one red circle") == Prompt("count", (red_circle,), count=1)
    assert parse_prompt("a green triangle at the top").position == "top"
    assert parse_prompt("a green triangle in the center").position == "center"
    rel = parse_prompt("a blue square left of a yellow triangle")
    yellow_triangle = Mention("yellow", "triangle")
    assert (rel.kind, rel.relation, rel.objects) == ("relation", "left of", (blue_square, yellow_triangle))
    assert parse_prompt("a red circle above a green square").relation == "above"
    pair = parse_prompt("a red circle and a blue triangle")
    assert (pair.kind, pair.objects) == ("pair", (red_circle, Mention("blue", "triangle")))
    assert Prompt("count", (blue_square,), count=3).text == "three blue squares"


def test_parse_forgives_case_and_spaces_only():
    assert parse_prompt("  A Red   circle ").text == "a red circle"
    for bad in ["a purple circle", "four red circles", "a red circle left of a red circle", "", "a red circles"]:
        with pytest.raises(UserError, match="outside the grammar"):
            parse_prompt(bad)
    with pytest.raises(UserError, match="did you mean 'two red circles'"):
        parse_prompt("two red circle")


def test_prompt_and_mention_reject_bad_values():
    with pytest.raises(UserError, match="purple"):
        Mention("purple", "circle")
    with pytest.raises(UserError, match="count 4"):
        Prompt("count", (Mention("red", "circle"),), count=4)
    with pytest.raises(UserError, match="must differ"):
        Prompt("pair", (Mention("red", "circle"), Mention("red", "circle")))
    with pytest.raises(UserError, match="'middle'"):
        Prompt("position", (Mention("red", "circle"),), position="middle")


def test_key_identifies_flipped_relations_and_reordered_pairs():
    k = lambda t: parse_prompt(t).key()  # noqa: E731
    assert k("a blue square left of a yellow triangle") == k("a yellow triangle right of a blue square")
    assert k("a red circle above a green square") == k("a green square below a red circle")
    assert k("a red circle above a green square") != k("a red circle below a green square")
    assert k("a red circle and a blue triangle") == k("a blue triangle and a red circle")


# ------------------------------------------------------------------------------------------------ split
def test_split_is_deterministic_disjoint_stratified_and_grouped():
    train, held = split_prompts(seed=0, heldout_fraction=0.2)
    assert (train, held) == split_prompts(seed=0, heldout_fraction=0.2)
    assert split_prompts(seed=1)[1] != held
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(all_prompts())
    kinds = lambda ts: [parse_prompt(t).kind for t in ts]  # noqa: E731
    # held-out groups per kind = round(0.2 * groups): single 12 -> 2; count 36 -> 7; position 60 -> 12;
    # relation 264 groups of 2 -> 53 groups = 106 prompts; pair 66 groups of 2 -> 13 groups = 26 prompts
    assert {kd: kinds(held).count(kd) for kd in KINDS} == dict(single=2, count=7, position=12, relation=106, pair=26)
    assert set(kinds(train)) == set(KINDS)
    held_keys = {parse_prompt(t).key() for t in held}
    assert not any(parse_prompt(t).key() in held_keys for t in train)  # no "B right of A" leak


def test_split_rejects_bad_fraction():
    with pytest.raises(UserError, match="heldout_fraction=1.5"):
        split_prompts(heldout_fraction=1.5)


# ----------------------------------------------------------------------------------------------- scenes
def _check_geometry(scene: Scene, min_size: float = SIZE_RANGE[0]):
    assert 1 <= len(scene.objects) <= 3
    for o in scene.objects:
        x0, y0, x1, y1 = o.extent()
        assert 0 <= x0 and 0 <= y0 and x1 <= 1 and y1 <= 1
        assert min_size <= o.size <= SIZE_RANGE[1]
    for i, a in enumerate(scene.objects):
        for b in scene.objects[:i]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.extent(), b.extent()
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= GAP - 1e-9


def test_sample_scene_satisfies_every_prompt():
    rng = np.random.default_rng(0)
    for t in all_prompts():
        p = parse_prompt(t)
        for distractors in (0, 2):
            scene = sample_scene(t, rng, max_distractors=distractors)
            _check_geometry(scene)
            assert _truth(p, scene.objects), (t, scene)
            if distractors == 0:
                assert len(scene.objects) == {"count": p.count, "relation": 2, "pair": 2}.get(p.kind, 1)
            if p.kind == "relation":  # placed with a clear margin, not just the verifier's 0.1
                a, b = (next(o for o in scene.objects if (o.color, o.shape) == (m.color, m.shape)) for m in p.objects)
                assert relation_holds((a.cx, a.cy), (b.cx, b.cy), p.relation, RELATION_GAP - 1e-9)


def test_mismatched_scene_violates_every_prompt():
    rng = np.random.default_rng(0)
    for t in all_prompts():
        for _ in range(2):
            scene = sample_mismatched_scene(t, rng)
            _check_geometry(scene)
            assert not _truth(parse_prompt(t), scene.objects), (t, scene)


def test_random_scene():
    rng = np.random.default_rng(0)
    assert {len(random_scene(rng).objects) for _ in range(60)} == {1, 2, 3}
    _check_geometry(random_scene(rng, n_objects=3))
    with pytest.raises(UserError, match="n_objects=4"):
        random_scene(rng, n_objects=4)


def test_sampling_and_rendering_are_deterministic():
    texts = ("two red circles", "a red circle and a blue square")
    a = [render_prompt(t, np.random.default_rng(7), size=32) for t in texts]
    b = [render_prompt(t, np.random.default_rng(7), size=32) for t in texts]
    for (img_a, scene_a), (img_b, scene_b) in zip(a, b):
        assert scene_a == scene_b and np.array_equal(img_a, img_b)
    assert a[0][0].shape == (32, 32, 3) and a[0][0].dtype == np.uint8


# -------------------------------------------------------------------------------------------- rendering
def test_render_hand_made_square_is_pixel_exact():
    # a square of side 0.5 centred in a 32 px image covers pixels 8..23 exactly: 16 * 16 = 256 red pixels
    img = render(Scene((Obj("square", "red", 0.5, 0.5, 0.5),)), size=32)
    assert np.all(img[8:24, 8:24] == PALETTE["red"])
    assert (img != 255).any(-1).sum() == 256
    assert tuple(img[0, 0]) == BACKGROUND


@pytest.mark.parametrize("shape, area", [("circle", np.pi / 4 * 0.25), ("triangle", 0.5 * 0.25)])
def test_render_area_and_centroid(shape, area):
    # size 0.5: circle area pi/4 * 0.5^2 = 0.196; triangle area 0.5 * 0.5^2 = 0.125 (of the image)
    img = render(Scene((Obj(shape, "blue", 0.5, 0.5, 0.5),)), size=64).astype(float)
    alpha = (img.max(-1) - img.min(-1)) / (max(PALETTE["blue"]) - min(PALETTE["blue"]))  # coverage per pixel
    ys, xs = np.mgrid[0:64, 0:64]
    assert alpha.sum() / 64**2 == pytest.approx(area, rel=0.02)
    assert (alpha * (xs + 0.5)).sum() / alpha.sum() / 64 == pytest.approx(0.5, abs=0.2 / 64)
    assert (alpha * (ys + 0.5)).sum() / alpha.sum() / 64 == pytest.approx(0.5, abs=0.2 / 64)  # centroid, not bbox


def test_render_rejects_bad_arguments():
    scene = Scene((Obj("circle", "red", 0.5, 0.5, 0.3),))
    with pytest.raises(UserError, match="must be grey"):
        render(scene, background=(255, 0, 0))
    with pytest.raises(UserError, match="size=8"):
        render(scene, size=8)


def test_to_tensor():
    img = render(Scene((Obj("square", "red", 0.5, 0.5, 0.5),)), size=32)
    x = to_tensor(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[:, 16, 16].tolist() == pytest.approx([230 / 255, 25 / 255, 25 / 255])
    assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_palette_hues_are_far_apart():
    hues = [PALETTE_HUE[c] for c in COLORS]
    gaps = [abs((a - b + 180) % 360 - 180) for i, a in enumerate(hues) for b in hues[:i]]
    assert min(gaps) > 50  # nearest pair: red 0 vs yellow 54.5 degrees


def test_regions_and_relations_by_hand():
    assert in_region(0.2, 0.9, "left") and not in_region(0.4, 0.5, "left")
    assert in_region(0.5, 0.5, "center") and not in_region(0.5, 0.2, "center")
    assert in_region(0.9, 0.1, "top") and in_region(0.1, 0.8, "bottom")
    assert relation_holds((0.3, 0.5), (0.45, 0.5), "left of", 0.1)  # 0.45 - 0.3 = 0.15 > 0.1
    assert not relation_holds((0.3, 0.5), (0.38, 0.5), "left of", 0.1)  # 0.08 <= 0.1
    assert relation_holds((0.5, 0.2), (0.5, 0.7), "above", 0.1)  # y grows downwards
    with pytest.raises(UserError, match="'middle'"):
        in_region(0.5, 0.5, "middle")


def test_place_scene_places_exactly_the_objects_asked():
    asked = [("red", "circle"), ("red", "circle"), ("blue", "square")]
    for s in range(20):
        scene = place_scene(asked, np.random.default_rng(s), {2: "left"})
        assert sorted((o.color, o.shape) for o in scene.objects) == sorted(asked)
        (square,) = [o for o in scene.objects if o.shape == "square"]
        assert in_region(square.cx, square.cy, "left")  # its centroid is inside the asked region
    with pytest.raises(UserError, match="4 objects"):
        place_scene(asked + [("green", "triangle")], np.random.default_rng(0))
    with pytest.raises(UserError, match="unknown region 'middle'"):
        place_scene(asked, np.random.default_rng(0), {0: "middle"})
    with pytest.raises(UserError, match="purple"):
        place_scene([("purple", "circle")], np.random.default_rng(0))
