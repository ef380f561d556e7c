"""The scene scorer against the scenes' own ground truth."""

import random

import numpy as np
from PIL import Image

from lora_train.testing import scenes
from lora_train.testing.scorer import score, shape_of


def test_scorer_reads_the_generated_scenes():
    rng = random.Random(123)
    truth = [scenes.random_scene(rng, shapes=scenes.SHAPES) for _ in range(400)]
    truth += [scenes.random_scene(rng, colour=scenes.CONCEPT_PATTERN) for _ in range(100)]
    right = sum(score(scenes.draw(s)).matches(s) for s in truth)
    wrong = [(s, score(scenes.draw(s))) for s in truth if not score(scenes.draw(s)).matches(s)]
    assert right == len(truth), wrong[:5]  # every drawn scene: the scorer is the ground truth of every fidelity number
    # every shape, colour, side and background occurs, so none of them is left untested
    assert {s.shape for s in truth} == set(scenes.SHAPES)
    assert {s.colour for s in truth} == set(scenes.COLOURS) | {scenes.CONCEPT_PATTERN}
    assert {s.background for s in truth} == set(scenes.BACKGROUNDS)


def test_each_label_follows_its_own_feature():
    star = scenes.Scene("star", "blue", "right", "gray", radius=12)
    labels = score(scenes.draw(star))
    assert (labels.shape, labels.colour, labels.position, labels.background) == ("star", "blue", "right", "gray")
    moved = score(scenes.draw(scenes.Scene("star", "blue", "left", "gray", radius=12)))
    assert moved.position == "left" and moved.shape == "star"
    recoloured = score(scenes.draw(scenes.Scene("star", "yellow", "right", "black", radius=12)))
    assert (recoloured.colour, recoloured.background) == ("yellow", "black")


def test_the_pattern_needs_both_halves(monkeypatch):
    pattern = scenes.Scene("circle", scenes.CONCEPT_PATTERN, "left", "white", radius=13)
    assert score(scenes.draw(pattern)).colour == scenes.CONCEPT_PATTERN
    top, bottom = scenes.PATTERNS[scenes.CONCEPT_PATTERN]
    with monkeypatch.context() as m:  # drawn only; the scorer does not know it
        m.setitem(scenes.PATTERNS, "flipped", (bottom, top))
        image = scenes.draw(scenes.Scene("circle", "flipped", "left", "white", radius=13))
    upside_down = score(image).colour
    assert upside_down == "mixed"  # orange over purple is not the pattern
    assert score(scenes.draw(scenes.Scene("circle", "red", "left", "white", radius=13))).colour == "red"


def test_blur_does_not_turn_convex_shapes_into_stars():
    from PIL import ImageFilter

    for shape in scenes.BASE_SHAPES:
        im = scenes.draw(scenes.Scene(shape, "red", "left", "white", radius=11)).filter(ImageFilter.GaussianBlur(1.5))
        assert score(im).shape == shape


def test_an_empty_image_has_no_object(tmp_path):
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path)
    labels = score(path)  # paths work as well as images
    assert (labels.background, labels.shape, labels.colour) == ("gray", "none", "none")


def test_shape_rules_on_ideal_figures():
    assert shape_of(fill=1.0, solidity=1.0) == "square"
    assert shape_of(fill=1.0, solidity=1.0, aspect=2.4) == "bar"
    assert shape_of(fill=0.785, solidity=1.0, aspect=1.2) == "circle"  # a blob a little taller than wide
    assert shape_of(fill=0.785, solidity=1.0) == "circle"
    assert shape_of(fill=0.5, solidity=1.0) == "triangle"
    assert shape_of(fill=0.33, solidity=0.48) == "star"
