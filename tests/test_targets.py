"""Our target lists equal sd-scripts' own (names and shapes from ../shared/fixtures)."""

import json
import subprocess
import sys

import pytest

from lora_train.model.reference import describe, reference_targets

CASES = [("sd15", False), ("sd15", True), ("sd21", False), ("sd21", True), ("sdxl", False), ("sdxl", True)]


def fixture_name(arch, conv):
    return f"{arch}{'-conv' if conv else ''}"


@pytest.mark.parametrize("arch,conv", CASES)
def test_names_equal_sd_scripts(arch, conv, fixtures_dir):
    want = (fixtures_dir / f"kohya-names-{fixture_name(arch, conv)}.txt").read_text().split()
    got = [t.name for t in reference_targets(arch, conv)]
    assert len(got) == len(set(got))
    assert sorted(got) == sorted(want)


def test_sd15_counts():
    names = [t.name for t in reference_targets("sd15")]
    assert sum(n.startswith("lora_te_") for n in names) == 72
    assert sum(n.startswith("lora_unet_") for n in names) == 192


@pytest.mark.parametrize("conv,unet", [(False, 722), (True, 788)])
def test_sdxl_counts(conv, unet):
    names = [t.name for t in reference_targets("sdxl", conv)]
    counts = {p: sum(n.startswith(p + "_") for n in names) for p in ("lora_te1", "lora_te2", "lora_unet")}
    assert counts == {"lora_te1": 72, "lora_te2": 192, "lora_unet": unet}


def _expected_shapes(fixtures_dir, arch, conv):
    expected = json.loads((fixtures_dir / f"kohya-shapes-{fixture_name(arch, conv)}.json").read_text())
    if arch == "sd21":
        # The host's SD2 config (use_linear_in_transformer) makes proj_in/proj_out Linear, which is
        # what sd-scripts builds from a diffusers SD2 folder (the -linearproj list).
        linear = json.loads((fixtures_dir / "kohya-shapes-sd21-linearproj.json").read_text())
        for name in expected:
            if name.endswith(("_proj_in", "_proj_out")):
                expected[name] = linear[name]
    return expected


@pytest.mark.parametrize("arch,conv", CASES)
def test_shapes_equal_sd_scripts(arch, conv, fixtures_dir):
    expected = _expected_shapes(fixtures_dir, arch, conv)
    for target in reference_targets(arch, conv):
        ours, theirs = describe(target), expected[target.name]
        for key in ("class", "in_features", "out_features", "in_channels", "out_channels", "kernel_size",
                    "lora_down_weight_shape", "lora_up_weight_shape", "lora_dim", "alpha"):
            assert ours.get(key) == theirs.get(key), (target.name, key, ours.get(key), theirs.get(key))


def test_cli_targets_json_and_text(fixtures_dir):
    run = lambda *a: subprocess.run([sys.executable, "-m", "lora_train", "targets", *a], capture_output=True, text=True, check=True)
    rows = json.loads(run("--arch", "sd15", "--conv", "--json").stdout)
    assert isinstance(rows, list) and all("name" in r for r in rows)
    assert sorted(r["name"] for r in rows) == sorted((fixtures_dir / "kohya-names-sd15-conv.txt").read_text().split())
    text = run("--arch", "sd21").stdout.split()
    assert sorted(text) == sorted((fixtures_dir / "kohya-names-sd21.txt").read_text().split())
    for conv in ((), ("--conv",)):
        text = run("--arch", "sdxl", *conv).stdout.split()
        assert sorted(text) == sorted((fixtures_dir / f"kohya-names-sdxl{'-conv' if conv else ''}.txt").read_text().split())


def test_tiny_model_targets_are_sd15_names_with_same_module_classes(tiny_adapter, fixtures_dir):
    """The tiny model keeps SD1.5's topology, so its LoRA names are SD1.5 names (the host needs that)."""
    expected = json.loads((fixtures_dir / "kohya-shapes-sd15-conv.json").read_text())
    targets = tiny_adapter.lora_targets(conv=True)
    unet = [t for t in targets if t.name.startswith("lora_unet_")]
    assert len(unet) == 278
    for t in targets:
        assert t.name in expected, t.name
        assert type(t.module).__name__ == expected[t.name]["class"]
        if expected[t.name]["class"] == "Conv2d":
            assert list(t.module.kernel_size) == expected[t.name]["kernel_size"]


@pytest.mark.parametrize("arch,prefix,width,heads,layers,trained", [
    ("sd21", "lora_te", 1024, 16, 24, 23),  # SD2 reads the penultimate layer: sd-scripts names 23
    ("sdxl", "lora_te2", 1280, 20, 32, 32),
])
def test_openclip_text_encoder_targets_are_sd_scripts_hf_names(arch, prefix, width, heads, layers, trained, fixtures_dir):
    """The host's OpenCLIP encoder (fused attention) gets sd-scripts' Hugging Face names and shapes,
    q/k/v/out all four (the WebUI skips an attention missing one)."""
    import torch
    from open_clip.transformer import TextTransformer

    from lora_train.network.targets import openclip_targets

    with torch.device("meta"):
        text = TextTransformer(width=width, heads=heads, layers=layers, output_dim=width)
    targets = openclip_targets(text.transformer, prefix, trained)
    expected = json.loads((fixtures_dir / f"kohya-shapes-{arch}.json").read_text())
    assert sorted(t.name for t in targets) == sorted(k for k in expected if k.startswith(prefix + "_"))
    for t in targets:
        ours, theirs = describe(t), expected[t.name]
        for key in ("class", "in_features", "out_features", "lora_down_weight_shape", "lora_up_weight_shape"):
            assert ours[key] == theirs[key], (t.name, key)
