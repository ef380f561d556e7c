"""Preview sampling: prompt files, our samplers on the tiny model, PNG infotext, the sample command."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_as, snapshot
from PIL import Image

from lora_train.cli import sample_command
from lora_train.errors import UserError
from lora_train.network.files import save_lora
from lora_train.network.network import LoRANetwork
from lora_train.sample import render as render_mod
from lora_train.sample.prompts import SamplePrompt, load_prompts, parse_prompt_line
from lora_train.sample.render import (
    generate_latents,
    infotext,
    parse_infotext,
    parse_lora_arg,
    render,
    resolve_prompt,
    save_sample,
)
from lora_train.sample.samplers import ddim_timesteps, euler_schedule, guided_eps, resolve_sampler, sample_ddim, sample_euler

SMALL = dict(width=64, height=64, steps=2)


# -- prompt files ------------------------------------------------------------------------------
def test_txt_prompts_all_options_defaults_and_comments(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text(
        "# a comment\n"
        "\n"
        "   \n"
        "masterpiece, 1girl --w 512 --h 768 --d 42 --s 28 --l 7.5 --n lowres, bad hands --ss euler_a\n"
        "a cat\n"
        "  # indented: sd-scripts only skips lines whose first character is '#'\n"
        "dog --W 320 --S 5000 --L 3 --SS k_euler_a --g 3.5 --unknown x\n"
        "fox --s 0 --l 7.5.1 --w 96px\n",
        encoding="utf-8",
    )
    p = load_prompts(f)
    assert len(p) == 5
    assert p[0] == SamplePrompt("masterpiece, 1girl", "lowres, bad hands", 512, 768, 42, 28, 7.5, "euler_a")
    assert p[1] == SamplePrompt("a cat", "", 512, 512, None, 30, 7.5, "ddim")  # sd-scripts' defaults
    assert p[2].prompt.startswith("# indented")
    assert (p[3].prompt, p[3].width, p[3].steps, p[3].scale, p[3].sampler) == ("dog", 320, 1000, 3.0, "k_euler_a")
    assert (p[4].steps, p[4].scale, p[4].width) == (1, 7.5, 96)  # clamped; bad number ignored; leading digits
    assert load_prompts(f, default_sampler="euler")[1].sampler == "euler"


def test_prompt_segment_is_not_parsed_as_options():
    assert parse_prompt_line("w 100 wolves --h 640") == SamplePrompt("w 100 wolves", height=640)


def test_toml_prompts(tmp_path):
    f = tmp_path / "prompts.toml"
    f.write_text(
        """
[prompt]
negative_prompt = "lowres"
width = 640
sample_steps = 20
scale = 5

[[prompt.subset]]
prompt = "a cat"
seed = 1

[[prompt.subset]]
prompt = "a dog"
width = 768
sample_sampler = "euler_a"
""",
        encoding="utf-8",
    )
    p = load_prompts(f)
    assert p == [
        SamplePrompt("a cat", "lowres", 640, 512, 1, 20, 5.0, "ddim"),
        SamplePrompt("a dog", "lowres", 768, 512, None, 20, 5.0, "euler_a"),
    ]


def test_json_prompts_lines_and_dicts(tmp_path):
    f = tmp_path / "prompts.json"
    f.write_text(
        json.dumps(["a cat --d 3 --n ugly", {"prompt": "a dog", "height": 320, "seed": 9, "scale": 4.5}]), encoding="utf-8"
    )
    assert load_prompts(f) == [SamplePrompt("a cat", "ugly", seed=3), SamplePrompt("a dog", height=320, seed=9, scale=4.5)]


def test_prompt_file_errors(tmp_path):
    (tmp_path / "p.yaml").write_text("x")
    with pytest.raises(UserError, match="must be .txt, .toml or .json"):
        load_prompts(tmp_path / "p.yaml")
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "x", "width": "wide"}]))
    with pytest.raises(UserError, match="prompt 1: 'width' must be a whole number"):
        load_prompts(tmp_path / "p.json")
    (tmp_path / "p.toml").write_text('prompt = "x"')
    with pytest.raises(UserError, match=r"\[prompt\] table"):
        load_prompts(tmp_path / "p.toml")


def test_resolve_prompt_rounds_size_like_sd_scripts():
    p = resolve_prompt(SamplePrompt("x", width=100, height=30, seed=None, sampler="dpmsolver++"), default_seed=7)
    assert (p.width, p.height, p.seed, p.sampler) == (96, 64, 7, "ddim")
    assert resolve_sampler("K_EULER_A") == "euler_a"


def test_parse_lora_arg():
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("b.safetensors") == ("b.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\b.safetensors") == (r"C:\loras\b.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\b.safetensors:-1") == (r"C:\loras\b.safetensors", -1.0)


# -- schedules ---------------------------------------------------------------------------------
def test_schedules(tiny_adapter):
    # diffusers' DDIMScheduler, "leading" spacing, steps_offset 0 (sd-scripts' preview scheduler)
    assert ddim_timesteps(30)[:3] == [957, 924, 891] and ddim_timesteps(30)[-1] == 0 and len(ddim_timesteps(30)) == 30
    assert ddim_timesteps(1) == [0] and ddim_timesteps(5000) == list(range(999, -1, -1))
    ac = tiny_adapter.alphas_cumprod
    t, sigmas = euler_schedule(ac, 10)
    assert t[0] == 999 and t[-1] == 0 and len(sigmas) == 11 and sigmas[-1] == 0
    assert sigmas[0] == pytest.approx(math.sqrt((1 - ac[-1]) / ac[-1]), rel=1e-5)
    assert sigmas[-2] == pytest.approx(math.sqrt((1 - ac[0]) / ac[0]), rel=1e-5)
    assert torch.all(sigmas[:-1].diff() < 0)


# -- a perfect predictor: the samplers must land on its x0 ---------------------------------------
def _alpha_at(ac: torch.Tensor, t: float) -> float:
    """alpha_cumprod at a (possibly fractional) timestep, log-sigma interpolated as k-diffusion does."""
    lo, hi = math.floor(t), math.ceil(t)
    ls = lambda i: 0.5 * math.log((1 - float(ac[i])) / float(ac[i]))  # noqa: E731
    sigma = math.exp(ls(lo) + (t - lo) * (ls(hi) - ls(lo)))
    return 1 / (1 + sigma**2)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "euler"])
def test_perfect_predictor_recovers_x0(tiny_adapter, prediction, sampler):
    ac = tiny_adapter.alphas_cumprod.double()
    x0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3)).double()
    calls = []

    def predict(x_in, timesteps, cond):
        calls.append(timesteps.tolist())
        a = torch.tensor([_alpha_at(ac, float(t)) for t in timesteps], dtype=torch.float64).view(-1, 1, 1, 1)
        x = x_in.double()
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.float()

    tiny_adapter.predict = predict
    tiny_adapter.info.prediction_type = prediction
    cond, uncond = torch.zeros(1, 77, 64), torch.ones(1, 77, 64)
    eps = guided_eps(tiny_adapter, cond, uncond, 7.5)
    g = torch.Generator().manual_seed(0)
    if sampler == "ddim":
        x = sample_ddim(tiny_adapter, eps, x0.shape, 10, g)
    else:
        x = sample_euler(tiny_adapter, eps, x0.shape, 10, g, eta=1.0 if sampler == "euler_a" else 0.0)
    assert len(calls) == 10 and all(len(c) == 2 for c in calls)  # cfg batches uncond and cond
    assert torch.allclose(x.double(), x0, atol=1e-3), (x.double() - x0).abs().max()


# -- the tiny model ----------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_samplers_on_tiny_model(tiny_adapter, sampler):
    rng = torch.get_rng_state()
    p = SamplePrompt("a photo of a cat", "blurry", sampler=sampler, **SMALL)
    a = generate_latents(tiny_adapter, p, default_seed=1)
    b = generate_latents(tiny_adapter, p, default_seed=1)
    c = generate_latents(tiny_adapter, p, default_seed=2)
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    image = render(tiny_adapter, SamplePrompt("a cat", sampler=sampler, width=96, height=64, steps=2, seed=5))
    assert image.size == (96, 64) and image.mode == "RGB" and image.info["seed"] == 5
    assert np.asarray(image).std() > 0
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG was never drawn from


def test_sampling_restores_train_modes(tiny_model, tiny_adapter):
    before = snapshot(tiny_model)
    tiny_model.train()
    try:
        modes = {n: m.training for n, m in tiny_model.named_modules()}
        generate_latents(tiny_adapter, SamplePrompt("x", scale=1.0, **SMALL), 0)
        assert {n: m.training for n, m in tiny_model.named_modules()} == modes
    finally:
        for name, m in tiny_model.named_modules():
            m.training = before["modes"][name]
    assert_same_as(tiny_model, before)


def test_lora_changes_the_sample_only_when_up_is_nonzero(tiny_model, tiny_adapter):
    before = snapshot(tiny_model)
    p = SamplePrompt("a cat", width=64, height=64, steps=1)
    base = generate_latents(tiny_adapter, p, 0)
    net = LoRANetwork(tiny_adapter.lora_targets(), dim=4, alpha=4, seed=1)
    with net.applied():
        same = generate_latents(tiny_adapter, p, 0)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for m in net.lora_modules.values():
                m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.5)
        changed = generate_latents(tiny_adapter, p, 0)
    assert torch.equal(base, same)
    assert (changed - base).abs().max() > 1e-3
    assert_same_as(tiny_model, before)


def test_v_prediction_path(tiny_model, monkeypatch):
    from lora_train.model.ldm import LdmAdapter

    p = SamplePrompt("a cat", sampler="euler_a", **SMALL)
    eps_latents = generate_latents(LdmAdapter(tiny_model), p, 0)
    monkeypatch.setattr(tiny_model, "parameterization", "v")
    adapter = LdmAdapter(tiny_model)
    assert adapter.prediction_type == "v"
    v_latents = generate_latents(adapter, p, 0)
    assert torch.isfinite(v_latents).all() and not torch.allclose(v_latents, eps_latents)
    assert render(adapter, SamplePrompt("a cat", sampler="ddim", **SMALL), 0).size == (64, 64)


# -- PNG infotext --------------------------------------------------------------------------------
def test_png_parameters_round_trip(tmp_path):
    image = Image.new("RGB", (64, 96), "white")
    image.info["seed"] = 1234
    p = SamplePrompt("1girl, 猫耳, (smile:1.2)", "lowres, bad hands", 64, 96, None, 28, 7.5, "k_euler_a")
    path = save_sample(image, tmp_path / "s.png", p, {"Lora": "zkz:0.8", "Epoch": 3, "Step": 120, "Model": "tiny"})
    assert [f.name for f in tmp_path.iterdir()] == ["s.png"]  # no temp file left behind
    text = Image.open(path).info["parameters"]
    assert text.splitlines()[0] == "1girl, 猫耳, (smile:1.2)"
    assert text.splitlines()[1] == "Negative prompt: lowres, bad hands"
    assert text.splitlines()[2].startswith("Steps: 28, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 64x96, ")
    params = parse_infotext(text)
    assert params == {
        "Prompt": p.prompt,
        "Negative prompt": p.negative,
        "Steps": "28",
        "Sampler": "Euler a",
        "CFG scale": "7.5",
        "Seed": "1234",
        "Size": "64x96",
        "Lora": "zkz:0.8",
        "Epoch": "3",
        "Step": "120",
        "Model": "tiny",
    }
    no_negative = infotext(SamplePrompt("x", seed=1, scale=7.0))
    assert no_negative == "x\nSteps: 30, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 512x512"


# -- the sample command --------------------------------------------------------------------------
@pytest.fixture
def lora_file(tiny_adapter, tmp_path):
    net = LoRANetwork(tiny_adapter.lora_targets(conv=True), dim=2, alpha=1, conv_dim=2, conv_alpha=1, seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in net.lora_modules.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
    return save_lora(tmp_path / "zkz.safetensors", net.kohya_state_dict(), {"ss_network_dim": "2"})


def test_sample_command_writes_n_files_and_restores_model(tiny_model, tiny_adapter, lora_file, tmp_path, monkeypatch):
    from lora_train.model import registry

    monkeypatch.setattr(registry, "load_adapter", lambda spec: tiny_adapter)
    before = snapshot(tiny_model)
    out = tmp_path / "out"
    paths = sample_command(
        "builtin:tiny",
        [(str(lora_file), 0.8)],
        "a cat",
        n=2,
        seed=10,
        output_dir=out,
        steps=1,
        width=64,
        height=64,
        scale=5,
        sampler="euler_a",
    )
    assert [p.name for p in paths] == ["00000-10.png", "00001-11.png"]
    assert sorted(f.name for f in out.iterdir()) == ["00000-10.png", "00001-11.png"]
    params = parse_infotext(Image.open(paths[1]).info["parameters"])
    assert (params["Seed"], params["Lora"], params["Sampler"], params["Size"], params["Model"]) == (
        "11",
        "zkz:0.8",
        "Euler a",
        "64x64",
        "tiny",
    )
    assert_same_as(tiny_model, before)
    # the LoRA was on while rendering: the same seed without it gives another image
    plain = render(tiny_adapter, SamplePrompt("a cat", seed=10, steps=1, width=64, height=64, scale=5, sampler="euler_a"))
    assert not np.array_equal(np.asarray(plain), np.asarray(Image.open(paths[0]).convert("RGB")))
    # numbering continues after what is in the folder
    more = sample_command("builtin:tiny", [], "a cat", n=1, seed=3, output_dir=out, steps=1, width=64, height=64, scale=1)
    assert more[0].name == "00002-3.png"


def test_sample_command_removes_networks_when_rendering_fails(tiny_model, tiny_adapter, lora_file, tmp_path, monkeypatch):
    from lora_train.model import registry

    monkeypatch.setattr(registry, "load_adapter", lambda spec: tiny_adapter)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(render_mod, "render", boom)
    before = snapshot(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        sample_command(
            "builtin:tiny",
            [(str(lora_file), 1.0), (str(lora_file), -1.0)],
            "a cat",
            output_dir=tmp_path,
            steps=1,
            width=64,
            height=64,
        )
    assert_same_as(tiny_model, before)


def test_sample_command_rejects_a_lora_for_another_model(tiny_adapter, tmp_path, monkeypatch):
    from lora_train.model import registry

    monkeypatch.setattr(registry, "load_adapter", lambda spec: tiny_adapter)
    bad = save_lora(
        tmp_path / "other.safetensors",
        {"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 4), "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 1)},
        {},
    )
    with pytest.raises(UserError, match="does not fit this model"):
        sample_command("builtin:tiny", [(str(bad), 1.0)], "a cat", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sample_and_grid_refuse_a_file_of_an_unloadable_algorithm_naming_file_key_and_algorithm(tiny_adapter, lora_file, tmp_path, monkeypatch):
    """A key of an algorithm LoRA Train cannot load (LyCORIS' Tucker LoCon) is not dropped: the file
    would render as plain LoRA."""
    from safetensors.torch import load_file

    from lora_train.model import registry
    from lora_train.sample.grid import render_grid

    monkeypatch.setattr(registry, "load_adapter", lambda spec: tiny_adapter)
    tensors = load_file(str(lora_file))
    name = next(k for k in tensors if k.endswith(".lora_up.weight")).partition(".")[0]
    rank = tensors[f"{name}.lora_up.weight"].shape[1]
    tucker = save_lora(tmp_path / "tucker.safetensors", dict(tensors, **{f"{name}.lora_mid.weight": torch.ones(rank, rank, 3, 3)}), {})
    for attempt in (lambda: sample_command("builtin:tiny", [(str(tucker), 1.0)], "a cat", output_dir=tmp_path / "out"),
                    lambda: render_grid(tiny_adapter, [tucker], [1.0], "a cat", 1, tmp_path / "grid.png", size=64, steps=1)):
        with pytest.raises(UserError) as e:
            attempt()
        assert "tucker.safetensors" in str(e.value) and f"{name}.lora_mid.weight" in str(e.value) and "Tucker/CP" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "grid.png").exists()
