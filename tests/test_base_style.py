"""Regularization images the model makes itself (cached), and the base-style LoRA in one step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import make_dataset, small_run_config
from test_a1111_host import webui  # noqa: F401 (the fake WebUI fixture)
from lora_train.app import base_style
from lora_train.app.reg_images import RenderSettings, reg_images
from lora_train.cli import main
from lora_train.errors import UserError
from lora_train.host.standalone import StandaloneHost

SETTINGS = RenderSettings(width=64, height=64, seed=5, steps=3, scale=7.0, sampler="euler_a")


class Counting:
    """The host's txt2img, counting the images it is asked for."""

    def __init__(self, host):
        self.host, self.images = host, 0

    def __call__(self, prompts):
        self.images += len(prompts)
        return self.host.txt2img(prompts)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_reg_images_are_the_models_own_and_cached(tmp_path):
    from lora_train.model.registry import load_adapter
    from lora_train.sample.render import sample_with_loras

    host = StandaloneHost("builtin:tiny", tmp_path, tmp_path)
    render = Counting(host)
    prompt = "a photo of a girl"
    root = reg_images(render, host.model_key(), prompt, 3, SETTINGS, tmp_path / "cache")
    folder = root / "1_a photo of a girl"
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00000.txt", "00001.png", "00001.txt", "00002.png", "00002.txt"]
    assert all((folder / f"{i:05d}.txt").read_text(encoding="utf-8") == prompt for i in range(3))
    assert render.images == 3
    # the `sample` command's images of the same prompt, seeds 5, 6, 7, on a model loaded apart
    expected = sample_with_loras(load_adapter("builtin:tiny"), [], prompt, n=3, seed=5, output_dir=tmp_path / "sample", steps=3,
                                 width=64, height=64, scale=7.0, sampler="euler_a")
    for i, path in enumerate(expected):
        assert np.array_equal(pixels(folder / f"{i:05d}.png"), pixels(path))

    assert reg_images(render, host.model_key(), prompt, 3, SETTINGS, tmp_path / "cache") == root
    assert render.images == 3  # nothing rendered again
    again = reg_images(render, host.model_key(), prompt, 3, SETTINGS, tmp_path / "cache", repeats=4)
    assert again == root and (root / "4_a photo of a girl" / "00002.png").is_file() and not folder.exists()
    assert render.images == 3  # other repeats: the same images
    (root / "4_a photo of a girl" / "00001.png").unlink()
    reg_images(render, host.model_key(), prompt, 3, SETTINGS, tmp_path / "cache", repeats=4)
    assert render.images == 4  # only the missing one
    other = reg_images(render, host.model_key(), prompt, 3, RenderSettings(64, 64, seed=6, steps=3), tmp_path / "cache")
    assert other != root and render.images == 7  # another seed is another set
    assert json.loads((root / "reg.json").read_text())["model"] == "builtin:tiny"


def test_reg_images_cli(tmp_path, capsys):
    assert main(["reg-images", "--model", "builtin:tiny", "--prompt", "a cat", "--n", "2", "--output", str(tmp_path),
                 "--steps", "2", "--size", "64,128"]) == 0
    root = Path(capsys.readouterr().out.strip().split(": ", 1)[1])
    images = sorted((root / "1_a cat").glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (64, 128)


def test_triggers_removed_from_captions():
    assert base_style.strip_triggers("zkz, 1girl, zkz style, red hair", ["zkz"]) == "1girl, style, red hair"
    assert base_style.strip_triggers("ZKZ girl, zkzz, a zkz-like cat", ["zkz"]) == "girl, zkzz, a -like cat"
    assert base_style.strip_triggers("my style, sky", ["my style", "zkz"]) == "sky"


def test_base_style_needs_the_style_lora(tmp_path):
    config = small_run_config(make_dataset(tmp_path / "data", count=2), "style", output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match="train 'style' first"):
        base_style.prepare(config, lambda prompts: pytest.fail("rendered"), "m", tmp_path / "cache")


def test_base_style_end_to_end(tmp_path, capsys):
    from lora_train.tools.merge import merge

    data = make_dataset(tmp_path / "data", count=2)
    (data / "1_zkz" / "000.txt").write_text("zkz, a red circle, zkz style", encoding="utf-8")  # demo folder name: 1_zkz
    out = tmp_path / "out"
    # validation_split is the style run's: _BASE trains on every image it rendered (ss_num_train_images below)
    config = small_run_config(data, "style", epochs=1, output_dir=str(out), pretrained_model_name_or_path="builtin:tiny",
                              save_every_n_epochs=None, validation_split=0.5)
    toml = config.save_toml(tmp_path / "style.toml")
    assert main(["train", "--config", str(toml)]) == 0
    assert main(["base-style", "--config", str(toml), "--n", "3", "--steps", "2"]) == 0

    rendered = [p for p in (out / "base-style-images").glob("*/1_style_BASE")]
    assert len(rendered) == 1
    captions = [p.read_text(encoding="utf-8") for p in sorted(rendered[0].glob("*.txt"))]
    # the two captions in file order, repeated to 3, without the folder's class token zkz
    assert captions == ["a red circle, style", "a green square, white background", "a red circle, style"]
    assert len(list(rendered[0].glob("*.png"))) == 3

    base = out / "style_BASE.safetensors"
    meta = json.loads(json.dumps(dict(__import__("safetensors").safe_open(str(base), "pt").metadata())))
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_style_BASE": {"n_repeats": 1, "img_count": 3}}
    assert meta["ss_num_train_images"] == "3"
    assert "the base model rendered itself" in json.loads((out / "style_BASE.json").read_text())["notes"]

    distilled = load_file(out / "style-distilled.safetensors")
    expected = load_file(merge("style:1:GP1,style_BASE:-1:GP2", tmp_path / "expected.safetensors", base_style.PRESETS, lora_dir=out)[0])
    assert distilled.keys() == expected.keys()
    assert all(distilled[k].equal(expected[k]) for k in expected)
    assert "merged from style:1:GP1,style_BASE:-1:GP2" in json.loads((out / "style-distilled.json").read_text())["notes"]


def test_webui_renders_through_its_own_txt2img(webui, tmp_path, tiny_model, monkeypatch):  # noqa: F811
    """Plumbing only (a fake WebUI): one txt2img job per image, under the queue lock, no extra networks,
    seeds seed+i; cached by the checkpoint's hash."""
    from types import SimpleNamespace

    from test_a1111_host import make_host

    host = make_host()(webui)
    monkeypatch.setattr(tiny_model, "sd_checkpoint_info", SimpleNamespace(sha256="ab12"), raising=False)
    root = reg_images(host.txt2img, host.model_key(), "a photo of a girl", 2, SETTINGS, tmp_path / "cache")
    ps = webui.processing_impl.ps
    assert [(p.prompt, p.seed, p.width, p.height, p.steps, p.cfg_scale, p.sampler_name) for p in ps] == [
        ("a photo of a girl", 5, 64, 64, 3, 7.0, "Euler a"), ("a photo of a girl", 6, 64, 64, 3, 7.0, "Euler a")]
    assert all(p.lock_held and p.disable_extra_networks and p.closed for p in ps)
    assert json.loads((root / "reg.json").read_text())["model"] == "sha256:ab12"
    assert len(list((root / "1_a photo of a girl").glob("*.png"))) == 2
    reg_images(host.txt2img, host.model_key(), "a photo of a girl", 2, SETTINGS, tmp_path / "cache")
    assert len(ps) == 2
    host.owner_thread = 1  # a run holds the model
    with pytest.raises(UserError, match="training run is using the model"):
        host.txt2img([])
