"""Diffusers model folders (model_index.json, unet/, vae/, text_encoder/ ...) load as the single-file
checkpoints they stand for: SD1, SD2 (OpenCLIP stored as an HF CLIPTextModel) and SDXL.

The folders are written here from our tiny models with an inverse mapping (ldm -> diffusers) of our
own, built from the tables of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py
and convert_diffusers_to_original_sdxl.py, not from the code under test.
"""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_model_loading import _diffusers_names  # the VAE's ldm -> diffusers names, written by hand there

from lora_train.errors import UserError
from lora_train.model import registry, sgm_loading, stock, tiny
from lora_train.model.loading import instantiate, quiet
from lora_train.model.select import adapter_for
from lora_train.model.sgm_import import sgm_available
from lora_train.model.tiny_sdxl import TE2_WIDTH, build_tiny_sdxl, tiny_sdxl_config
from lora_train.train.config import ModelConfig


# -- the inverse mapping, from diffusers' tables -----------------------------------------------------
def _unet_table(sdxl: bool) -> dict[str, str]:
    """ldm block prefix -> diffusers prefix. SD: 4 levels, attention in down 0-2 / up 1-3; SDXL:
    3 levels, attention in down 1-2 / up 0-1 (so its first upsampler sits at output_blocks.2.2)."""
    levels = 3 if sdxl else 4
    down_attention = {1, 2} if sdxl else {0, 1, 2}
    up_attention = {0, 1} if sdxl else {1, 2, 3}
    t = {"middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
         "middle_block.2.": "mid_block.resnets.1."}
    for i in range(levels):
        for j in range(2):
            t[f"input_blocks.{3 * i + j + 1}.0."] = f"down_blocks.{i}.resnets.{j}."
            if i in down_attention:
                t[f"input_blocks.{3 * i + j + 1}.1."] = f"down_blocks.{i}.attentions.{j}."
        for j in range(3):
            t[f"output_blocks.{3 * i + j}.0."] = f"up_blocks.{i}.resnets.{j}."
            if i in up_attention:
                t[f"output_blocks.{3 * i + j}.1."] = f"up_blocks.{i}.attentions.{j}."
        if i < levels - 1:
            t[f"input_blocks.{3 * (i + 1)}.0.op."] = f"down_blocks.{i}.downsamplers.0.conv."
            t[f"output_blocks.{3 * i + 2}.{2 if i in up_attention else 1}."] = f"up_blocks.{i}.upsamplers.0."
    return t


UNET_TOP = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
            "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
            "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}
RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "out_layers.0.": "norm2.", "out_layers.3.": "conv2.",
          "emb_layers.1.": "time_emb_proj.", "skip_connection.": "conv_shortcut."}


def unet_to_diffusers(ldm: dict, sdxl: bool) -> dict:
    table = {**UNET_TOP, **_unet_table(sdxl)}
    out = {}
    for key, value in ldm.items():
        parts = key.split(".")
        prefix = next(p for n in (4, 3, 2, 1) if (p := ".".join(parts[:n]) + ".") in table)
        new = table[prefix] + key[len(prefix):]
        if ".resnets." in new:
            head, rest = new.split(".resnets.", 1)
            j, rest = rest.split(".", 1)
            inner = next(r for r in RESNET if rest.startswith(r))
            new = f"{head}.resnets.{j}.{RESNET[inner]}{rest[len(inner):]}"
        out[new] = value
    return out


OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}


def openclip_to_hf(oc: dict, keep_last_layer: bool) -> dict:
    """open_clip text tower -> an HF CLIPTextModel(WithProjection), as diffusers stores SD2's (its
    last layer and projection left out) and SDXL's second encoder (all of it, projection transposed)."""
    last = max(int(k.split(".")[2]) for k in oc if k.startswith("transformer.resblocks."))
    out = {"text_model.embeddings.token_embedding.weight": oc["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": oc["positional_embedding"],
           "text_model.final_layer_norm.weight": oc["ln_final.weight"], "text_model.final_layer_norm.bias": oc["ln_final.bias"]}
    if keep_last_layer:
        out["text_projection.weight"] = oc["text_projection"].t().contiguous()
    for key, value in oc.items():
        if not key.startswith("transformer.resblocks."):
            continue
        _, _, n, child = key.split(".", 3)
        if int(n) == last and not keep_last_layer:
            continue
        layer = f"text_model.encoder.layers.{n}."
        if child.startswith("attn.in_proj_"):
            for name, piece in zip("qkv", value.chunk(3)):
                out[f"{layer}self_attn.{name}_proj.{child.rsplit('_', 1)[1]}"] = piece.contiguous()
        else:
            module, kind = child.rsplit(".", 1)
            out[f"{layer}{OPENCLIP_LAYER[module]}.{kind}"] = value
    return out


def vae_to_diffusers(ldm: dict) -> dict:
    names = _diffusers_names(ldm)
    return {names[k]: v.squeeze(-1).squeeze(-1) if ".attn_1." in k and v.ndim == 4 else v for k, v in ldm.items()}


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v.detach().clone().contiguous() for k, v in state.items() if k.startswith(prefix)}


def write_folder(model, folder: Path, family: str, prediction: str = "epsilon") -> Path:
    """`model` as a diffusers folder: weights, the configs the loader reads, model_index.json."""
    state = model.state_dict()
    files = {"unet/diffusion_pytorch_model.safetensors": unet_to_diffusers(_part(state, "model.diffusion_model."), family == "sdxl"),
             "vae/diffusion_pytorch_model.safetensors": vae_to_diffusers(_part(state, "first_stage_model."))}
    index = {"_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    configs = {"scheduler/scheduler_config.json": {"prediction_type": prediction}, "unet/config.json": {}, "vae/config.json": {}}
    if family == "sdxl":
        files["text_encoder/model.safetensors"] = _part(state, "conditioner.embedders.0.transformer.")
        files["text_encoder_2/model.safetensors"] = openclip_to_hf(_part(state, "conditioner.embedders.1.model."), True)
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        configs["text_encoder/config.json"] = {"hidden_act": "quick_gelu"}
        configs["text_encoder_2/config.json"] = {"hidden_act": "gelu", "hidden_size": TE2_WIDTH}
    elif family == "sd2":
        files["text_encoder/model.safetensors"] = openclip_to_hf(_part(state, "cond_stage_model.model."), False)
        configs["text_encoder/config.json"] = {"hidden_act": "gelu", "hidden_size": TE2_WIDTH}
    else:
        files["text_encoder/model.safetensors"] = _part(state, "cond_stage_model.transformer.")
        configs["text_encoder/config.json"] = {"hidden_act": "quick_gelu"}
    for name, weights in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(weights, str(folder / name))
    for name, data in {**configs, "model_index.json": index}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(data), encoding="utf-8")
    return folder


# -- helpers ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_stock(monkeypatch):
    # the stock configs are full size; the tiny folders need tiny ones of the same families
    monkeypatch.setitem(stock.STOCK, "sd1", tiny.tiny_model_config())
    monkeypatch.setitem(stock.STOCK, "sd2", tiny.tiny_sd2_config())


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(the text conditioning, the UNet's prediction) for fixed captions and noise."""
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        text = adapter.encode_captions(["a red fox in the snow", "two blue cups"])
        cond = adapter.condition(text, adapter.size_condition(64, 64, 2))
        out = adapter.predict(latents, torch.tensor([100, 700]), cond)
    return cond, out


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _sd2_model(seed: int):
    with quiet():
        return tiny.seeded_build(lambda: instantiate(tiny.tiny_sd2_config()), seed, lambda m: [m.cond_stage_model])


# -- SD1 / SD2 through the single-file path -------------------------------------------------------------
def test_an_sd1_folder_loads_every_weight_and_conditions_and_predicts_as_the_model(tmp_path, tiny_stock):
    with quiet():
        original = tiny.build_tiny(11)
    folder = write_folder(original, tmp_path / "sd1-model", "sd1")
    loaded = registry.load_model(str(folder))
    want, got = original.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert loaded.parameterization == "eps" and loaded.load_notes == []
    _assert_same(_outputs(loaded), _outputs(original))
    assert adapter_for(loaded).info.name == "sd1-model"


def test_an_sd2_v_folder_fills_the_layer_diffusers_leaves_out_and_predicts_v(tmp_path, tiny_stock):
    original = _sd2_model(12)
    folder = write_folder(original, tmp_path / "sd2-model", "sd2", prediction="v_prediction")
    loaded = registry.load_model(str(folder))
    want, got = original.state_dict(), loaded.state_dict()
    last = max(int(k.split(".")[4]) for k in want if k.startswith("cond_stage_model.model.transformer.resblocks."))
    dropped = f"cond_stage_model.model.transformer.resblocks.{last}."
    for key in want:
        if key.startswith(dropped):  # not in the folder: a copy of the layer before, as sd-scripts writes it
            assert torch.equal(got[key], want[key.replace(f".{last}.", f".{last - 1}.")]), key
        elif key not in ("cond_stage_model.model.text_projection",):
            assert torch.equal(got[key], want[key]), key
    assert loaded.parameterization == "v"
    assert loaded.load_notes == [
        "sd2-model: its scheduler says v_prediction, so the model is trained to predict v (as v_parameterization would)",
        "sd2-model is an SD2 checkpoint (OpenCLIP ViT-H text encoder) although v2 is not set: loaded as SD2"]
    original.parameterization = "v"
    _assert_same(_outputs(loaded), _outputs(original))
    eps = registry.load_model(str(write_folder(original, tmp_path / "sd2-eps", "sd2")), v2=True)
    assert eps.parameterization == "eps" and eps.load_notes == []


def test_the_dry_run_family_of_a_folder(tmp_path):
    from lora_train.model.header import family_of_file

    with quiet():
        sd1 = tiny.build_tiny(1)
    assert family_of_file(write_folder(sd1, tmp_path / "a", "sd1")) == "sd1"
    assert family_of_file(write_folder(_sd2_model(1), tmp_path / "b", "sd2")) == "sd2"
    assert family_of_file(write_folder(build_tiny_sdxl(1, sgm=False), tmp_path / "c", "sdxl")) == "sdxl"


# -- SDXL ------------------------------------------------------------------------------------------------
def test_an_sdxl_folder_becomes_the_checkpoint_keys_with_both_text_encoders(tmp_path):
    from lora_train.model.diffusers_folder import folder_state_dict

    original = build_tiny_sdxl(13, sgm=False)
    folder = write_folder(original, tmp_path / "xl", "sdxl")
    state = folder_state_dict(folder)
    want = original.state_dict()
    assert sgm_loading.has_sdxl_keys(state)
    # diffusers keeps neither the noise schedule nor OpenCLIP's logit_scale
    assert set(want) - set(state) == {"alphas_cumprod", "conditioner.embedders.1.model.logit_scale"}
    assert set(state) <= set(want)
    for key, value in state.items():
        assert torch.equal(value, want[key]), key
    other = build_tiny_sdxl(14, sgm=False)
    assert not torch.equal(other.state_dict()["conditioner.embedders.1.model.text_projection"], want["conditioner.embedders.1.model.text_projection"])
    other.load_state_dict(state, strict=False)
    _assert_same(_outputs(other), _outputs(original))  # the pooled vector goes through text_projection


@pytest.mark.skipif(not sgm_available(), reason="sgm not importable (set LORA_TRAIN_SGM_PATH)")
def test_an_sdxl_folder_loads_through_sgm(tmp_path, monkeypatch):
    original = build_tiny_sdxl(15, sgm=True)
    monkeypatch.setattr(sgm_loading, "stock_sdxl_config", lambda path: tiny_sdxl_config())
    loaded = registry.load_model(str(write_folder(original, tmp_path / "xl", "sdxl")))
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    _assert_same(_outputs(loaded), _outputs(original))


def test_an_sdxl_folder_that_says_v_prediction_is_refused(tmp_path):
    folder = write_folder(build_tiny_sdxl(1, sgm=False), tmp_path / "xl", "sdxl", prediction="v_prediction")
    with pytest.raises(UserError, match=r"xl: scheduler/scheduler_config.json says v_prediction, but LoRA Train trains SDXL"):
        registry.load_model(str(folder))


# -- bad folders: one line ----------------------------------------------------------------------------------
@pytest.fixture
def sd1_folder(tmp_path):
    with quiet():
        return write_folder(tiny.build_tiny(2), tmp_path / "m", "sd1")


def _rewrite(path: Path, change) -> None:
    state = safetensors.torch.load_file(str(path))
    change(state)
    safetensors.torch.save_file(state, str(path))


def test_a_folder_without_a_part_names_the_file(sd1_folder, tiny_stock):
    (sd1_folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError) as e:
        registry.load_model(str(sd1_folder))
    assert str(e.value) == f"{sd1_folder}: a diffusers model without vae/diffusion_pytorch_model.safetensors"


def test_a_folder_missing_a_weight_names_the_folder_and_the_first_key(sd1_folder, tiny_stock):
    _rewrite(sd1_folder / "unet" / "diffusion_pytorch_model.safetensors", lambda s: s.pop("down_blocks.1.resnets.0.conv1.weight"))
    with pytest.raises(UserError) as e:
        registry.load_model(str(sd1_folder))
    assert str(e.value) == (f"{sd1_folder}: not a complete SD1 diffusers model; 1 weights are missing "
                            "(first: model.diffusion_model.input_blocks.4.0.in_layers.2.weight)")


@pytest.mark.parametrize("key, said", [
    ("down_blocks.0.extra.weight", "unet/ has a weight LoRA Train does not know: down_blocks.0.extra.weight"),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.weight",
     "a weight this SD1 model does not have: model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn9.to_q.weight"),
])
def test_a_folder_with_an_unknown_weight_names_it(sd1_folder, tiny_stock, key, said):
    _rewrite(sd1_folder / "unet" / "diffusion_pytorch_model.safetensors", lambda s: s.update({key: torch.zeros(1)}))
    with pytest.raises(UserError) as e:
        registry.load_model(str(sd1_folder))
    assert str(e.value) == f"{sd1_folder}: {said}"


def test_an_sd2_folder_missing_a_fused_piece_names_it(tmp_path, tiny_stock):
    folder = write_folder(_sd2_model(3), tmp_path / "m2", "sd2")
    _rewrite(folder / "text_encoder" / "model.safetensors", lambda s: s.pop("text_model.encoder.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(UserError) as e:
        registry.load_model(str(folder))
    assert str(e.value) == f"{folder}: text_encoder/ is missing text_model.encoder.layers.0.self_attn.k_proj.bias"


# -- a hub id that names a diffusers repository -------------------------------------------------------------
def test_a_hub_diffusers_repository_fetches_one_weights_file_per_part(sd1_folder, tiny_stock, monkeypatch):
    import huggingface_hub

    served = sorted(p.relative_to(sd1_folder).as_posix() for p in sd1_folder.rglob("*") if p.is_file())
    listed = served + ["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
                       "text_encoder/pytorch_model.bin", "tokenizer/vocab.json", "README.md"]
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append(filename)
        return str(sd1_folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kwargs: listed)
    model = registry.load_model("someone/sd15-diffusers")
    assert sorted(calls) == served
    assert torch.equal(model.state_dict()["model.diffusion_model.out.2.weight"],
                       safetensors.torch.load_file(str(sd1_folder / "unet/diffusion_pytorch_model.safetensors"))["conv_out.weight"])
    calls.clear()
    adapter = registry.load_adapter("builtin:tiny", model_config=ModelConfig(vae="someone/sd15-diffusers"))
    assert calls == ["vae/diffusion_pytorch_model.safetensors"]
    assert torch.equal(adapter.vae.state_dict()["encoder.conv_in.weight"], model.state_dict()["first_stage_model.encoder.conv_in.weight"])
    listed[:] = [f for f in listed if not f.startswith("vae/")]
    with pytest.raises(UserError) as e:
        registry.load_model("builtin:tiny", vae="someone/sd15-diffusers")
    assert str(e.value) == ("vae 'someone/sd15-diffusers': the diffusers model has no vae/ weights "
                            "(vae/diffusion_pytorch_model.safetensors); name a VAE file as someone/sd15-diffusers/path/file.safetensors")
