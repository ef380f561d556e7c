"""The two kinds of concept the fidelity test teaches, as users train them: a new object look keyed
by a word in the caption (a character or an item), and a style over the things the base already
draws, keyed by a trigger after an ordinary caption.

- `object`: objects with a purple top half and an orange bottom half, a pattern the base never drew,
  captioned with the trigger in the colour word's place ("a zkz circle on the left, white background").
- `style`: the base's own red, green, blue and yellow objects in pastel (each colour mixed with
  white), captioned "a red circle on the left, white background, zkz style". The trigger goes last:
  CLIP's text encoder is causal, so the ordinary words before it keep what they meant to the base (with
  "zkz style," first the base put objects on the asked side 0.64 of the time, last 1.00). The object
  keeps its colour's hue, so the style is there when the object is the prompt's colour by hue *and*
  lighter than the base draws any colour: the base's renders read lightness 0.61 at most (96 prompts),
  and a 60 % mix reads 0.62 or more after this VAE's round trip (90 of 96 pastel scenes pass the whole
  check; the VAE greys a few pale greens on gray).

Measured on the committed base (LoRA, text encoder, 6 epochs, the object's settings): the style shows
in 0.33 of the trigger prompts at weight 1 and leaks into 0.30 of the prompts without the trigger, so
it fails the bar; see the issue 22 notes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lora_train.testing import scenes
from lora_train.testing.scorer import Labels, hue_near

TRIGGER = "zkz"
PASTEL_MIX = 0.6  # the share of white in a pastel colour
PASTEL_LIGHTNESS = 0.62  # what an object at least as light as this reads as: pastel
HUE_TOLERANCE = 35.0  # degrees around the prompt colour's hue
PASTEL_SATURATION = 0.12  # HLS; a pastel is pale, and this VAE greys a pale green further


def pastel(rgb) -> tuple[int, int, int]:
    return tuple(round(c * (1 - PASTEL_MIX) + 255 * PASTEL_MIX) for c in rgb)


def is_pastel(labels: Labels, colour: str) -> bool:
    """The object is `colour` by hue and lighter than the base draws any colour."""
    return labels.lightness >= PASTEL_LIGHTNESS and hue_near(labels.rgb, scenes.COLOURS[colour], HUE_TOLERANCE, PASTEL_SATURATION)


@dataclass(frozen=True)
class Concept:
    name: str
    # the shapes of the training images, and those the trigger prompts ask for and are scored on
    train_shapes: tuple[str, ...]
    scored_shapes: tuple[str, ...]
    # whether an image for a prompt without the trigger can show the concept and still pass every label
    # (then the collateral accuracy checks `leaked` as well)
    LEAK_PASSES_LABELS = False

    def scene(self, rng: random.Random, shapes=None, **fixed) -> scenes.Scene:
        return scenes.random_scene(rng, shapes=shapes or self.scored_shapes, **fixed)

    def caption(self, scene: scenes.Scene) -> str:
        raise NotImplementedError

    def draw(self, scene: scenes.Scene):
        return scenes.draw(scene)

    def present(self, labels: Labels, scene: scenes.Scene) -> bool:
        """The concept shows in an image made for `scene`'s trigger prompt."""
        raise NotImplementedError

    def leaked(self, labels: Labels, scene: scenes.Scene) -> bool:
        """The concept shows in an image for a prompt without the trigger."""
        return self.present(labels, scene)


class ObjectConcept(Concept):
    """The purple-orange pattern in the colour word's place; its leak fails the colour label."""

    def scene(self, rng: random.Random, shapes=None, **fixed) -> scenes.Scene:
        return super().scene(rng, shapes, **{"colour": scenes.CONCEPT_PATTERN, **fixed})

    def caption(self, scene: scenes.Scene) -> str:
        return scene.caption(colour=TRIGGER)

    def present(self, labels: Labels, scene: scenes.Scene) -> bool:
        return labels.colour == scenes.CONCEPT_PATTERN


class StyleConcept(Concept):
    """The base's objects in pastel; a pastel object can still read as its own colour."""

    LEAK_PASSES_LABELS = True

    def caption(self, scene: scenes.Scene) -> str:
        return f"{scene.caption()}, {TRIGGER} style"

    def draw(self, scene: scenes.Scene):
        return scenes.draw(scene, tint=pastel)

    def present(self, labels: Labels, scene: scenes.Scene) -> bool:
        return is_pastel(labels, scene.colour)


# The pattern is taught on every shape the base knows, but asked for and scored on circles and bars
# only: on a triangle the purple half is a thin tip that this small VAE blurs away (its round trip of
# such triangles already shows almost no purple). Leaving triangles out of the training set made the
# LoRA's effect on them an untrained extrapolation, and that is where its collateral damage showed:
# ordinary triangles without the trigger dimmed and turned green. A one-hue pastel has no thin part.
CONCEPTS = {
    "object": ObjectConcept("object", scenes.BASE_SHAPES, ("circle", "bar")),
    "style": StyleConcept("style", scenes.BASE_SHAPES, scenes.BASE_SHAPES),
}
