"""The latent cache is keyed by image bytes, crop and VAE, and never trusted blindly."""

import torch
from conftest import make_dataset
from PIL import Image

from lora_train.app import job
from lora_train.dataset.cache import CACHE_DIR, CacheKey, LatentCache, module_fingerprint
from lora_train.dataset.images import load_rgb
from lora_train.network.files import load_lora
from lora_train.train.config import TrainConfig


def encoder(adapter, calls):
    def encode(path):
        calls.append(path)
        im = load_rgb(path).resize((64, 64))
        x = torch.from_numpy(__import__("numpy").asarray(im, dtype="float32") / 127.5 - 1).permute(2, 0, 1)[None]
        mean, std = adapter.encode_posterior(x)
        return mean[0], std[0]
    return encode


def test_disk_cache_hits_and_invalidation(tiny_adapter, tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(img)
    key = CacheKey(img, (64, 64), (64, 64), (0, 0, 64, 64), False)
    vae = module_fingerprint(tiny_adapter.vae)
    calls, warnings = [], []
    encode = encoder(tiny_adapter, calls)

    first = LatentCache(vae, to_disk=True, warn=warnings.append).get(key, lambda: encode(img))
    assert len(calls) == 1 and (tmp_path / CACHE_DIR / "a_64x64.safetensors").is_file()
    again = LatentCache(vae, to_disk=True).get(key, lambda: encode(img))  # a new run reads the disk entry
    assert len(calls) == 1 and torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])

    Image.new("RGB", (64, 64), (10, 10, 200)).save(img)  # the image changed
    changed = LatentCache(vae, to_disk=True).get(key, lambda: encode(img))
    assert len(calls) == 2 and not torch.equal(changed[0], first[0])

    LatentCache("another-vae", to_disk=True).get(key, lambda: encode(img))  # the VAE changed
    assert len(calls) == 3

    LatentCache(vae, to_disk=True).get(CacheKey(img, (64, 64), (64, 64), (0, 0, 64, 64), True), lambda: encode(img))
    assert len(calls) == 4 and (tmp_path / CACHE_DIR / "a_64x64_flip.safetensors").is_file()  # flips are separate entries

    (tmp_path / CACHE_DIR / "a_64x64.safetensors").write_bytes(b"garbage")  # corrupt
    cache = LatentCache(vae, to_disk=True, warn=warnings.append)
    rebuilt = cache.get(key, lambda: encode(img))
    assert len(calls) == 5 and cache.rebuilt == 1
    assert any("unreadable" in w and "a_64x64.safetensors" in w for w in warnings)
    assert torch.equal(LatentCache(vae, to_disk=True).get(key, lambda: encode(img))[0], rebuilt[0])
    assert len(calls) == 5  # the rebuilt file is good again


def test_vae_fingerprint_sees_weight_changes(tiny_adapter):
    before = module_fingerprint(tiny_adapter.vae)
    p = next(tiny_adapter.vae.parameters())
    with torch.no_grad():
        old = p.view(-1)[0].clone()
        p.view(-1)[0] += 1
        try:
            assert module_fingerprint(tiny_adapter.vae) != before
        finally:
            p.view(-1)[0] = old
    assert module_fingerprint(tiny_adapter.vae) == before


def test_cached_training_equals_uncached(tiny_adapter, tmp_path):
    """The cache stores the posterior, so training draws the same latents either way."""
    data = make_dataset(tmp_path / "data", count=3, repeats=2)

    def run(name, **extra):
        cfg = TrainConfig().update({"train_data_dir": str(data), "output_dir": str(tmp_path / name), "resolution": "64",
                                    "max_train_steps": 4, "train_batch_size": 2, "seed": 5, "flip_aug": True,
                                    "learning_rate": 1e-3, **extra})
        return load_lora(job.build_trainer(cfg, tiny_adapter).run())[0]

    plain = run("plain")
    cached = run("cached", cache_latents_to_disk=True)
    assert (data / "2_zkz" / CACHE_DIR).is_dir()
    # Batched and single-image VAE convolutions differ in the last float bits (~1e-6); Adam
    # normalises those into ~1e-5 differences. The training itself moves the weights far more.
    diff = max(float((plain[k] - cached[k]).abs().max()) for k in plain)
    moved = max(float(plain[k].abs().max()) for k in plain if k.endswith("lora_up.weight"))
    assert diff < 1e-4 and moved > 50 * diff, (diff, moved)
