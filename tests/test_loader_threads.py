"""max_data_loader_n_workers: the images of the coming batches are made in threads while a step
trains, and every batch, caption and RNG state is bit for bit the one-at-a-time path's (`load`)."""

import random
import threading

import pytest
import torch
from PIL import Image
from conftest import assert_same_as, make_dataset, small_run_config, snapshot
from safetensors.torch import load_file

from lora_train.app import job
from lora_train.dataset.loader import TrainingData
from lora_train.errors import UserError

AUGMENTED = {"random_crop": True, "color_aug": True, "flip_aug": True, "shuffle_caption": True,
             "caption_tag_dropout_rate": 0.3, "token_warmup_step": 3}


def augmented_plan(tmp_path, **extra):
    data = make_dataset(tmp_path / "data", count=6, repeats=2)
    for path in data.rglob("*.png"):  # wider than the 64 px bucket: random_crop has room to move
        Image.open(path).convert("RGB").resize((96, 64)).save(path)
    config = small_run_config(data, "threads", **{**AUGMENTED, **extra})
    return config, job.plan_dataset(config, seed=11)


def sequential(data, batches, rng, first_step, accumulation):
    """What the loop did before threads: `load` each batch in turn (the reference)."""
    out = []
    for j, items in enumerate(batches):
        out.append((data.load(items, 1, rng, step=first_step + j // accumulation), rng.getstate()))
    return out


def test_threaded_batches_are_the_sequential_ones_bit_for_bit(tmp_path, monkeypatch):
    _, plan = augmented_plan(tmp_path)
    plain, threaded = TrainingData(plan, seed=11), TrainingData(plan, seed=11, workers=2)
    batches = plain.epoch_batches(1)
    assert len(batches) >= 4
    want = sequential(plain, batches, random.Random(5), first_step=2, accumulation=2)

    threads = set()
    image = TrainingData._image

    def recording(self, *args):
        threads.add(threading.current_thread().name)
        return image(self, *args)

    monkeypatch.setattr(TrainingData, "_image", recording)
    rng = random.Random(5)
    got = []
    for batch in threaded.feed(batches, 1, rng, first_step=2, accumulation=2):
        got.append((batch, rng.getstate()))  # the caller's RNG is where the sequential path leaves it, batch by batch
    threaded.close()
    assert threads and all(name.startswith("lora-train-images") for name in threads)
    assert len(got) == len(want)
    for (g, g_state), (w, w_state) in zip(got, want):
        assert g.captions == w.captions
        assert torch.equal(g.pixels, w.pixels) and torch.equal(g.sizes, w.sizes) and torch.equal(g.is_reg, w.is_reg)
        assert g_state == w_state
    # the draws differ between batches (the test would not see a reused RNG state otherwise)
    assert len({tuple(b.captions) for b, _ in want}) > 1 and not torch.equal(want[0][0].pixels, want[1][0].pixels)


def test_a_feed_closed_early_leaves_the_rng_after_the_batches_handed_out(tmp_path):
    _, plan = augmented_plan(tmp_path)
    data = TrainingData(plan, seed=11, workers=2)
    batches = data.epoch_batches(1)
    want = sequential(TrainingData(plan, seed=11), batches[:2], random.Random(9), 0, 1)[-1][1]
    rng = random.Random(9)
    feed = data.feed(batches, 1, rng)
    next(feed), next(feed)  # the next ones were drawn and made ahead, from a copy
    feed.close()
    data.close()
    assert rng.getstate() == want


def test_a_run_with_image_threads_trains_the_same_lora(tiny_adapter, tiny_model, tmp_path):
    base = snapshot(tiny_model)
    files = {}
    for workers in (0, 2):
        config, _ = augmented_plan(tmp_path / f"w{workers}", output_dir=str(tmp_path / f"out{workers}"),
                                   max_data_loader_n_workers=workers, save_every_n_epochs=None)
        trainer = job.build_trainer(config, tiny_adapter)
        assert trainer.data.workers == workers
        files[workers] = load_file(trainer.run())
    assert files[0].keys() == files[2].keys()
    assert all(torch.equal(files[0][k], files[2][k]) for k in files[0])
    assert_same_as(tiny_model, base)


def test_threads_are_capped_at_the_cores_and_refuse_nonsense(tmp_path, tiny_adapter, monkeypatch):
    monkeypatch.setattr(job.os, "cpu_count", lambda: 2)
    notes = []
    assert job.image_threads(8, notes) == 2  # sd-scripts' default, on two cores
    assert notes == ["max_data_loader_n_workers 8: 2 threads make the images ahead of each step, one per CPU core of this machine"]
    notes.clear()
    assert job.image_threads(2, notes) == 2 and job.image_threads(0, notes) == 0 and notes == []
    with pytest.raises(UserError, match="max_data_loader_n_workers"):
        job.image_threads(-1, [])
    config, _ = augmented_plan(tmp_path, cache_latents=True, random_crop=False, color_aug=False)
    trainer = job.build_trainer(config, tiny_adapter)
    assert trainer.data.workers == 0 and not [n for n in trainer.notes if "max_data_loader" in n]  # cached: no images to make
