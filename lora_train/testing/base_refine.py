"""The tiny base's second build stage: `python -m lora_train.testing refine-base --output DIR`.

It starts from a built base (by default the committed one)
and trains on, in two seeded steps that leave the encoder, and so every latent, as it was
(numbered by what they mend; the UNet runs first):

1. the decoder alone, on the base's scenes, scenes with objects of any one or two colours, and the
   broad images, object pixels weighted: the first base's decoder washed new colours out on white and
   black backgrounds (a magenta-lime object came back pink-grey), so no LoRA could show a new colour there;
2. the UNet and the text encoder, on the same scenes and captions as the first build, with the loss on
   object latents weighted: the first base drew circle and square at chance. The shape word changes a
   few corner pixels of an object that fills about a tenth of the image, so a plain mean spends nearly
   all of the loss on flat background. The encoder is frozen in step 1, so these are the latents the
   UNet learnt from.

The committed base (`builtin:tinybase`) is step 2 alone, on the base's shapes as they are since
(circle, bar and triangle: scenes.BASE_SHAPES), over the first stage as committed up to `eebf04a` (built
when the third shape was a square, so `build-base` no longer makes it). To rebuild it:

    mkdir first
    git show eebf04a:lora_train/model/assets/tinybase.safetensors > first/tinybase.safetensors
    git show eebf04a:lora_train/model/assets/tinybase.yaml > first/tinybase.yaml
    python -m lora_train.testing refine-base --source first/tinybase.safetensors --output DIR \
        --decoder-steps 0 --unet-steps 1500

(25 min on 2 cores; then copy DIR's tinybase.safetensors and .sha256 into lora_train/model/assets/). It
draws the bar from the first 500 steps on (plain prompts: circle 34/38, bar 28/28, triangle 25/30); at
1500 steps it reads 0.96 on the fidelity test's 256 plain prompts, all four labels right.

The UNet goes first (its snapshots every 500 steps can be scored while the decoder trains); the
decoder's stage file lets a stopped build skip it.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from lora_train.testing import base, scenes

DEFAULTS = {"decoder_steps": 2400, "decoder_lr": 5e-4, "unet_steps": 3000, "unet_lr": 4e-4, "object_weight": 4.0}


def train_decoder(vae, steps: int, peak: float, seed: int, object_weight: float, batch: int = 8, log=print) -> None:
    """The decoder (and post_quant_conv) only; the encoder's latents stay what the UNet learnt."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    vae.requires_grad_(False)
    params = [p for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.99), weight_decay=0.0)
    torch.nn.Module.train(vae, True)  # ldm replaces first_stage_model.train with a no-op
    started = time.time()
    for step in range(steps):
        x = base._to_tensor(base._vae_batch(rng, batch, free_colours=True))
        with torch.no_grad():
            posterior = vae.encode(x)
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        rec = vae.decode(z)
        loss = (((rec - x).abs() + (rec - x).pow(2)) * base.object_weights(x, object_weight)).mean()
        for group in opt.param_groups:
            group["lr"] = base._lr(step, steps, peak, 20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step + 1}/{steps}: reconstruction {loss.item():.4f} ({time.time() - started:.0f} s)")
    torch.nn.Module.train(vae, False)
    vae.requires_grad_(False)


def latent_object_weights(scene_list, object_weight: float, latent: int = 8) -> torch.Tensor:
    """One (1, latent, latent) map per scene, mean 1: latents an object touches weigh `object_weight`
    times the background's."""
    def touched(scene):
        a = np.asarray(scenes.draw(scene), dtype=np.float32)
        bg = np.asarray(scenes.BACKGROUNDS[scene.background], dtype=np.float32)
        m = (np.abs(a - bg).sum(-1) > 30).astype(np.float32)
        k = scenes.SIZE // latent
        return m.reshape(latent, k, latent, k).mean(axis=(1, 3))

    masks = torch.from_numpy(np.stack([touched(s) for s in scene_list]))[:, None]
    w = 1.0 + (object_weight - 1.0) * (masks > 0).float()
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def continued_lr(steps: int, peak: float, warmup: int = 50):
    """A short warm-up from weights already trained, then cosine down to a tenth of `peak`."""
    return lambda step: peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def _refine_unet(model, s: dict, seed: int, output: Path, scale: float, log) -> None:
    rng = random.Random(seed + 1)  # the first build's scenes and captions
    scene_list = [scenes.random_scene(rng) for _ in range(6144)]
    with torch.no_grad():
        means, stds = base.encode_scenes(model.first_stage_model, scene_list)
    pixel_weights = latent_object_weights(scene_list, s["object_weight"])

    def snapshot(step):  # to score while the build goes on (decoded by the decoder as it is then)
        base.save_base(model, output / f"snapshot-{step}" / f"{base.NAME}.safetensors", scale)

    base.train_diffusion(model, scene_list, means, stds, s["unet_steps"], seed + 11, log=log, snapshot=snapshot,
                         lr_at=continued_lr(s["unet_steps"], s["unet_lr"]), pixel_weights=pixel_weights)


def refine_base(output: str | os.PathLike, source: str | os.PathLike | None = None, seed: int = 0, log=print, **settings) -> Path:
    from lora_train.model.registry import load_adapter
    from lora_train.model.tinybase import base_checkpoint

    s = {**DEFAULTS, **settings}
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    source = Path(source) if source else base_checkpoint()
    model = load_adapter(str(source)).model.float()
    vae = model.first_stage_model
    scale = float(model.scale_factor)

    if s["unet_steps"]:
        _refine_unet(model, s, seed, output, scale, log)

    # the decoder after the UNet: it changes no latent (the encoder stays), and the UNet's snapshots come sooner
    key = json.dumps({"source": base.sha256(source), "seed": seed, "steps": s["decoder_steps"], "lr": s["decoder_lr"],
                      "object_weight": s["object_weight"]}, sort_keys=True)
    stage = output / "stage2-decoder.safetensors"
    if not base._load_stage(vae, stage, key):
        train_decoder(vae, s["decoder_steps"], s["decoder_lr"], seed + 10, s["object_weight"], log=log)
        base._save_stage(vae, stage, key)
    base._reconstruction_sheet(vae, output / "vae-check.png", seed)
    log(f"VAE round trip: scorer reads {base.vae_round_trip_accuracy(vae, seed):.3f} of 200 scenes right ({time.time() - started:.0f} s)")
    path = base.save_base(model, output / f"{base.NAME}.safetensors", scale)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.time() - started:.0f} s")
    return path
