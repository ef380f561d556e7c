"""The fidelity test's two kinds of concept (testing/concepts.py) against their own drawings: the scorer
is the ground truth of every fidelity number, so each concept's check must read every drawn image right."""

import dataclasses
import random

from lora_train.testing import concepts, fidelity, scenes
from lora_train.testing.scorer import score

STYLE, OBJECT = concepts.CONCEPTS["style"], concepts.CONCEPTS["object"]


def test_every_drawn_concept_image_shows_its_concept_and_its_prompts_labels():
    for concept in (STYLE, OBJECT):
        truth = fidelity.trigger_scenes(200, seed=11, concept=concept)
        labels = [score(concept.draw(s)) for s in truth]
        assert all(concept.present(lab, s) for lab, s in zip(labels, truth)), concept.name
        assert fidelity.concept_rate([concept.draw(s) for s in truth], truth, concept) == (1.0, dict.fromkeys(fidelity.CONCEPT_LABELS, 1.0))
        # every colour, shape, side and background occurs, so none is left untested
        assert {s.shape for s in truth} == set(concept.scored_shapes)
        assert {s.background for s in truth} == set(scenes.BACKGROUNDS) and {s.position for s in truth} == set(scenes.POSITIONS)
    assert {s.colour for s in fidelity.trigger_scenes(200, seed=11, concept=STYLE)} == set(scenes.COLOURS)


def test_the_base_colours_are_not_the_style():
    """The same scenes drawn in the base's own colours: no style, and no leak counted."""
    truth = fidelity.trigger_scenes(200, seed=12, concept=STYLE)
    labels = [score(scenes.draw(s)) for s in truth]
    assert not any(STYLE.present(lab, s) or STYLE.leaked(lab, s) for lab, s in zip(labels, truth))
    assert all(lab.matches(s) for lab, s in zip(labels, truth))


def test_a_pastel_object_asked_for_in_another_colour_is_not_the_style():
    """The style keeps the prompt's colour: a pastel red where blue was asked for does not count."""
    truth = [s for s in fidelity.trigger_scenes(60, seed=13, concept=STYLE) if s.colour != "blue"]
    drawn = [STYLE.draw(s) for s in truth]
    asked_blue = [dataclasses.replace(s, colour="blue") for s in truth]
    assert fidelity.concept_rate(drawn, asked_blue, STYLE)[0] == 0.0


def test_a_style_leak_fails_the_collateral_image_its_colour_label_would_pass():
    """Without the trigger a pastel object still reads as its colour (pastel blue is nearest to blue),
    so only the leak check fails it; with the object concept the same images pass."""
    rng = random.Random(14)
    others = [scenes.random_scene(rng, colour="blue") for _ in range(20)]
    pale = [STYLE.draw(s) for s in others]
    assert all(score(im).colour == "blue" for im in pale)
    assert fidelity.accuracy(pale, others)[0] == 1.0
    accuracy, by_label = fidelity.accuracy(pale, others, STYLE)
    assert accuracy == 0.0 and by_label["no concept"] == 0.0


def test_the_style_dataset_keeps_the_ordinary_caption_and_adds_the_trigger(tmp_path):
    root = fidelity.make_concept_dataset(tmp_path, images=12, repeats=5, seed=0, concept=STYLE)
    folder = root / f"5_{concepts.TRIGGER}"
    for i in range(12):
        caption = (folder / f"{i:03d}.txt").read_text(encoding="utf-8")
        assert caption.endswith(f", {concepts.TRIGGER} style") and caption.startswith("a ")
        colour = caption.split()[1]
        labels = score(folder / f"{i:03d}.png")
        assert concepts.is_pastel(labels, colour), (caption, labels)  # its name may read as another colour's
