"""The opt-in VAE training mix of `build-base` (--vae-free-colours, --vae-object-weight): what it draws
and how it weighs the loss. Expected values are read from the pixels and counted by hand, not from
the functions under test."""

import random

import numpy as np
import torch

from lora_train.testing import scenes
from lora_train.testing.base import _to_tensor, _vae_batch, free_colour_scene, object_weights


def test_free_colour_scenes_put_new_colours_on_the_scene_backgrounds():
    rng = random.Random(0)
    palette = [np.array(c) for c in scenes.COLOURS.values()]
    backgrounds = {tuple(c) for c in scenes.BACKGROUNDS.values()}
    off_palette = two_coloured = 0
    for _ in range(60):
        a = np.asarray(free_colour_scene(rng), dtype=np.int64)
        assert tuple(a[0, 0]) in backgrounds and tuple(a[-1, -1]) in backgrounds  # corners are background
        obj = a[np.abs(a - a[0, 0]).sum(axis=2) > 60]
        assert len(obj) > 100  # an object of about 26 px across is there
        top, bottom = obj[: len(obj) // 4].mean(axis=0), obj[-len(obj) // 4 :].mean(axis=0)
        off_palette += min(np.abs(top - c).sum() for c in palette) > 60
        two_coloured += np.abs(top - bottom).sum() > 60
    assert off_palette > 45  # random RGB is almost never one of the four base colours
    assert 15 < two_coloured < 45  # half are split in two (a few draws pick two close colours)


def test_the_default_mix_is_the_committed_bases():
    # the committed asset was built from exactly this sequence: a scene, then a broad image, alternating
    expected_rng, rng = random.Random(3), random.Random(3)
    expected = []
    for i in range(6):
        expected.append(scenes.draw(scenes.random_scene(expected_rng, shapes=scenes.SHAPES)) if i % 2 == 0
                        else scenes.broad_image(expected_rng))
    got = _vae_batch(rng, 6, free_colours=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, expected))


def test_object_pixels_weigh_more_and_the_mean_weight_stays_one():
    im = np.full((64, 64, 3), 255, dtype=np.uint8)
    im[20:30, 10:26] = (215, 40, 200)  # 160 object pixels on 4096
    x = _to_tensor([im])
    w = object_weights(x, 4.0)
    # by hand: weights 1 on background, 5 on the object, scaled so the mean is 1: 4096 / (3936 + 5 * 160)
    scale = 4096 / (3936 + 5 * 160)
    assert torch.allclose(w[0, 0, 0, 0], torch.tensor(scale))
    assert torch.allclose(w[0, 0, 25, 15], torch.tensor(5 * scale))
    assert abs(float(w.mean()) - 1.0) < 1e-6
    assert torch.equal(object_weights(x, 0.0), torch.ones_like(w))
