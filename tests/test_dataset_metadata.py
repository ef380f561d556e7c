"""sd-scripts' fine-tuning datasets (in_json + dataset_repeats, a dataset TOML's metadata_file) and
resize_interpolation. Expected captions follow sd-scripts' FineTuningDataset: the entry's caption, then
caption_separator (default ","), then its tags; expected pixels come from Pillow itself."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from lora_train.cli import main
from lora_train.dataset.cache import CacheKey
from lora_train.dataset.loader import TrainingData
from lora_train.dataset.plan import make_plan
from lora_train.dataset.scan import scan
from lora_train.dataset.source import spec_from_config
from lora_train.dataset.spec import load_dataset_toml
from lora_train.errors import UserError
from lora_train.train.config import DatasetConfig, TrainConfig

EXPECTED = {  # image file -> caption, by sd-scripts' rule
    "a.png": "a red square,zkz, red",  # caption + "," + tags
    "b.jpg": "zkz, blue",  # tags only
    "c.png": "from the json",  # its c.txt is not read
    "d.png": "",  # no caption or tags: trains with an empty caption, and says so
}


def _image(path: Path, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def ft(tmp_path):
    """A fine-tuning folder: images directly in it, captions in a metadata JSON as merge_*_to_metadata.py write it."""
    images = tmp_path / "images"
    _image(images / "a.png", (96, 64), (200, 20, 20))
    _image(images / "b.jpg", (64, 64), (20, 20, 200))
    _image(images / "c.png", (64, 64), (20, 200, 20))
    _image(images / "d.png", (64, 64), (90, 90, 90))
    _image(images / "unlisted.png", (64, 64), (0, 0, 0))  # not in the JSON: not trained
    (images / "c.txt").write_text("WRONG from the txt", encoding="utf-8")
    meta = {
        "a": {"caption": "a red square", "tags": "zkz, red", "train_resolution": [64, 128]},  # key without extension
        str(images / "b.jpg"): {"tags": "zkz, blue"},  # a full path (--full_path)
        "c": {"caption": "from the json"},
        "d": {},
        "missing": {"caption": "no such image"},
        "e": "not an object",
    }
    path = tmp_path / "meta_cap.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return images, path


def _plan(d: DatasetConfig):
    spec, problems = spec_from_config(d, 1, 64)
    s = scan(spec, problems)
    return s, make_plan(s, spec, batch_size=1, max_train_epochs=1)


def test_in_json_trains_with_the_json_captions_and_dataset_repeats(ft):
    images, meta = ft
    s, plan = _plan(DatasetConfig(train_data_dir=str(images), in_json=str(meta), dataset_repeats=3, resolution="64"))
    captions = {i.path.name: i.caption for i in plan.items}
    assert captions == EXPECTED
    assert {plan.repeats_of[id(i)] for i in plan.items} == {3}
    assert plan.train_samples == 4 * 3 and plan.steps_per_epoch == 12
    # the trainer is handed the same captions
    data = TrainingData(plan, seed=1)
    for item in plan.items:
        assert data.load([item], 1, random.Random(0)).captions == [EXPECTED[item.path.name]]
    # one line per bad entry, naming the file and the key
    lines = [str(p) for p in s.problems]
    assert any(line.startswith(str(meta)) and "'missing'" in line and "no such image" in line for line in lines)
    assert any(line.startswith(str(meta)) and "'e'" in line and "not used" in line for line in lines)
    assert any(line.startswith(str(meta)) and "'d'" in line and "empty caption" in line for line in lines)
    # sd-scripts buckets by the metadata's size: without buckets, 64x128 covers 64x64 at scale 1
    a = next(i for i in plan.items if i.path.name == "a.png")
    assert plan.assignment(a).resized == (64, 128)  # the image's own 96x64 would give (96, 64)
    assert any("'a'" in str(n) and "stretched" in str(n) for n in s.notes)
    # the subset is named by its metadata file, as in sd-scripts' ss_dataset_dirs
    assert s.dataset_dirs() == {"meta_cap.json": {"n_repeats": 3, "img_count": 4}}


def test_in_json_from_a_config_file_and_its_notes(ft, tmp_path):
    images, meta = ft
    config = TrainConfig().update({"train_data_dir": str(images), "in_json": str(meta), "dataset_repeats": 2}, source="a.toml")
    assert config.dataset.in_json == str(meta) and config.dataset.dataset_repeats == 2 and config.notes == []
    with pytest.raises(UserError, match="dataset_repeats must be at least 1"):
        spec_from_config(DatasetConfig(train_data_dir=str(images), in_json=str(meta), dataset_repeats=0), 1, 64)


def test_wildcard_tags_follow_every_caption_line(tmp_path):
    _image(tmp_path / "i" / "x.png", (64, 64), (1, 2, 3))
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"x": {"caption": "one\ntwo", "tags": "t1\nt2"}}), encoding="utf-8")
    _, plan = _plan(DatasetConfig(train_data_dir=str(tmp_path / "i"), in_json=str(meta), enable_wildcard=True))
    assert plan.items[0].caption == "one,t1,t2\ntwo,t1,t2"


@pytest.mark.parametrize("text,needle", [
    ('{"a": {"caption": "x",}', "not valid JSON (line 1"),
    ('["a"]', "must be a JSON object"),
    (None, "metadata file does not exist"),
])
def test_a_broken_metadata_file_is_one_line(tmp_path, text, needle):
    _image(tmp_path / "i" / "a.png", (64, 64), (1, 2, 3))
    meta = tmp_path / "m.json"
    if text is not None:
        meta.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        _plan(DatasetConfig(train_data_dir=str(tmp_path / "i"), in_json=str(meta)))
    lines = [line for line in str(e.value).splitlines() if needle in line]
    assert len(lines) == 1 and lines[0].strip().startswith(str(meta)), str(e.value)


def _toml(tmp_path, images, meta) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(f'[general]\nresolution = 64\n\n[[datasets]]\n\n  [[datasets.subsets]]\n  image_dir = "{images.name}"\n'
                    f'  metadata_file = "{meta.name}"\n  num_repeats = 2\n', encoding="utf-8")
    return path


def test_dataset_toml_metadata_file_in_dataset_check(ft, tmp_path):
    images, meta = ft
    toml = _toml(tmp_path, images, meta)
    spec = load_dataset_toml(toml)
    assert spec.subsets[0].metadata_file == str(meta)  # relative to the TOML, like image_dir
    r = subprocess.run([sys.executable, "-m", "lora_train", "dataset", "check", str(toml), "--json", "--no-duplicates"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert {Path(i["path"]).name: (i["caption"], i["repeats"]) for i in report["items"]} == {k: (v, 2) for k, v in EXPECTED.items()}
    assert report["train_samples"] == 8
    assert any("'missing'" in p["reason"] and p["path"] == str(meta) for p in report["problems"])
    # sd-scripts: dataset_repeats is num_repeats where the TOML sets none; in_json is not read beside a TOML
    toml.write_text(toml.read_text(encoding="utf-8").replace("num_repeats = 2", ""), encoding="utf-8")
    spec, problems = spec_from_config(DatasetConfig(dataset_config=str(toml), dataset_repeats=4, in_json=str(meta)), 1, 64)
    assert spec.subsets[0].num_repeats == 4
    assert [(p, r) for p, r in problems] == [(meta, "in_json is not read with dataset_config (as in sd-scripts): set metadata_file in its subsets")]
    text = subprocess.run([sys.executable, "-m", "lora_train", "dataset", "check", str(toml), "--no-duplicates"],
                          capture_output=True, text=True)
    assert text.returncode == 0 and f"{meta}: 'missing': no such image in {images}" in text.stdout


def test_dataset_check_of_a_folder_with_in_json(ft):
    images, meta = ft
    r = subprocess.run([sys.executable, "-m", "lora_train", "dataset", "check", str(images), "--in-json", str(meta),
                        "--dataset-repeats", "5", "--json", "--no-duplicates"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert {Path(i["path"]).name: (i["caption"], i["repeats"]) for i in report["items"]} == {k: (v, 5) for k, v in EXPECTED.items()}


def test_a_run_trains_from_in_json(ft, tmp_path):
    images, meta = ft
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'pretrained_model_name_or_path = "builtin:tiny"\ntrain_data_dir = "{images.as_posix()}"\n'
                   f'in_json = "{meta.as_posix()}"\ndataset_repeats = 2\noutput_dir = "{(tmp_path / "out").as_posix()}"\n'
                   f'output_name = "ft"\nresolution = "64"\nmax_train_steps = 2\nseed = 1\nnetwork_dim = 2\n', encoding="utf-8")
    assert main(["train", "--config", str(cfg)]) == 0
    with safe_open(str(tmp_path / "out" / "ft.safetensors"), "pt") as f:
        m = f.metadata()
    # sd-scripts' metadata for a fine-tuning subset: named by the JSON, tags counted from its captions
    assert json.loads(m["ss_dataset_dirs"]) == {"meta_cap.json": {"n_repeats": 2, "img_count": 4}}
    assert m["ss_num_train_images"] == "8"
    freq = json.loads(m["ss_tag_frequency"])["meta_cap.json"]
    assert freq["zkz"] == 2 and freq["from the json"] == 1 and "WRONG from the txt" not in freq


# --- resize_interpolation -------------------------------------------------------------------------


@pytest.fixture
def noisy(tmp_path):
    folder = tmp_path / "1_noise"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "n.png")
    return tmp_path, folder / "n.png"


def _pixels(root, interpolation):
    d = DatasetConfig(train_data_dir=str(root), resolution="64", resize_interpolation=interpolation)
    _, plan = _plan(d)
    return TrainingData(plan, seed=1).load(plan.items, 1, random.Random(0)).pixels[0]


@pytest.mark.parametrize("name,pil", [("nearest", Image.NEAREST), ("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC),
                                      ("lanczos", Image.LANCZOS), ("box", Image.BOX)])
def test_resize_interpolation_is_pillows_filter(noisy, name, pil):
    root, image = noisy
    # 97x61 at 64x64 without buckets: scale 64/61 -> 102x64, centre crop from x = (102 - 64) // 2 = 19
    expected = np.asarray(Image.open(image).convert("RGB").resize((102, 64), pil).crop((19, 0, 83, 64)), dtype=np.float32) / 127.5 - 1
    got = _pixels(root, name).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_resize_interpolation_changes_the_pixels_and_the_cache_key(noisy):
    root, image = noisy
    assert not np.allclose(_pixels(root, "nearest").numpy(), _pixels(root, "bilinear").numpy())
    key = (image, (64, 64), (102, 64), (19, 0, 83, 64), False)
    assert CacheKey(*key).digest("sha", "vae") != CacheKey(*key, "nearest").digest("sha", "vae")


def test_resize_interpolation_as_a_key(tmp_path):
    config = TrainConfig().update({"resize_interpolation": "area"}, source="a.toml")
    assert config.dataset.resize_interpolation == "area" and config.notes == []
    toml = tmp_path / "d.toml"
    toml.write_text('[[datasets]]\nresize_interpolation = "cubic"\n[[datasets.subsets]]\nimage_dir = "x"\n', encoding="utf-8")
    assert load_dataset_toml(toml).subsets[0].resize_interpolation == "cubic"  # a dataset's key reaches its subsets
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nresize_interpolation = "sinc"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"subset #1: resize_interpolation 'sinc' is not one of lanczos, nearest"):
        load_dataset_toml(toml)
    with pytest.raises(UserError, match="resize_interpolation 'sinc'"):
        spec_from_config(DatasetConfig(train_data_dir=str(tmp_path), resize_interpolation="sinc"), 1, 64)
