"""The [model] keys that decide how a checkpoint loads: v2 / v_parameterization (SD2 without its .yaml),
vae (an external VAE file), no_half_vae, and Hugging Face ids."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_train.errors import UserError
from lora_train.model import registry, stock, tiny
from lora_train.model.loading import instantiate, quiet
from lora_train.train.config import ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _save(state: dict, path: Path, prefix: str = "") -> Path:
    safetensors.torch.save_file({prefix + k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory):
    """A tiny SD2-shaped checkpoint (OpenCLIP text encoder), saved without a .yaml."""
    with quiet():
        model = tiny.seeded_build(lambda: instantiate(tiny.tiny_sd2_config()), 5, lambda m: [m.cond_stage_model])
    return _save(model.state_dict(), tmp_path_factory.mktemp("sd2") / "sd2-tiny.safetensors")


@pytest.fixture
def tiny_stock(monkeypatch):
    # the stock configs are full size; a tiny file needs tiny ones of the same families
    monkeypatch.setitem(stock.STOCK, "sd2", tiny.tiny_sd2_config())
    monkeypatch.setitem(stock.STOCK, "sd1", tiny.tiny_model_config())


# -- v2 / v_parameterization -----------------------------------------------------------------------
def test_sd2_checkpoint_without_yaml_is_v_with_v_parameterization(sd2_file, tiny_stock):
    assert not sd2_file.with_suffix(".yaml").exists()
    v = registry.load_adapter(str(sd2_file), model_config=ModelConfig(v2=True, v_parameterization=True))
    assert (v.info.family, v.prediction_type, v.model.parameterization) == ("sd2", "v", "v")
    assert v.info.notes == []
    assert v.info.base_model_version == "sd_v2_v"
    saved = safetensors.torch.load_file(str(sd2_file))
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(v.model.state_dict()[key], saved[key])
    eps = registry.load_adapter(str(sd2_file), model_config=ModelConfig(v2=True))
    assert (eps.info.family, eps.prediction_type) == ("sd2", "epsilon")


def test_keys_that_contradict_v2_are_named(sd2_file, tiny_stock, tmp_path):
    unset = registry.load_adapter(str(sd2_file), model_config=ModelConfig())
    assert unset.info.family == "sd2"
    assert unset.info.notes == ["sd2-tiny.safetensors is an SD2 checkpoint (OpenCLIP ViT-H text encoder) although v2 is not set: "
                                "loaded as SD2"]
    with quiet():
        sd1 = _save(tiny.build_tiny(0).state_dict(), tmp_path / "sd1.safetensors")
    wrong = registry.load_adapter(str(sd1), model_config=ModelConfig(v2=True))
    assert (wrong.info.family, wrong.prediction_type) == ("sd1", "epsilon")
    assert wrong.info.notes == ["v2 is set, but sd1.safetensors has no SD2 text encoder (OpenCLIP ViT-H): loaded as SD1, v2 ignored"]


def test_the_v_target_reaches_the_loss(sd2_file, tiny_stock, tmp_path, monkeypatch):
    from conftest import make_dataset, small_run_config

    from lora_train.app import job
    from lora_train.train import loop

    seen = []
    real = loop.loss_fn.target

    def spy(latents, noise, alphas_t, prediction_type):
        out = real(latents, noise, alphas_t, prediction_type)
        # v = sqrt(a) * noise - sqrt(1 - a) * x0 (Salimans & Ho 2022), by hand
        a = alphas_t.view(-1, 1, 1, 1).double()
        seen.append((prediction_type, torch.allclose(out.double(), a.sqrt() * noise.double() - (1 - a).sqrt() * latents.double(), atol=1e-5)))
        return out

    monkeypatch.setattr(loop.loss_fn, "target", spy)
    config = small_run_config(make_dataset(tmp_path / "data", count=2), "v", epochs=1, max_train_steps=1,
                              output_dir=str(tmp_path / "out"), v2=True, v_parameterization=True)
    adapter = registry.load_adapter(str(sd2_file), model_config=config.model)
    job.build_trainer(config, adapter).run()
    assert seen == [("v", True)]


def test_stock_sd2_config_is_stablediffusions_v2_inference():
    """The UNet is the SD2.1 one the LoRA names are checked against (arch.py, sd-scripts' fixtures);
    the text encoder OpenCLIP ViT-H (ldm's default arch), read at the penultimate layer."""
    from lora_train.model.arch import SD21_UNET_PARAMS

    params = stock.SD2_INFERENCE_CONFIG["params"]
    assert params["unet_config"]["params"] == dict(SD21_UNET_PARAMS, use_fp16=False)
    assert params["cond_stage_config"] == {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                           "params": {"freeze": True, "layer": "penultimate"}}
    assert "parameterization" not in params  # eps unless v_parameterization
    import inspect

    import ldm.modules.encoders.modules as enc

    assert inspect.signature(enc.FrozenOpenCLIPEmbedder).parameters["arch"].default == "ViT-H-14"
    yaml = Path("/work/a1111/webui/repositories/stable-diffusion-stability-ai/configs/stable-diffusion/v2-inference.yaml")
    if yaml.is_file():  # the WebUI's own copy, where it is installed
        from omegaconf import OmegaConf

        theirs = OmegaConf.to_container(OmegaConf.load(yaml).model, resolve=True)
        theirs.pop("base_learning_rate", None)
        theirs["params"]["unet_config"]["params"].update(use_checkpoint=False, use_fp16=False)
        assert theirs == stock.SD2_INFERENCE_CONFIG


def test_v_parameterization_on_sdxl_is_refused(tmp_path):
    from lora_train.model.loading import sdxl_notes

    with pytest.raises(UserError, match="^v_parameterization is set, but x.safetensors is an SDXL checkpoint"):
        sdxl_notes("x.safetensors", False, True)


# -- vae ------------------------------------------------------------------------------------------------
def _vae_file(tmp_path: Path, prefix: str = "") -> Path:
    with quiet():
        other = tiny.build_tiny(7)  # another seed: another VAE
    return _save(other.first_stage_model.state_dict(), tmp_path / f"vae{prefix.strip('.')}.safetensors", prefix)


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_external_vae_encodes_the_latents(tmp_path, prefix):
    from ldm.models.autoencoder import AutoencoderKL

    path = _vae_file(tmp_path, prefix)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    own = registry.load_adapter("builtin:tiny")
    swapped = registry.load_adapter("builtin:tiny", model_config=ModelConfig(vae=str(path)))
    assert swapped.info.notes == [f"vae: latents are encoded with {path.name} instead of the checkpoint's own VAE"]
    # an independent path: the file into a fresh AutoencoderKL of the tiny model's shape
    params = tiny.tiny_model_config()["params"]["first_stage_config"]["params"]
    with quiet():
        fresh = AutoencoderKL(ddconfig=params["ddconfig"], lossconfig=params["lossconfig"], embed_dim=params["embed_dim"]).eval()
    state = safetensors.torch.load_file(str(path))
    fresh.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
    with torch.no_grad():
        expected = fresh.encode(pixels).mean
    mean, _ = swapped.encode_posterior(pixels)
    assert torch.equal(mean, expected)
    assert not torch.allclose(own.encode_posterior(pixels)[0], expected, atol=1e-3)


def test_a_file_that_is_not_a_vae_of_the_model_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        registry.load_model("builtin:tiny", vae=str(_save({"x": torch.zeros(2)}, tmp_path / "x.safetensors")))
    assert str(e.value).startswith(f"vae '{tmp_path / 'x.safetensors'}': not a VAE of this model (")
    with pytest.raises(UserError, match="^vae: the file 'nope.safetensors' does not exist$"):
        registry.load_model("builtin:tiny", vae="nope.safetensors")


def test_diffusers_vae_names_become_ldm_names():
    from lora_train.model.vae_file import vae_state_dict

    w = torch.zeros(8, 8)
    # diffusers' convert_vae_pt_to_diffusers.py / the WebUI's sd_vae_approx naming, by hand: four
    # decoder blocks, numbered from the bottom in diffusers and from the top in ldm
    names = {
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down_blocks.1.downsamplers.0.conv.weight": "encoder.down.1.downsample.conv.weight",
        "encoder.mid_block.resnets.1.norm2.bias": "encoder.mid.block_2.norm2.bias",
        "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
        "decoder.up_blocks.0.resnets.2.conv1.weight": "decoder.up.3.block.2.conv1.weight",
        "decoder.up_blocks.3.resnets.0.conv1.weight": "decoder.up.0.block.0.conv1.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight": "decoder.up.3.upsample.conv.weight",
        "decoder.mid_block.attentions.0.group_norm.weight": "decoder.mid.attn_1.norm.weight",
        "decoder.mid_block.attentions.0.to_q.weight": "decoder.mid.attn_1.q.weight",
        "encoder.mid_block.attentions.0.key.weight": "encoder.mid.attn_1.k.weight",
        "encoder.mid_block.attentions.0.to_out.0.bias": "encoder.mid.attn_1.proj_out.bias",
        "encoder.mid_block.attentions.0.proj_attn.weight": "encoder.mid.attn_1.proj_out.weight",
        "quant_conv.weight": "quant_conv.weight",
    }
    out = vae_state_dict({k: w for k in names})
    assert sorted(out) == sorted(names.values())
    assert out["decoder.mid.attn_1.q.weight"].shape == (8, 8, 1, 1)  # a linear layer in diffusers, a 1x1 conv in ldm


# -- no_half_vae -----------------------------------------------------------------------------------------
def _encoder_dtypes(adapter) -> list:
    seen = []
    handle = adapter.vae.encoder.register_forward_pre_hook(lambda m, args: seen.append((m.conv_in.weight.dtype, args[0].dtype)))
    return seen, handle


@pytest.mark.parametrize("no_half_vae", [False, True])
def test_no_half_vae_encodes_a_half_vae_in_float32_during_training(tmp_path, no_half_vae):
    from conftest import make_dataset, small_run_config

    from lora_train.app import job

    config = small_run_config(make_dataset(tmp_path / "data", count=2), "h", epochs=1, max_train_steps=1,
                              output_dir=str(tmp_path / "out"), mixed_precision="bf16", no_half_vae=no_half_vae)
    adapter = registry.load_adapter("builtin:tiny", model_config=config.model)
    adapter.vae.to(torch.bfloat16)  # as the WebUI keeps its VAE, unless started with --no-half-vae
    before = {k: v.clone() for k, v in adapter.vae.state_dict().items()}
    seen, handle = _encoder_dtypes(adapter)
    try:
        job.build_trainer(config, adapter).run()
    finally:
        handle.remove()
    want = torch.float32 if no_half_vae else torch.bfloat16
    assert seen and set(seen) == {(want, want)}
    after = adapter.vae.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())


# -- Hugging Face ids --------------------------------------------------------------------------------------
def test_what_is_a_hub_id(tmp_path):
    from lora_train.model.hub import is_hub_id

    assert is_hub_id("runwayml/stable-diffusion-v1-5")
    assert is_hub_id("stabilityai/sd-vae-ft-mse-original/vae-ft-mse-840000-ema-pruned.safetensors")
    assert not is_hub_id("models/missing.safetensors")  # a local file that is not there
    assert not is_hub_id("/abs/owner/name")
    assert not is_hub_id("model.safetensors")
    (tmp_path / "owner" / "name").mkdir(parents=True)
    os.chdir(tmp_path)
    try:
        assert not is_hub_id("owner/name")  # a folder here wins
    finally:
        os.chdir(ROOT)


def test_offline_hub_id_says_where_to_put_the_file(tmp_path):
    code = ("from lora_train.errors import UserError\n"
            "from lora_train.model.registry import load_model\n"
            "for spec in ('runwayml/stable-diffusion-v1-5', 'owner/name/sub/model.safetensors'):\n"
            "    try:\n        load_model(spec)\n    except UserError as e:\n        print(e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    cache = tmp_path / "hf" / "hub"
    assert lines[0].startswith("pretrained_model_name_or_path 'runwayml/stable-diffusion-v1-5': not in the Hugging Face cache")
    assert lines[0].endswith("download the file from https://huggingface.co/runwayml/stable-diffusion-v1-5 and set "
                             f"pretrained_model_name_or_path to its path, or run once online to fill the cache ({cache})")
    assert "https://huggingface.co/owner/name " in lines[1]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub's download calls, answered from local files (no network here)."""
    import huggingface_hub

    calls = []
    hub = {"files": [], "serve": {}}

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        if filename not in hub["serve"]:
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(filename)
        return str(hub["serve"][filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kwargs: list(hub["files"]))
    hub["calls"] = calls
    return hub


def test_a_hub_repository_loads_its_single_file_checkpoint(fake_hub, tmp_path):
    with quiet():
        path = tiny.save_checkpoint(tiny.build_tiny(3), tmp_path / "snapshot" / "v1-5-pruned-emaonly.safetensors")
    fake_hub["files"] = ["v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt", "model_index.json",
                         "unet/diffusion_pytorch_model.safetensors", "README.md"]
    fake_hub["serve"] = {"v1-5-pruned-emaonly.safetensors": path, "v1-5-pruned-emaonly.yaml": path.with_suffix(".yaml")}
    model = registry.load_model("runwayml/stable-diffusion-v1-5")
    assert fake_hub["calls"] == [("runwayml/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors"),
                                 ("runwayml/stable-diffusion-v1-5", "v1-5-pruned-emaonly.yaml")]
    saved = safetensors.torch.load_file(str(path))
    assert torch.equal(model.state_dict()["model.diffusion_model.out.2.weight"], saved["model.diffusion_model.out.2.weight"])


def test_a_hub_vae_id(fake_hub, tmp_path):
    path = _vae_file(tmp_path)
    fake_hub["files"] = ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors", "config.json"]
    fake_hub["serve"] = {"diffusion_pytorch_model.safetensors": path}
    adapter = registry.load_adapter("builtin:tiny", model_config=ModelConfig(vae="stabilityai/sd-vae-ft-mse"))
    assert fake_hub["calls"] == [("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors")]
    assert torch.equal(adapter.vae.state_dict()["encoder.conv_in.weight"], safetensors.torch.load_file(str(path))["encoder.conv_in.weight"])


def test_hub_repositories_we_cannot_read_are_one_line(fake_hub):
    fake_hub["files"] = ["v2-1_768-ema-pruned.safetensors", "v2-1_768-nonema-pruned.safetensors", "v2-1_768-ema-pruned.ckpt"]
    with pytest.raises(UserError) as e:
        registry.load_model("stabilityai/stable-diffusion-2-1")
    assert str(e.value) == ("pretrained_model_name_or_path 'stabilityai/stable-diffusion-2-1': the repository holds several "
                            "checkpoints (v2-1_768-ema-pruned.safetensors, v2-1_768-nonema-pruned.safetensors); name one as "
                            "stabilityai/stable-diffusion-2-1/FILE")


# -- the config ----------------------------------------------------------------------------------------------
def test_model_keys_are_config_keys_with_sd_scripts_names():
    config = TrainConfig().update({"v2": True, "v_parameterization": True, "vae": "x.safetensors", "no_half_vae": True}, source="a.toml")
    assert (config.model.v2, config.model.v_parameterization, config.model.vae, config.model.no_half_vae) == (True, True, "x.safetensors", True)
    assert config.notes == []
    assert TrainConfig().model.v2 is False and TrainConfig().model.vae is None


def test_on_the_webui_its_own_model_and_vae_are_trained_and_the_keys_say_so(tiny_adapter):
    from lora_train.model.select import hosted_notes

    assert hosted_notes(ModelConfig(), tiny_adapter) == []
    assert hosted_notes(ModelConfig(vae="vae-ft-mse.safetensors", v2=True, v_parameterization=True), tiny_adapter) == [
        "vae vae-ft-mse.safetensors: the WebUI's VAE is used (Settings > Stable Diffusion > SD VAE); choose the file there to train with it",
        "v2 is set, but the WebUI's model is SD1: v2 ignored",
        "v_parameterization is set, but the WebUI's model predicts eps (as its .yaml says): trained as it is",
    ]


def test_the_standalone_host_reloads_for_another_vae(tmp_path):
    from lora_train.host.standalone import StandaloneHost

    host = StandaloneHost("builtin:tiny", tmp_path / "lora", tmp_path / "work")
    path = _vae_file(tmp_path)
    with host.session(TrainConfig(), "a") as plain:
        first = plain.vae.encoder.conv_in.weight.clone()
    with host.session(TrainConfig().update({"vae": str(path), "no_half_vae": True}), "b") as swapped:
        assert swapped.vae_fp32 and not torch.equal(swapped.vae.encoder.conv_in.weight, first)
    with host.session(TrainConfig(), "c") as again:
        assert torch.equal(again.vae.encoder.conv_in.weight, first) and not again.vae_fp32


def test_a_diffusers_vae_folder_and_a_diffusers_model_folder(tmp_path):
    folder = tmp_path / "sd-vae" / "vae"
    folder.mkdir(parents=True)
    path = _vae_file(tmp_path)
    ldm = safetensors.torch.load_file(str(path))
    # back to diffusers' names: the pairs the renaming test checks by hand, applied to every key
    to_diffusers = _diffusers_names(ldm)
    _save({to_diffusers[k]: v.squeeze(-1).squeeze(-1) if ".attn_1." in k and v.ndim == 4 else v for k, v in ldm.items()},
          folder / "diffusion_pytorch_model.safetensors")
    adapter = registry.load_adapter("builtin:tiny", model_config=ModelConfig(vae=str(tmp_path / "sd-vae")))
    assert all(torch.equal(adapter.vae.state_dict()[k], v) for k, v in ldm.items())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    with pytest.raises(UserError) as e:  # a diffusers model folder is read (test_diffusers_folder.py); this one is empty
        registry.load_model(str(tmp_path / "model"))
    assert str(e.value) == f"{tmp_path / 'model'}: a diffusers model without unet/diffusion_pytorch_model.safetensors"


def _diffusers_names(ldm: dict) -> dict:
    """ldm VAE name -> diffusers name, written the other way round from the code under test."""
    import re

    last = max(int(m.group(1)) for k in ldm if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    attention = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for key in ldm:
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{last - int(m.group(1))}.resnets.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{last - int(m.group(1))}.upsamplers.0.", new)
        new = new.replace(".mid.block_1.", ".mid_block.resnets.0.").replace(".mid.block_2.", ".mid_block.resnets.1.")
        new = re.sub(r"\.mid\.attn_1\.(\w+)\.", lambda m: f".mid_block.attentions.0.{attention[m.group(1)]}.", new)
        out[key] = new.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
    return out


def test_the_vae_file_is_named_in_the_lora_metadata_as_sd_scripts_does(tmp_path):
    import hashlib

    from conftest import make_dataset, small_run_config

    from safetensors import safe_open

    from lora_train.app import job

    path = _vae_file(tmp_path)
    config = small_run_config(make_dataset(tmp_path / "data", count=2), "m", epochs=1, max_train_steps=1,
                              output_dir=str(tmp_path / "out"), vae=str(path))
    lora = job.build_trainer(config, registry.load_adapter("builtin:tiny", model_config=config.model)).run()
    with safe_open(str(lora), "pt") as f:
        md = f.metadata()
    assert md["ss_vae_name"] == path.name
    assert md["ss_new_vae_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert md["ss_vae_hash"] == hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


def test_builtin_models_say_they_do_not_read_v2():
    adapter = registry.load_adapter("builtin:tiny", model_config=ModelConfig(v2=True, v_parameterization=True))
    assert adapter.prediction_type == "epsilon"
    assert adapter.info.notes == ["v2 and v_parameterization are not read for the built-in test models (eps models of SD1 or SDXL shape)"]
