"""The tiny model, its tokenizer, checkpoint writing/loading, and the ldm adapter."""

import open_clip
import pytest
import torch
from conftest import assert_same_as, snapshot
from transformers import CLIPTokenizer

from lora_train.errors import UserError
from lora_train.model import clip_files
from lora_train.model.loading import load_checkpoint, quiet
from lora_train.model.tiny import build_tiny, save_checkpoint

TEXTS = [
    "a photo of a cat",
    "1girl, (masterpiece:1.2), hood (clothing), blue_eyes",
    "Hello   WORLD!!  naïve café",
    "日本語のテキスト 中文标签 😀",
    "zkz, red circle, white background, " * 6,
    "",
]


def test_tokenizer_ids_equal_openai_clip(tmp_path):
    folder = clip_files.write_clip_folder(tmp_path / "clip", clip_files.CLIP_L_TEXT_CONFIG)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    ours = tok(TEXTS, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    theirs = open_clip.tokenize(TEXTS)  # OpenAI's BPE as open_clip ships it; pads with 0
    for a, b in zip(ours, theirs):
        n = int((b != 0).sum())
        assert a[:n].tolist() == b[:n].tolist()
        assert (a[n:] == tok.pad_token_id).all()
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and len(tok) == 49408


def test_build_is_deterministic_and_seeded():
    with quiet():
        a, b, c = build_tiny(0), build_tiny(0), build_tiny(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_does_not_touch_global_rng():
    state = torch.random.get_rng_state()
    with quiet():
        build_tiny(3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_zero_initialised_paths_are_randomised(tiny_model):
    unet = tiny_model.model.diffusion_model
    for name, module in unet.named_modules():
        if name.endswith("proj_out") or name.endswith("out_layers.3") or name == "out.2":
            assert module.weight.abs().sum() > 0, name


def test_text_encoder_output_mean_is_not_near_zero(tiny_adapter):
    with torch.no_grad():
        z = tiny_adapter.encode_captions(["a red circle", ""])
    assert z.shape == (2, 77, 64)
    assert abs(float(z.mean())) > 0.1
    assert torch.isfinite(z).all()


def test_checkpoint_round_trip(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "tiny.safetensors")
    assert path.with_suffix(".yaml").is_file() and (tmp_path / "tiny.clip" / "vocab.json").is_file()
    assert str((tmp_path / "tiny.clip").resolve()) in path.with_suffix(".yaml").read_text()
    with quiet():
        loaded = load_checkpoint(path)
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="bad.safetensors"):
        with quiet():
            load_checkpoint(bad)


def test_adapter_contract(tiny_adapter, tiny_model):
    assert tiny_adapter.prediction_type == "epsilon"
    assert tiny_adapter.info.base_model_version == "sd_v1"
    assert torch.equal(tiny_adapter.alphas_cumprod, tiny_model.alphas_cumprod.float())
    # the host may override alphas_cumprod; training must use the original schedule
    tiny_model.alphas_cumprod_original = tiny_model.alphas_cumprod.clone()
    try:
        tiny_model.alphas_cumprod = torch.ones_like(tiny_model.alphas_cumprod)
        assert torch.equal(tiny_adapter.alphas_cumprod, tiny_model.alphas_cumprod_original)
    finally:
        tiny_model.alphas_cumprod = tiny_model.alphas_cumprod_original
        del tiny_model.alphas_cumprod_original
    g = torch.Generator().manual_seed(0)
    lat = tiny_adapter.encode_images(torch.zeros(1, 3, 64, 64), g)
    assert lat.shape == (1, 4, 8, 8)
    out = tiny_adapter.predict(lat, torch.tensor([10]), tiny_adapter.encode_captions(["x"]))
    assert out.shape == lat.shape


def test_encode_images_uses_own_generator(tiny_adapter):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    state = torch.random.get_rng_state()
    a = tiny_adapter.encode_images(x, torch.Generator().manual_seed(5))
    b = tiny_adapter.encode_images(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(state, torch.random.get_rng_state())


def test_frozen_restores_flags_and_modes(tiny_adapter, tiny_model):
    before = snapshot(tiny_model)
    tiny_model.model.diffusion_model.input_blocks[1].train()
    tiny_model.model.diffusion_model.out[2].weight.requires_grad_(True)
    changed = snapshot(tiny_model)
    with tiny_adapter.frozen():
        assert not any(p.requires_grad for p in tiny_model.parameters())
    assert_same_as(tiny_model, changed)
    tiny_model.model.diffusion_model.input_blocks[1].eval()
    tiny_model.model.diffusion_model.out[2].weight.requires_grad_(before["grad"]["model.diffusion_model.out.2.weight"])
    assert_same_as(tiny_model, before)
