"""The tiny *pretrained* base (`builtin:tinybase`): an SD1-shaped model from the real `ldm` classes,
trained from scratch on CPU on the generated scenes, so tests can check that a LoRA teaches
something a sampler can show. Built by `python -m lora_train.testing build-base --output DIR`.

Two stages, both seeded: the VAE on a broad mix (scenes with every shape, plus random colours,
shapes, stripes and gradients), then the UNet and the text encoder together on the scenes'
latents with their captions (eps prediction, SD1's noise schedule, 10 % empty captions so
classifier-free guidance works).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from lora_train.model import clip_files
from lora_train.model.loading import instantiate
from lora_train.model.tiny import tiny_model_config
from lora_train.model.tinybase import ASSETS, NAME, TEXT_CONFIG, base_checkpoint, install_base, sha256, verify_assets  # noqa: F401 (the kit's names)
from lora_train.testing import scenes



def base_config(clip_version: str = f"{NAME}.clip", scale_factor: float = 1.0) -> dict:
    """The `model:` node of tinybase.yaml. SD1.5's block topology (the host's kohya-to-LDM key
    converter hard-codes it) at small widths; 64x64 images, 8x8 latents."""
    # the built-in tiny model's layout, with fewer UNet channels at depth and a VAE wide enough for
    # flat colours (see the module docstring)
    cfg = tiny_model_config(clip_version)
    p = cfg["params"]
    p["scale_factor"] = float(scale_factor)
    p["unet_config"]["params"].update(channel_mult=[1, 2, 2, 2], use_checkpoint=False)
    p["first_stage_config"]["params"]["ddconfig"].update(ch=96, ch_mult=[1, 1, 1, 1], num_res_blocks=0)
    return cfg


def _to_tensor(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def free_colour_scene(rng: random.Random):
    """A scene's layout (shape, side, white/black/gray background) with an object of any colour, half
    of them split at the middle into two colours like the concept's pattern. The scenes show the VAE
    only the base's four colours on these backgrounds and broad_image shows any colour only on random
    backgrounds: a new colour on white or black fell between the two and came back washed out."""
    from PIL import Image, ImageDraw

    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    s = scenes.SUPERSAMPLE
    scene = scenes.random_scene(rng, shapes=scenes.SHAPES)
    im = Image.new("RGB", (scenes.SIZE * s, scenes.SIZE * s), scenes.BACKGROUNDS[scene.background])
    cx, cy = scene.centre
    mask = Image.new("L", im.size, 0)
    scenes._draw_shape(ImageDraw.Draw(mask), scene.shape, cx, cy, scene.radius, 255)
    im.paste(Image.new("RGB", im.size, colour()), (0, 0), mask)
    if rng.random() < 0.5:
        lower = Image.new("L", im.size, 0)
        ImageDraw.Draw(lower).rectangle((0, int(cy * s), im.width, im.height), fill=255)
        im.paste(Image.new("RGB", im.size, colour()), (0, 0), Image.composite(mask, lower, lower))
    return im.resize((scenes.SIZE, scenes.SIZE), Image.BOX)


def object_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-pixel loss weights, mean 1 per image, with pixels that differ from the border's median
    (the object) `object_weight` + 1 times the background's: an object is about a tenth of a scene,
    so a plain mean spends the loss on flat background."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    w = 1.0 + object_weight * ((x - bg).abs().sum(dim=1, keepdim=True) > 0.3).float()
    return w / w.mean(dim=(2, 3), keepdim=True)


def _vae_batch(rng: random.Random, batch: int, free_colours: bool) -> list:
    if not free_colours:  # the committed base's mix: half scenes, half broad images
        return [scenes.draw(scenes.random_scene(rng, shapes=scenes.SHAPES)) if i % 2 == 0 else scenes.broad_image(rng)
                for i in range(batch)]
    return [scenes.draw(scenes.random_scene(rng, shapes=scenes.SHAPES)) if i % 3 == 0
            else free_colour_scene(rng) if i % 3 == 1 else scenes.broad_image(rng) for i in range(batch)]


def train_vae(vae, steps: int, seed: int, batch: int = 8, log=print, free_colours: bool = False, object_weight: float = 0.0) -> None:
    """`free_colours` and `object_weight` (both off in the committed base) are what a short continued
    training showed to bring new colours through on white and black (see the README's base section)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    vae.requires_grad_(True)
    with torch.no_grad():
        # Start with a narrow posterior (log-variance -8): at ldm's initial variance 1 the decoder
        # sees mostly noise and colours take thousands of steps to come through.
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:].mul_(0.01)
        vae.quant_conv.bias[half:].fill_(-8.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    # ldm replaces first_stage_model.train with a no-op; call the real one
    torch.nn.Module.train(vae, True)
    started = time.time()
    for step in range(steps):
        x = _to_tensor(_vae_batch(rng, batch, free_colours))
        posterior = vae.encode(x)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        rec = vae.decode(z)
        if object_weight:
            rec_loss = (((rec - x).abs() + (rec - x).pow(2)) * object_weights(x, object_weight)).mean()
        else:  # the committed base's expression, kept as is so its rebuild stays bit for bit
            rec_loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        kl = posterior.kl().mean()
        loss = rec_loss + 1e-6 * kl
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 1e-3, 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps}: reconstruction {rec_loss.item():.4f}, kl {kl.item():.0f} ({time.time() - started:.0f} s)")
    torch.nn.Module.train(vae, False)
    vae.requires_grad_(False)


@torch.no_grad()
def encode_scenes(vae, scene_list, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(scene_list), batch):
        posterior = vae.encode(_to_tensor([scenes.draw(s) for s in scene_list[i : i + batch]]))
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_diffusion(model, scene_list, means, stds, steps: int, seed: int, batch: int = 128, log=print, snapshot=None,
                    lr_at=None, pixel_weights: torch.Tensor | None = None) -> None:
    """UNet + text encoder, jointly, from scratch (or on from the weights the model has, with
    base_refine's `lr_at` schedule and `pixel_weights`, one latent map per scene). EMA weights are what is kept."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    unet = model.model.diffusion_model
    text = model.cond_stage_model.transformer
    tokenizer = model.cond_stage_model.tokenizer
    captions = [s.caption() for s in scene_list]
    unique = sorted(set(captions) | {""})
    ids = tokenizer(unique, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    token_row = {c: i for i, c in enumerate(unique)}
    rows = torch.tensor([token_row[c] for c in captions])
    empty = token_row[""]
    ac = model.alphas_cumprod.float()
    snr = ac / (1 - ac)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5: faster convergence from scratch

    params = [p for m in (unet, text) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=8e-4, betas=(0.9, 0.99), weight_decay=0.01)
    torch.nn.Module.train(unet, True)
    torch.nn.Module.train(text, True)
    started = time.time()
    running = None
    for step in range(steps):
        idx = torch.randint(0, len(scene_list), (batch,), generator=g)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * model.scale_factor
        tok_rows = torch.tensor([empty if rng.random() < 0.1 else int(rows[i]) for i in idx])
        t = torch.randint(0, len(ac), (batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        context = text(input_ids=ids[tok_rows]).last_hidden_state
        pred = unet(noisy, t, context=context)
        if pixel_weights is None:  # the committed base's expression, kept as is so its rebuild stays bit for bit
            loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * weight[t]).mean()
        else:
            loss = (((pred - noise).pow(2) * pixel_weights[idx]).mean(dim=(1, 2, 3)) * weight[t]).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 8e-4, 200) if lr_at is None else lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step + 1}/{steps}: loss {running:.4f} ({time.time() - started:.0f} s)")
        if snapshot is not None and (step + 1) % 500 == 0 and step + 1 < steps:
            with _swapped(params, ema):
                snapshot(step + 1)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
            p.requires_grad_(False)
    torch.nn.Module.train(unet, False)
    torch.nn.Module.train(text, False)


def build_base(output: str | os.PathLike, vae_steps: int = 3000, unet_steps: int = 1500, n_scenes: int = 6144, seed: int = 0, log=print,
               vae_free_colours: bool = False, vae_object_weight: float = 0.0) -> Path:
    torch.manual_seed(seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.time()
    clip_dir = clip_files.write_clip_folder(Path(output) / f"{NAME}.clip", TEXT_CONFIG)
    model = instantiate(base_config(str(clip_dir)))
    _init_text_norms(model)
    vae = model.first_stage_model
    stage = Path(output) / "stage1-vae.safetensors"
    key = {"vae_steps": vae_steps, "seed": seed, "config": base_config()["params"]["first_stage_config"]}
    if vae_free_colours or vae_object_weight:  # only then: the committed build's stage key stays what it was
        key.update(free_colours=vae_free_colours, object_weight=vae_object_weight)
    stage_key = json.dumps(key, sort_keys=True)
    if not _load_stage(vae, stage, stage_key):  # a build that stopped after stage 1 resumes here
        train_vae(vae, vae_steps, seed, log=log, free_colours=vae_free_colours, object_weight=vae_object_weight)
        _save_stage(vae, stage, stage_key)
    _reconstruction_sheet(vae, Path(output) / "vae-check.png", seed)
    log(f"VAE round trip: scorer reads {vae_round_trip_accuracy(vae, seed):.3f} of 200 scenes right ({time.time() - started:.0f} s)")
    rng = random.Random(seed + 1)
    scene_list = [scenes.random_scene(rng) for _ in range(n_scenes)]
    means, stds = encode_scenes(model.first_stage_model, scene_list)
    scale = float(1.0 / means.std())
    model.scale_factor = scale
    log(f"latent scale factor {scale:.5f} ({time.time() - started:.0f} s)")
    def snapshot(step):
        save_base(model, Path(output) / f"snapshot-{step}" / f"{NAME}.safetensors", scale)

    train_diffusion(model, scene_list, means, stds, unet_steps, seed + 2, log=log, snapshot=snapshot)
    path = save_base(model, Path(output) / f"{NAME}.safetensors", scale)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.time() - started:.0f} s")
    return path


@contextlib.contextmanager
def _swapped(params, ema):
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for e, p in zip(ema, params):
            p.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for s, p in zip(saved, params):
                p.copy_(s)


@torch.no_grad()
def _init_text_norms(model) -> None:
    # The host divides by the mean of the text encoder's output (prompt emphasis); with a fresh final
    # LayerNorm (bias 0) that mean sits near 0. A non-zero bias keeps it away from 0 from the start.
    model.cond_stage_model.transformer.text_model.final_layer_norm.bias.fill_(0.5)


def _save_stage(module, path: Path, key: str) -> None:
    import safetensors.torch

    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)


def _load_stage(module, path: Path, key: str) -> bool:
    import safetensors
    import safetensors.torch

    if not path.is_file():
        return False
    with safetensors.safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return False
    module.load_state_dict(safetensors.torch.load_file(str(path)))
    return True


@torch.no_grad()
def vae_round_trip_accuracy(vae, seed: int, n: int = 200) -> float:
    """How many scenes (the base's, and the concept test's pattern) the scorer still reads right after
    encode -> decode. Stars are left out: at this size the VAE rounds their points off."""
    from PIL import Image

    from lora_train.testing.scorer import score

    rng = random.Random(seed + 7)
    truth = [scenes.random_scene(rng) for _ in range(n * 3 // 4)]
    truth += [scenes.random_scene(rng, colour=scenes.CONCEPT_PATTERN) for _ in range(n - len(truth))]
    right = 0
    for i in range(0, n, 50):
        batch = truth[i : i + 50]
        rec = vae.decode(vae.encode(_to_tensor([scenes.draw(s) for s in batch])).mean).clamp(-1, 1)
        rec = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        right += sum(score(Image.fromarray(r)).matches(s) for r, s in zip(rec, batch))
    return right / n


@torch.no_grad()
def _reconstruction_sheet(vae, path: Path, seed: int) -> None:
    """Originals above their reconstructions: what the VAE can carry, to look at."""
    from PIL import Image

    rng = random.Random(seed + 99)
    images = [scenes.draw(scenes.random_scene(rng, shapes=scenes.SHAPES)) for _ in range(8)]
    images += [scenes.broad_image(rng) for _ in range(8)]
    rec = vae.decode(vae.encode(_to_tensor(images)).mean).clamp(-1, 1)
    rec = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    sheet = Image.new("RGB", (64 * 16, 128))
    for i, im in enumerate(images):
        sheet.paste(im, (64 * i, 0))
        sheet.paste(Image.fromarray(rec[i]), (64 * i, 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def save_base(model, path: Path, scale_factor: float) -> Path:
    """fp16 weights (the noise-schedule buffers are rebuilt from the yaml) + a yaml naming the
    tokenizer folder beside it by file name, so the three files can move together."""
    import safetensors.torch
    from omegaconf import OmegaConf

    skip = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus", "posterior_", "logvar")
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(skip) and not k.endswith("position_ids")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(state, str(tmp), metadata={"lora_train_builder": "python -m lora_train.testing build-base"})
    os.replace(tmp, path)
    cfg = base_config(f"{NAME}.clip", scale_factor)
    path.with_suffix(".yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"model": cfg})), encoding="utf-8")
    (path.parent / f"{NAME}.sha256").write_text(
        "".join(f"{sha256(f)}  {f.name}\n" for f in (path, path.with_suffix(".yaml"))), encoding="utf-8"
    )
    return path
