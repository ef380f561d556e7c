"""An epochs x weights comparison grid rendered with our own sampler (the standalone host's version
of the X/Y/Z plot users make by hand in the WebUI)."""

from __future__ import annotations

from pathlib import Path


def render_grid(adapter, files: list[Path], weights: list[float], prompt: str, seed: int, out: Path, size: int = 512,
                steps: int = 20) -> Path:
    from PIL import Image, ImageDraw

    from lora_train.network.network import network_from_file
    from lora_train.sample.render import render_batch

    targets = adapter.file_targets()
    label_w, head_h = 160, 24
    grid = Image.new("RGB", (label_w + size * len(weights), head_h + size * len(files)), "white")
    draw = ImageDraw.Draw(grid)
    for j, w in enumerate(weights):
        draw.text((label_w + j * size + 4, 6), f"weight {w:g}", fill="black")
    for i, path in enumerate(files):
        net = network_from_file(path, targets).to(adapter.device)
        draw.text((4, head_h + i * size + size // 2 - 6), Path(path).stem[-24:], fill="black")
        try:
            net.apply()
            for j, w in enumerate(weights):
                net.set_multiplier(float(w))
                image = render_batch(adapter, [prompt], seed=seed, steps=steps, width=size, height=size)[0]
                grid.paste(image, (label_w + j * size, head_h + i * size))
        finally:
            net.remove()
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
