"""BLIP captions on a tiny BLIP built here (random weights, a 23-word vocab): lengths, batching,
prompts, transparency, progress and cancel, loading errors, and where models are looked for and
downloaded to (the hub is the only thing faked)."""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

from lora_train.errors import UserError
from lora_train.tagging.blip import DEFAULT_MODEL, MODELS, BlipCaptioner, Cancelled, resolve_model

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("a an the of in on with photography picture cat dog red blue green small big sitting standing "
         "table grass sky tree house").split()
SEP = SPECIAL.index("[SEP]")


def _build(folder: Path, *, sep_bias: float) -> Path:
    """A tiny BlipForConditionalGeneration + BlipProcessor saved with save_pretrained.

    The ids are laid out like Salesforce's: the BERT tokenizer's vocab, then bos ([DEC]) and [ENC]
    past its end, so the tokenizer drops bos when decoding. Only whole words can be generated (the
    other ids get a -1e4 bias), so a caption re-tokenizes to exactly the tokens generated, and the
    [SEP] (end) bias decides whether the model ends as soon as min_length allows or never."""
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    n = len(SPECIAL) + len(WORDS)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.2)
    config = BlipConfig(
        # the vision default initializer_range (1e-10) would make every image look the same
        vision_config=dict(image_size=32, patch_size=8, **small),
        text_config=dict(vocab_size=n + 2, max_position_embeddings=128, bos_token_id=n, pad_token_id=0,
                         sep_token_id=SEP, eos_token_id=SEP, **small),
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        bias[[i for i in range(n + 2) if i < len(SPECIAL) or i >= n]] = -1e4
        bias[SEP] = sep_bias
    model.save_pretrained(folder)
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"))
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip")
    return {"eager": _build(root / "eager", sep_bias=6.0), "endless": _build(root / "endless", sep_bias=-1e4)}


@pytest.fixture(scope="module")
def eager(models):
    return BlipCaptioner(models["eager"])


@pytest.fixture(scope="module")
def endless(models):
    return BlipCaptioner(models["endless"])


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (24 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(5)]


def _tokens(captioner: BlipCaptioner, caption: str) -> int:
    return len(captioner.processor.tokenizer(caption, add_special_tokens=False).input_ids)


def test_one_caption_per_image_deterministic(models, eager, images):
    captions = eager.caption(images, min_length=6)
    assert len(captions) == len(images) and all(isinstance(c, str) and c for c in captions)
    assert len(set(captions)) > 1, "every image got the same caption: the image does not reach the decoder"
    assert eager.caption(images, min_length=6) == captions
    assert BlipCaptioner(models["eager"]).caption(images, min_length=6) == captions
    assert eager.caption([]) == []


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batching_does_not_change_captions(endless, images, num_beams):
    one_by_one = endless.caption(images, num_beams=num_beams, max_length=10, batch_size=1)
    assert endless.caption(images, num_beams=num_beams, max_length=10, batch_size=3) == one_by_one
    assert endless.caption(images, num_beams=num_beams, max_length=10, batch_size=5) == one_by_one
    assert len(set(one_by_one)) > 1


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("min_length", [0, 1, 2, 5, 9])
def test_min_length_counts_the_bos_token(eager, images, num_beams, min_length):
    """The sequence starts as [bos] (generate drops the [SEP] after it) and min_length bans the end
    token while the sequence is shorter than min_length, so the end comes at index min_length at the
    earliest: at least min_length - 1 words. This model ends as soon as it may: exactly that many."""
    captions = eager.caption(images, num_beams=num_beams, min_length=min_length, max_length=20)
    assert [_tokens(eager, c) for c in captions] == [max(min_length - 1, 0)] * len(images)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("max_length", [2, 7, 30])
def test_max_length_counts_the_bos_token(endless, images, num_beams, max_length):
    """A model that never ends stops at max_length tokens, bos included. (max_length 1 is refused:
    generate() would still add a token after bos.)"""
    captions = endless.caption(images[:2], num_beams=num_beams, min_length=0, max_length=max_length)
    assert [_tokens(endless, c) for c in captions] == [max_length - 1] * 2


def test_prompt_is_counted_and_removed(eager, images):
    """A prompt sits between bos and the caption and counts towards the lengths, as in BLIP's own
    code; the model echoes it (lower-cased by the tokenizer) and the echo is cut off."""
    plain = eager.caption(images, min_length=8)
    prompted = eager.caption(images, min_length=8, prompt="A photography of")
    assert [_tokens(eager, c) for c in plain] == [7] * len(images)
    assert [_tokens(eager, c) for c in prompted] == [7 - 3] * len(images)


def test_transparent_pixels_are_white(eager):
    white = Image.new("RGB", (32, 32), "white")
    black = Image.new("RGB", (32, 32), "black")
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    clear_gray = Image.new("LA", (32, 32), (0, 0))
    half = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    half.paste((0, 0, 0, 0), (0, 0, 32, 16))
    half_ref = Image.new("RGB", (32, 32), "black")
    half_ref.paste((255, 255, 255), (0, 0, 32, 16))
    on_white, on_black, c_clear, c_gray, c_half, c_half_ref = eager.caption(
        [white, black, clear, clear_gray, half, half_ref], min_length=6)
    assert on_white != on_black, "the model cannot tell black from white: this test would prove nothing"
    assert c_clear == c_gray == on_white
    assert c_half == c_half_ref


def test_progress_per_batch_and_cancel_between_batches(eager, images):
    calls = []
    asked = []
    eager.caption(images, batch_size=2, progress=lambda done, total: calls.append((done, total)),
                  cancel=lambda: asked.append(1) and False)
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert len(asked) == 2  # between the three batches, not before the first or after the last

    calls.clear()
    with pytest.raises(Cancelled, match="after 2 of 5"):
        eager.caption(images, batch_size=2, progress=lambda done, total: calls.append((done, total)), cancel=lambda: True)
    assert calls == [(2, 5)]


@pytest.mark.parametrize("kwargs, message", [
    ({"min_length": 10, "max_length": 9}, "min_length"),
    ({"min_length": -1}, "min_length"),
    ({"min_length": 0, "max_length": 1}, "no room for a caption after the start token$"),
    ({"min_length": 0, "max_length": 4, "prompt": "a photography of"}, "no room .* the prompt's 3 tokens"),
    ({"num_beams": 0}, "num_beams"),
    ({"batch_size": 0}, "batch size"),
])
def test_bad_arguments(eager, images, kwargs, message):
    with pytest.raises(UserError, match=message):
        eager.caption(images, **kwargs)


def test_unload(models, images):
    captioner = BlipCaptioner(models["eager"])
    captioner.unload()
    assert captioner.model is None and captioner.processor is None
    with pytest.raises(RuntimeError, match="unloaded"):
        captioner.caption(images)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no config.json"),
    ("other model", "'bert' model, not 'blip'"),
    ("no weights", "cannot load"),
])
def test_bad_model_folder(models, tmp_path, case, message):
    folder = tmp_path / "model"
    if case != "missing":
        folder.mkdir()
    if case == "other model":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    if case == "no weights":
        for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.txt"):
            shutil.copy(models["eager"] / name, folder / name)
    with pytest.raises(UserError, match=message) as e:
        BlipCaptioner(folder)
    assert str(folder) in str(e.value)


# -- resolve_model -----------------------------------------------------------------------------------
def _fake_hub(monkeypatch, repo: Path | None, *, failing_call: int | None = None) -> list:
    """snapshot_download serving `repo`'s files (honouring allow_patterns); without a repo, or from
    call number `failing_call` on, it fails like a lost connection."""
    calls = []

    def snapshot_download(repo_id, *, local_dir, allow_patterns=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns or ())))
        if repo is None or (failing_call is not None and len(calls) >= failing_call):
            raise OSError("no route to huggingface.co")
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for f in repo.iterdir():
            if allow_patterns is None or any(fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, Path(local_dir) / f.name)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_known_models():
    assert DEFAULT_MODEL == "Salesforce/blip-image-captioning-large"
    assert "Salesforce/blip-image-captioning-base" in MODELS


def test_resolve_local_folder_as_is(models, tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch, None)
    assert resolve_model(models["eager"], tmp_path) == models["eager"]
    assert resolve_model(str(models["eager"]), tmp_path) == models["eager"]
    assert calls == []


def test_resolve_known_model_already_downloaded(models, tmp_path, monkeypatch, images):
    calls = _fake_hub(monkeypatch, None)
    shutil.copytree(models["eager"], tmp_path / "blip-image-captioning-base")
    folder = resolve_model("Salesforce/blip-image-captioning-base", tmp_path)
    assert folder == tmp_path / "blip-image-captioning-base"
    assert calls == []
    assert len(BlipCaptioner(folder).caption(images[:1])) == 1


def test_resolve_refused_download(tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch, None)
    with pytest.raises(UserError, match="blip-image-captioning-large.*refused") as e:
        resolve_model(DEFAULT_MODEL, tmp_path / "models", allow_download=False)
    assert str(tmp_path / "models") in str(e.value)
    assert calls == [] and not (tmp_path / "models").exists()


def test_resolve_keeps_a_foreign_folder_of_that_name(tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch, None)
    (tmp_path / "blip-image-captioning-large").mkdir()
    (tmp_path / "blip-image-captioning-large" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="no config.json.*move it away"):
        resolve_model(DEFAULT_MODEL, tmp_path)
    assert calls == [] and (tmp_path / "blip-image-captioning-large" / "notes.txt").read_text() == "mine"


def test_resolve_unknown_name(tmp_path):
    with pytest.raises(UserError, match="did you mean 'Salesforce/blip-image-captioning-base'"):
        resolve_model("Salesforce/blip-image-captioning-bse", tmp_path)


@pytest.mark.parametrize("safetensors", [True, False])
def test_resolve_downloads_into_models_dir(models, eager, images, tmp_path, monkeypatch, safetensors):
    """The hub repos also hold TF weights and sometimes both .bin and .safetensors: one copy is fetched."""
    repo = tmp_path / "hub"
    shutil.copytree(models["eager"], repo)
    if safetensors:
        from transformers import BlipForConditionalGeneration

        BlipForConditionalGeneration.from_pretrained(repo).save_pretrained(tmp_path / "st", safe_serialization=True)
        shutil.copy(tmp_path / "st" / "model.safetensors", repo)
    (repo / "tf_model.h5").write_bytes(b"not wanted")
    calls = _fake_hub(monkeypatch, repo)

    models_dir = tmp_path / "models"
    folder = resolve_model(DEFAULT_MODEL, models_dir)

    assert folder == models_dir / "blip-image-captioning-large"
    assert sorted(p.name for p in models_dir.iterdir()) == ["blip-image-captioning-large"]  # no partial left
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors", ".h5"))
    assert weights == (["model.safetensors"] if safetensors else ["pytorch_model.bin"])
    assert [c[0] for c in calls] == [DEFAULT_MODEL] * (1 if safetensors else 2)
    assert BlipCaptioner(folder).caption(images, min_length=6) == eager.caption(images, min_length=6)
    assert resolve_model(DEFAULT_MODEL, models_dir) == folder and len(calls) == (1 if safetensors else 2)


def test_resolve_failed_download(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, None)
    with pytest.raises(UserError, match="downloading the BLIP model Salesforce/blip-image-captioning-large.*no route"):
        resolve_model(DEFAULT_MODEL, tmp_path)
    assert not (tmp_path / "blip-image-captioning-large").exists()


def test_resolve_interrupted_download_is_not_taken_for_a_model(models, tmp_path, monkeypatch):
    """The config arrives, then the connection drops before the weights: the next resolve downloads
    again instead of returning a folder that cannot load."""
    _fake_hub(monkeypatch, models["eager"], failing_call=2)  # the tiny model has only a .bin
    with pytest.raises(UserError, match="no route"):
        resolve_model(DEFAULT_MODEL, tmp_path)
    assert not (tmp_path / "blip-image-captioning-large").exists()

    calls = _fake_hub(monkeypatch, models["eager"])
    folder = resolve_model(DEFAULT_MODEL, tmp_path)
    assert len(calls) == 2 and (folder / "pytorch_model.bin").is_file()
