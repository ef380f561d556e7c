"""Render preview images over a ModelAdapter and save them as PNGs the WebUI's PNG Info tab reads."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
from dataclasses import replace
from pathlib import Path

import torch

from lora_train.sample.prompts import MAX_STEPS, SamplePrompt
from lora_train.sample.samplers import SAMPLER_LABELS, guided_eps, resolve_sampler, run_sampler

LATENT_FACTOR = 8  # every SD VAE downsamples by 8


def resolve_prompt(prompt: SamplePrompt, default_seed: int | None = None) -> SamplePrompt:
    """The settings actually rendered: a concrete seed, our sampler key, and the size rounded as
    sd-scripts does (down to a multiple of 8, at least 64)."""
    seed = prompt.seed if prompt.seed is not None else default_seed
    if seed is None:
        seed = random.SystemRandom().randrange(2**32 - 1)  # not the global RNGs
    return replace(
        prompt,
        seed=int(seed),
        sampler=resolve_sampler(prompt.sampler),
        steps=max(1, min(MAX_STEPS, int(prompt.steps))),
        width=max(64, prompt.width - prompt.width % 8),
        height=max(64, prompt.height - prompt.height % 8),
    )


@contextlib.contextmanager
def _eval_mode(adapter):
    """Sampling must not hit dropout (it would also draw from the global RNG); restore modes after."""
    modes = [(m, m.training) for root in adapter.modules() for m in root.modules()]
    try:
        for root in adapter.modules():
            root.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _latent_channels(adapter) -> int:
    return int(getattr(getattr(adapter, "unet", None), "in_channels", 4))


def _latent_multiple(adapter) -> int:
    # ldm's UNet concatenates skips without resizing, so each latent side must survive its
    # downsamplings exactly (A1111 patches this; a standalone ldm does not).
    levels = len(getattr(getattr(adapter, "unet", None), "channel_mult", (1, 2, 4, 4)))
    return 2 ** (levels - 1)


def latent_shape(adapter, width: int, height: int) -> tuple[int, int, int, int]:
    """Latents covering width x height, padded up to what the UNet accepts; `render` crops back."""
    m = _latent_multiple(adapter)
    h, w = -(-height // LATENT_FACTOR), -(-width // LATENT_FACTOR)
    return (1, _latent_channels(adapter), -(-h // m) * m, -(-w // m) * m)


@torch.no_grad()
def generate_latents(adapter, prompt: SamplePrompt, default_seed: int | None = None) -> torch.Tensor:
    p = resolve_prompt(prompt, default_seed)
    generator = torch.Generator().manual_seed(p.seed)
    with _eval_mode(adapter):
        sizes = adapter.size_condition(p.width, p.height)
        cond = adapter.condition(adapter.encode_captions([p.prompt]), sizes)
        uncond = adapter.condition(adapter.encode_captions([p.negative]), sizes) if p.scale != 1.0 else None
        eps = guided_eps(adapter, cond, uncond, p.scale)
        return run_sampler(p.sampler, adapter, eps, latent_shape(adapter, p.width, p.height), p.steps, generator)


@torch.no_grad()
def decode_latents(adapter, latents: torch.Tensor) -> list:
    """UNet latents to RGB PIL images, through the model's own first stage."""
    from PIL import Image

    with _eval_mode(adapter):
        pixels = adapter.decode_latents(latents)
    pixels = torch.nan_to_num(pixels, 0.0).clamp(-1, 1)
    arrays = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arrays]


def render(adapter, prompt: SamplePrompt, default_seed: int | None = None):
    """One PIL image. The seed used is in `image.info["seed"]` (save_sample reads it from there
    when the prompt has none)."""
    p = resolve_prompt(prompt, default_seed)
    image = decode_latents(adapter, generate_latents(adapter, p))[0]
    if image.size != (p.width, p.height):
        left, top = (image.width - p.width) // 2, (image.height - p.height) // 2
        image = image.crop((left, top, left + p.width, top + p.height))
    image.info["seed"] = p.seed
    return image


@torch.no_grad()
def render_batch(adapter, prompts: list[str], seed: int, steps: int = 20, scale: float = 7.0, sampler: str = "ddim",
                 negative: str = "", width: int = 512, height: int = 512) -> list:
    """Many prompts in one batch from one seeded generator: the same call gives the same images,
    which makes before/after comparisons (weights, epochs) paired."""
    generator = torch.Generator().manual_seed(int(seed))
    n = len(prompts)
    with _eval_mode(adapter):
        sizes = adapter.size_condition(width, height, n)
        cond = adapter.condition(adapter.encode_captions(list(prompts)), sizes)
        uncond = adapter.condition(adapter.encode_captions([negative] * n), sizes) if scale != 1.0 else None
        eps = guided_eps(adapter, cond, uncond, scale)
        shape = (n,) + latent_shape(adapter, width, height)[1:]
        latents = run_sampler(sampler, adapter, eps, shape, steps, generator)
    images = decode_latents(adapter, latents)
    left, top = (images[0].width - width) // 2, (images[0].height - height) // 2
    return [im.crop((left, top, left + width, top + height)) if im.size != (width, height) else im for im in images]


# -- PNG info --------------------------------------------------------------------------------
def _quote(value) -> str:
    # A1111's infotext quoting: JSON-quote values its field regex would otherwise split
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def infotext(
    prompt: SamplePrompt, extra: dict | None = None, seed: int | None = None, size: tuple[int, int] | None = None
) -> str:
    """A1111 generation parameters: prompt, `Negative prompt: ...`, then one `Key: value, ...` line."""
    width, height = size or (prompt.width, prompt.height)
    fields = {
        "Steps": prompt.steps,
        "Sampler": SAMPLER_LABELS[resolve_sampler(prompt.sampler)],
        "CFG scale": _number(float(prompt.scale)),
        "Seed": prompt.seed if prompt.seed is not None else seed,
        "Size": f"{width}x{height}",
    }
    for k, v in (extra or {}).items():
        fields[k] = _number(v) if isinstance(v, float) else v
    params = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {prompt.negative}" if prompt.negative else ""
    return f"{prompt.prompt}{negative}\n{params}"


_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param


def parse_infotext(text: str) -> dict[str, str]:
    """What A1111's `parse_generation_parameters` reads back: "Prompt", "Negative prompt" and fields."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for k, v in _FIELD.findall(last):
        if len(v) > 1 and v[0] == '"' and v[-1] == '"':
            with contextlib.suppress(ValueError):
                v = json.loads(v)
        out[k] = v
    return out


def save_png(image, path: str | os.PathLike, parameters: str) -> Path:
    """Write a PNG with the `parameters` text chunk the WebUI's PNG Info reads, atomically."""
    from PIL.PngImagePlugin import PngInfo

    from lora_train.network.files import atomic_write_bytes

    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_sample(image, path: str | os.PathLike, prompt: SamplePrompt, extra: dict | None = None) -> Path:
    return save_png(image, path, infotext(prompt, extra, seed=image.info.get("seed"), size=image.size))


# -- sampling with LoRA files (the `sample` command) ---------------------------------------------------------------------
def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:WEIGHT]`; the weight is whatever follows the last colon when it is a number, so
    Windows drive letters and colons in file names survive."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def _next_index(folder: Path) -> int:
    # A1111 numbers its outputs "00012-SEED.png"; continue after the highest number present
    numbers = [int(m.group(1)) for f in folder.iterdir() if (m := re.match(r"(\d{5})-", f.name))]
    return max(numbers, default=-1) + 1


def sample_with_loras(
    adapter,
    loras: list[tuple[str, float]],
    prompt: str,
    n: int = 1,
    seed: int | None = None,
    output_dir: str | os.PathLike = "samples",
    steps: int = 30,
    width: int = 512,
    height: int = 512,
    scale: float = 7.5,
    sampler: str = "ddim",
    negative: str = "",
) -> list[Path]:
    """Render `n` images with seeds seed..seed+n-1, LoRAs applied (the `sample` command's work)."""
    from lora_train.network.network import network_from_file

    targets = adapter.file_targets()
    networks = []
    for path, weight in loras:
        net = network_from_file(path, targets).to(adapter.device)
        net.set_multiplier(float(weight))
        networks.append((Path(path).stem, float(weight), net))
    if seed is None:
        seed = random.SystemRandom().randrange(2**32 - 1)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"Model": adapter.info.name, "Lora": ", ".join(f"{name}:{w:g}" for name, w, _ in networks) or None}
    written = []
    try:
        for _, _, net in networks:
            net.apply()
        index = _next_index(out)
        for i in range(max(1, int(n))):
            p = SamplePrompt(prompt, negative, width, height, int(seed) + i, steps, scale, sampler)
            p = resolve_prompt(p)
            image = render(adapter, p)
            written.append(save_sample(image, out / f"{index + i:05d}-{p.seed}.png", p, extra))
    finally:
        for _, _, net in networks:
            net.remove()  # detaching a module that was never attached is a no-op
    return written
