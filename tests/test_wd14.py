"""WD14 tagging through onnxruntime on a tiny tagger the tests write (tests/tiny_tagger.py): the
preprocessing, thresholds per category, rating, undesired tags, kaomoji, escaping, order, batching,
model folders and downloads, each against hand-computed expectations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_tagger as tt
from lora_train.errors import UserError
from lora_train.tagging import wd14
from lora_train.tagging.wd14 import TagOptions, WD14Tagger, preprocess


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> WD14Tagger:
    return WD14Tagger(tt.build(tmp_path_factory.mktemp("tagger") / "tiny"))


RED = Image.new("RGB", (40, 40), (255, 0, 0))
BLACK = Image.new("RGB", (40, 40), (0, 0, 0))


def test_preprocess_pads_white_flattens_alpha_onto_white_and_gives_bgr_floats():
    wide = Image.new("RGBA", (64, 32), (255, 0, 0, 255))
    wide.paste((0, 0, 255, 0), (0, 0, 8, 32))  # a fully transparent strip on the left
    x = preprocess(wide, 64)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    assert x[0, 32].tolist() == [255, 255, 255] and x[63, 32].tolist() == [255, 255, 255]  # padding top and bottom
    assert x[32, 32].tolist() == [0, 0, 255]  # red, in BGR order
    assert x[32, 2].tolist() == [255, 255, 255]  # transparent -> white, not the hidden blue
    assert x[16:48, 40].tolist() == [[0, 0, 255]] * 32 and x[15, 40].tolist() == [255, 255, 255]  # centred: 16 rows above
    small = preprocess(Image.new("L", (8, 8), 100), 32)
    assert small.shape == (32, 32, 3) and np.allclose(small, 100)  # grey -> RGB, upscaled
    big = preprocess(Image.new("RGB", (300, 300), (10, 20, 30)), 32)
    assert np.allclose(big[5, 5], [30, 20, 10])


def test_thresholds_per_category_and_order(tagger):
    (black,) = tagger.tag([BLACK])
    names = [n for n, _ in black]
    # character first (0.86 >= 0.85; rin 0.80 is not), then general by confidence: 0.40, 0.36; 0.34 < 0.35
    assert names == ["hatsune miku", "long hair", "^_^"]
    assert dict(black)["long hair"] == pytest.approx(0.40, abs=1e-4)
    (red,) = tagger.tag([RED])
    assert [n for n, _ in red] == ["hatsune miku", "red theme", "long hair", "^_^"]
    lower = tagger.tag([BLACK], TagOptions(general_threshold=0.34, character_threshold=0.80))[0]
    assert [n for n, _ in lower] == ["hatsune miku", "kagamine rin", "long hair", "^_^", "pokemon (creature)"]
    score = float(tagger.predict([BLACK])[0][5])  # ^_^
    assert [n for n, _ in tagger.tag([BLACK], TagOptions(general_threshold=score))[0]][-1] == "^_^"  # kohya keeps p >= threshold
    assert "^_^" not in [n for n, _ in tagger.tag([BLACK], TagOptions(general_threshold=np.nextafter(score, 1, dtype=np.float32)))[0]]
    strict = tagger.tag([BLACK], TagOptions(general_threshold=0.99, character_threshold=0.99))[0]
    assert strict == []


def test_rating_undesired_kaomoji_escaping_and_max(tagger):
    rated = tagger.tag([BLACK], TagOptions(include_rating=True))[0]
    assert [n for n, _ in rated][:2] == ["general", "hatsune miku"]  # only the top rating, first
    unwanted = tagger.tag([BLACK], TagOptions(undesired=("long_hair", "Hatsune Miku")))[0]
    assert [n for n, _ in unwanted] == ["^_^"]
    raw = tagger.tag([BLACK], TagOptions(replace_underscores=False, general_threshold=0.3))[0]
    assert [n for n, _ in raw] == ["hatsune_miku", "long_hair", "^_^", "pokemon_(creature)"]
    spaced = tagger.tag([BLACK], TagOptions(general_threshold=0.3, escape_brackets=True))[0]
    assert [n for n, _ in spaced] == ["hatsune miku", "long hair", "^_^", "pokemon \\(creature\\)"]  # kaomoji keeps "_"
    assert len(tagger.tag([BLACK], TagOptions(max_tags=2))[0]) == 2


def test_batches_and_a_fixed_batch_of_one_give_the_same_scores(tmp_path, tagger):
    images = [RED, BLACK, Image.new("RGB", (20, 32), (0, 0, 255)), BLACK, RED]
    one = WD14Tagger(tt.build(tmp_path / "fixed", batch=1))
    assert one.batch_size == 1
    assert np.allclose(one.predict(images), tagger.predict(images), atol=1e-6)
    # the blue image is padded with white to the model's 32 px: means over the square are known
    blue = tagger.predict([images[2]])[0]
    pad = 1 - 20 / 32
    assert np.allclose(blue, tt.expected_probs((255, 255 * pad, 255 * pad)), atol=1e-4)


def test_progress_and_cancel_between_batches(tagger):
    seen = []
    tagger.predict([BLACK] * 9, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(4, 9), (8, 9), (9, 9)]
    seen.clear()
    with pytest.raises(wd14.Cancelled, match="after 4 of 9"):
        tagger.predict([BLACK] * 9, progress=lambda d, n: seen.append((d, n)), cancel=lambda: bool(seen))


def test_model_folders_names_and_downloads(tmp_path, monkeypatch):
    local = tt.build(tmp_path / "mine")
    assert wd14.resolve_model(str(local), tmp_path / "models") == local
    named = tt.build(tmp_path / "models" / "wd-v1-4-moat-tagger-v2")
    assert wd14.resolve_model("wd-v1-4-moat-tagger-v2", tmp_path / "models") == named
    assert WD14Tagger(named).thresholds(TagOptions()) == (0.3771, 0.85)  # the model card's default
    assert WD14Tagger(local).thresholds(TagOptions(general_threshold=0.5)) == (0.5, 0.85)
    with pytest.raises(UserError, match="wd-vit-tagger-v3 is not in .*downloading is refused"):
        wd14.resolve_model("wd-vit-tagger-v3", tmp_path / "models", allow_download=False)
    with pytest.raises(UserError, match="not a known model.*did you mean 'wd-vit-tagger-v3'.*known: "):
        wd14.resolve_model("wd-vit-tager-v3", tmp_path / "models")
    (local / "selected_tags.csv").unlink()
    with pytest.raises(UserError, match="must hold model.onnx and selected_tags.csv; missing selected_tags.csv"):
        wd14.resolve_model(str(local), tmp_path / "models")

    calls = []

    def fake_download(repo_id, filename, local_dir):
        calls.append((repo_id, filename, local_dir))
        tt.build(Path(local_dir))
        return str(Path(local_dir) / filename)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    folder = wd14.resolve_model("wd-swinv2-tagger-v3", tmp_path / "models")
    assert folder == tmp_path / "models" / "wd-swinv2-tagger-v3"
    assert calls == [("SmilingWolf/wd-swinv2-tagger-v3", f, str(folder)) for f in ("model.onnx", "selected_tags.csv")]

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match="could not download SmilingWolf/wd-eva02-large-tagger-v3.*no network"):
        wd14.resolve_model("wd-eva02-large-tagger-v3", tmp_path / "models")


def test_bad_csv_and_bad_model_are_named(tmp_path):
    folder = tt.build(tmp_path / "t")
    (folder / "selected_tags.csv").write_text("id,tag\n0,x\n", encoding="utf-8")
    with pytest.raises(UserError, match="selected_tags.csv: line 1 must be the header"):
        WD14Tagger(folder)
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,x,notanumber,1\n", encoding="utf-8")
    with pytest.raises(UserError, match="selected_tags.csv, line 2"):
        WD14Tagger(folder)
    tt.build(folder)
    (folder / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="model.onnx: onnxruntime cannot load it"):
        WD14Tagger(folder)
    tt.build(folder)
    with open(folder / "selected_tags.csv", "a", encoding="utf-8") as f:
        f.write("99,extra,0,1\n")
    with pytest.raises(UserError, match="gives 11 scores but selected_tags.csv lists 12 tags"):
        WD14Tagger(folder)


def test_gpu_provider_warning():
    assert wd14.gpu_provider_warning(["CPUExecutionProvider"], cuda_available=False) is None
    assert wd14.gpu_provider_warning(["CUDAExecutionProvider", "CPUExecutionProvider"], cuda_available=True) is None
    warning = wd14.gpu_provider_warning(["AzureExecutionProvider", "CPUExecutionProvider"], cuda_available=True)
    assert "runs on the CPU" in warning and "onnxruntime-gpu" in warning


def test_autotag_cli_with_the_tiny_tagger(tmp_path, capsys):
    from lora_train.cli import main

    model = tt.build(tmp_path / "tagger")
    folder = tmp_path / "data" / "5_x"
    folder.mkdir(parents=True)
    RED.save(folder / "a.png")
    BLACK.save(folder / "b.png")
    (folder / "b.txt").write_text("zkz, mine", encoding="utf-8")
    assert main(["autotag", str(tmp_path / "data"), "--model", str(model), "--undesired", "long_hair"]) == 0
    assert (folder / "a.txt").read_text(encoding="utf-8") == "hatsune miku, red theme, ^_^"
    assert (folder / "b.txt").read_text(encoding="utf-8") == "zkz, mine"  # prefill: captioned images keep theirs
    assert main(["autotag", str(tmp_path / "data"), "--model", str(model), "--mode", "prepend", "--general-threshold", "0.9"]) == 0
    assert (folder / "b.txt").read_text(encoding="utf-8") == "hatsune miku, zkz, mine"
    assert main(["tags", str(tmp_path / "data"), "--undo"]) == 0 and main(["tags", str(tmp_path / "data"), "--undo"]) == 0
    assert not (folder / "a.txt").exists() and (folder / "b.txt").read_text(encoding="utf-8") == "zkz, mine"
    assert main(["autotag", str(tmp_path / "data"), "--model", "no-such-tagger"]) == 2
    assert "not a known model" in capsys.readouterr().err
