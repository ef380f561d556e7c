"""Scanning messy folders, the step maths, and the dataset CLI."""

import json
import random
import struct
import subprocess
import sys
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_train.dataset.loader import TrainingData
from lora_train.dataset.plan import balance_reg_repeats, make_plan
from lora_train.dataset.scan import scan
from lora_train.dataset.source import spec_from_config
from lora_train.dataset.spec import load_dataset_toml, save_dataset_toml
from lora_train.errors import UserError
from lora_train.train.config import DatasetConfig


def png_bytes(w, h, color=(200, 30, 30), mode="RGB"):
    buf = BytesIO()
    Image.new(mode, (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def save(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def huge_png_header(w, h):
    """A PNG whose IHDR claims w x h (valid CRCs): a decompression bomb to a naive reader."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(w, h):
    im = Image.new("RGB", (w, h), (10, 120, 200))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90: displayed as h x w
    buf = BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path):
    """A folder with 13 kinds of bad input and several awkward but good ones."""
    root = tmp_path / "训练数据"
    good = root / "4_角色 zkz"
    bad = {}
    # good, awkward inputs
    save(good / "plain.png", png_bytes(96, 64))
    save(good / "alpha.png", png_bytes(64, 96, (0, 255, 0, 128), "RGBA"))
    save(good / "grey16.png", _png16(80, 80))
    buf = BytesIO(); Image.new("CMYK", (70, 70), (0, 128, 128, 0)).save(buf, "JPEG"); save(good / "cmyk.jpg", buf.getvalue())
    save(good / "rotated.jpg", exif_rotated_jpeg(128, 64))
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = BytesIO(); frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:]); save(good / "anim.gif", buf.getvalue())
    buf = BytesIO(); Image.new("RGB", (100, 64), (1, 2, 3)).save(buf, "WEBP"); save(good / "photo.webp", buf.getvalue())
    save(good / "嵌套" / "nested.bmp", _bmp(64, 64))
    (good / "plain.txt").write_bytes("zkz, 红色, hood (clothing)".encode("gbk"))
    (good / "alpha.txt").write_text("zkz, 绿色", encoding="utf-16")
    # bad inputs
    bad["empty.png"] = save(good / "empty.png", b"")
    bad["truncated.png"] = save(good / "truncated.png", png_bytes(64, 64)[:-20])
    jpg = BytesIO(); Image.new("RGB", (64, 64)).save(jpg, "JPEG")
    bad["truncated.jpg"] = save(good / "truncated.jpg", jpg.getvalue()[: len(jpg.getvalue()) // 2])
    webp = BytesIO(); Image.new("RGB", (64, 64), (9, 9, 9)).save(webp, "WEBP")
    bad["truncated.webp"] = save(good / "truncated.webp", webp.getvalue()[:-10])
    bad["notes.jpg"] = save(good / "notes.jpg", b"this is a text file with a .jpg name")
    bad["bomb.png"] = save(good / "bomb.png", huge_png_header(100_000, 100_000))
    bad["tiny.png"] = save(good / "tiny.png", png_bytes(20, 20))  # smaller than any bucket with no_upscale
    save(good / "badcaption.png", png_bytes(64, 64))
    bad["badcaption.txt"] = save(good / "badcaption.txt", bytes(range(0, 32)) * 4)
    (good / "repeats.toml").write_text('"plain.png" = 6\n"missing.png" = 2\n"cmyk.jpg" = -1\n', encoding="utf-8")
    bad["missing.png"] = good / "repeats.toml"
    bad["cmyk.jpg' repeats"] = good / "repeats.toml"
    bad["no prefix"] = save(root / "noprefix" / "a.png", png_bytes(64, 64)).parent
    bad["zero repeats"] = save(root / "0_zero" / "a.png", png_bytes(64, 64)).parent
    bad["empty folder"] = root / "3_empty"
    bad["empty folder"].mkdir()
    return root, bad


def _png16(w, h):
    buf = BytesIO()
    Image.fromarray((np.arange(w * h).reshape(h, w) * 9).astype(np.uint16), "I;16").save(buf, "PNG")
    return buf.getvalue()


def _bmp(w, h):
    buf = BytesIO()
    Image.new("RGB", (w, h), (5, 200, 5)).save(buf, "BMP")
    return buf.getvalue()


def dataset_config(root, **kw):
    values = dict(train_data_dir=str(root), resolution="128", enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256,
                  bucket_no_upscale=True)
    values.update(kw)
    return DatasetConfig(**values)


def test_messy_folder_reports_every_bad_file_and_trains_the_rest(messy, tiny_adapter):
    root, bad = messy
    spec, folder_problems = spec_from_config(dataset_config(root), 2, 128)
    s = scan(spec, folder_problems)
    plan = make_plan(s, spec, batch_size=2, max_train_epochs=1)
    problems = {(p.path.name, p.reason) for p in s.problems + plan.problems}
    text = "\n".join(f"{n}: {r}" for n, r in problems)
    expectations = {
        "empty.png": "empty file",
        "truncated.png": "truncated PNG",
        "truncated.jpg": "truncated JPEG",
        "truncated.webp": "truncated WebP",
        "notes.jpg": "not an image",
        "bomb.png": "too large",
        "tiny.png": "20x20 is too small or too narrow for bucket_no_upscale",
        "badcaption.txt": "class token is used instead",
        "repeats.toml": "'missing.png': no such image",
        "noprefix": "no repeats prefix",
        "0_zero": "repeats must be at least 1",
        "3_empty": "no images",
    }
    for name, reason in expectations.items():
        assert any(n == name and reason.lower() in r.lower() for n, r in problems), f"{name} / {reason!r} not in:\n{text}"
    assert "'cmyk.jpg': repeats must be a whole number" in text
    # every problem is one planted above, each named once per reason, and no good file is reported
    assert {n for n, _ in problems} == set(expectations), text
    trained = sorted(i.path.name for i in plan.items)
    assert trained == sorted(["plain.png", "alpha.png", "grey16.png", "cmyk.jpg", "rotated.jpg", "anim.gif", "photo.webp",
                              "nested.bmp", "badcaption.png"])
    by_name = {i.path.name: i for i in plan.items}
    assert by_name["rotated.jpg"].size == (64, 128)  # EXIF orientation applied
    assert plan.assignment(by_name["rotated.jpg"]).bucket == (64, 128)
    assert by_name["plain.png"].repeats == 6 and by_name["nested.bmp"].repeats == 4
    assert by_name["plain.png"].caption == "zkz, 红色, hood (clothing)" and by_name["plain.png"].caption_encoding == "gbk"
    assert by_name["alpha.png"].caption == "zkz, 绿色" and by_name["alpha.png"].caption_encoding.startswith("utf-16")
    assert by_name["badcaption.png"].caption == "角色 zkz"  # the folder's class token
    assert any("animated" in n.reason for n in s.notes)
    # every good image decodes into its bucket, and a real epoch runs
    data = TrainingData(plan, seed=0)
    seen = []
    for items in data.epoch_batches(1):
        batch = data.load(items, 1, random.Random(0))
        bucket = plan.assignment(items[0]).bucket
        assert batch.pixels.shape[1:] == (3, bucket[1], bucket[0])
        seen += [i.path.name for i in items]
    assert sorted(set(seen)) == trained
    assert len(seen) == plan.train_samples


def test_alpha_is_composited_on_white(messy):
    from lora_train.dataset.images import load_rgb

    root, _ = messy
    rgb, mask = load_rgb(root / "4_角色 zkz" / "alpha.png", keep_alpha=True)
    assert rgb.getpixel((0, 0)) == (127, 255, 127)
    assert mask.getpixel((0, 0)) == 128
    grey = np.asarray(load_rgb(root / "4_角色 zkz" / "grey16.png"))
    assert grey.max() > 200 and grey.min() < 5  # 16-bit scaled, not clipped to white


def test_mixed_steps_per_epoch_equal_sd_scripts(tmp_path):
    """Three buckets, repeats 3 and 2, a reg folder, batch size 3; expected values by sd-scripts' rules.

    resolution 128, buckets on a 64 grid from 64 to 256: 3:1 images go to 192x64, 1:3 to 64x192,
    squares to 128x128.
    Train samples: w0, w1 (3:1) x 3 + t0 (1:3) x 3 + s0, s1 (square) x 2 = 13.
    Reg (4 images, 1 repeat): registered once each (4), then +1 round-robin until 13 -> 4, 3, 3, 3.
    Buckets: 192x64 = 6 + r0 4 + r3 3 = 13; 64x192 = 3 + r1 3 = 6; 128x128 = 4 + r2 3 = 7.
    Steps per epoch = ceil(13/3) + ceil(6/3) + ceil(7/3) = 5 + 2 + 3 = 10.
    """
    root = tmp_path / "train"
    for n in range(2):
        save(root / "3_wide" / f"w{n}.png", png_bytes(300, 100))
    save(root / "3_wide" / "t0.png", png_bytes(100, 300))
    for n in range(2):
        save(root / "2_square" / f"s{n}.png", png_bytes(200, 200))
    reg = tmp_path / "reg"
    save(reg / "1_person" / "r0.png", png_bytes(600, 200))
    save(reg / "1_person" / "r1.png", png_bytes(200, 600))
    save(reg / "1_person" / "r2.png", png_bytes(300, 300))
    save(reg / "1_person" / "r3.png", png_bytes(330, 110))
    cfg = DatasetConfig(train_data_dir=str(root), reg_data_dir=str(reg), resolution="128", enable_bucket=True,
                        min_bucket_reso=64, max_bucket_reso=256)
    spec, problems = spec_from_config(cfg, 3, 128)
    plan = make_plan(scan(spec, problems), spec, batch_size=3, max_train_epochs=2)
    reps = {i.path.name: plan.repeats_of[id(i)] for i in plan.items}
    assert plan.train_samples == 13 and plan.reg_samples == 13
    assert [reps[f"r{k}.png"] for k in range(4)] == [4, 3, 3, 3]
    buckets = {tuple(b["resolution"]): b["count"] for b in plan.to_dict()["buckets"]}
    assert buckets == {(192, 64): 13, (64, 192): 6, (128, 128): 7}
    assert plan.steps_per_epoch == 10 and plan.total_steps == 20
    data = TrainingData(plan, seed=3)
    batches = data.epoch_batches(1)
    assert len(batches) == 10 and sum(len(b) for b in batches) == 26
    assert all(len({plan.assignment(i).bucket for i in b}) == 1 for b in batches)  # never mixes buckets


def test_balance_reg_repeats_stops_early_when_reg_outnumbers():
    class I:
        def __init__(self, r):
            self.repeats = r
    train, reg = [I(2)], [I(1), I(1), I(1), I(1)]
    out = balance_reg_repeats(train, reg)
    assert [out.get(id(r)) for r in reg] == [1, 1, None, None]  # sd-scripts registers only what it needs


def test_dataset_toml_round_trip_and_errors(tmp_path):
    save(tmp_path / "imgs" / "a.png", png_bytes(64, 64))
    toml = tmp_path / "ds.toml"
    toml.write_text(
        '[general]\nshuffle_caption = true\ncaption_extension = ".txt"\nkeep_tokens = 1\n\n'
        '[[datasets]]\nresolution = [64, 128]\nbatch_size = 2\nenable_bucket = true\n\n'
        '[[datasets.subsets]]\nimage_dir = "imgs"\nnum_repeats = 5\nclass_tokens = "zkz"\nflip_aug = true\n',
        encoding="utf-8",
    )
    spec = load_dataset_toml(toml)
    s = spec.datasets[0].subsets[0]
    assert (s.num_repeats, s.class_tokens, s.shuffle_caption, s.keep_tokens, s.flip_aug) == (5, "zkz", True, 1, True)
    assert Path(s.image_dir) == tmp_path / "imgs" and spec.datasets[0].resolution == (64, 128)
    out = save_dataset_toml(spec, tmp_path / "again.toml")
    assert load_dataset_toml(out) == spec
    bad = tmp_path / "bad.toml"
    bad.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nnum_repaets = 2\n', encoding="utf-8")
    with pytest.raises(UserError, match="num_repaets.*did you mean 'num_repeats'"):
        load_dataset_toml(bad)


def test_train_data_dir_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        spec_from_config(DatasetConfig(train_data_dir=str(tmp_path / "nope")), 1, 64)
    save(tmp_path / "flat" / "a.png", png_bytes(64, 64))
    with pytest.raises(UserError, match="put them in a subfolder"):
        spec_from_config(DatasetConfig(train_data_dir=str(tmp_path / "flat")), 1, 64)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lora_train", *args], capture_output=True, text=True)


def test_dataset_check_json(messy):
    root, _ = messy
    r = run_cli("dataset", "check", str(root), "--resolution", "128", "--min-bucket-reso", "64", "--max-bucket-reso", "256",
                "--bucket-no-upscale", "--batch-size", "2", "--epochs", "3", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["images"] == 9
    assert {"path", "reason"} <= set(report["problems"][0])
    item = next(i for i in report["items"] if i["path"].endswith("rotated.jpg"))
    assert item["size"] == [64, 128] and item["repeats"] == 4 and item["bucket"] == [64, 128]
    assert sum(b["count"] for b in report["buckets"]) == report["train_samples"]
    assert report["total_steps"] == 3 * report["steps_per_epoch"]
    r = run_cli("dataset", "check", str(root), "--resolution", "128", "--min-bucket-reso", "64", "--max-bucket-reso", "256", "--tokens")
    assert "buckets:" in r.stdout and "problems (" in r.stdout, r.stderr
    r = run_cli("dataset", "check", str(root), "--resolution", "128", "--min-bucket-reso", "64", "--no-duplicates", "--tokens", "--json")
    plain = next(i for i in json.loads(r.stdout)["items"] if i["path"].endswith("plain.png"))
    assert plain["tokens"] > 5 and plain["token_budget"] == 75


def test_duplicates_found(tmp_path):
    root = tmp_path / "d"
    a = save(root / "1_x" / "a.png", png_bytes(64, 64, (200, 10, 10)))
    save(root / "1_x" / "a_copy.png", a.read_bytes())
    im = Image.new("RGB", (128, 128), (255, 255, 255))
    im.paste((0, 0, 200), (20, 20, 90, 100))
    im.save(root / "1_x" / "b.png")
    im.resize((120, 120)).save(root / "1_x" / "b_small.jpg", quality=90)
    other = Image.new("RGB", (128, 128), (255, 255, 255))
    other.paste((200, 0, 0), (20, 20, 90, 100))  # same layout, other colour: not a duplicate
    other.save(root / "1_x" / "c.png")
    r = run_cli("dataset", "check", str(root), "--resolution", "64", "--min-bucket-reso", "64", "--json")
    dups = {(Path(d["a"]).name, Path(d["b"]).name, d["kind"]) for d in json.loads(r.stdout)["duplicates"]}
    assert ("a.png", "a_copy.png", "exact") in dups
    assert ("b.png", "b_small.jpg", "near") in dups
    assert not any("c.png" in (x, y) for x, y, _ in dups)


def test_dataset_prepare_cli(tmp_path):
    src = tmp_path / "src"
    save(src / "5_a" / "x.png", png_bytes(300, 200))
    (src / "5_a" / "x.txt").write_text("zkz", encoding="utf-8")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    r = run_cli("dataset", "prepare", str(src), str(tmp_path / "dst"), "--size", "sd15-512x768", "--crop", "focus", "--flip")
    assert r.returncode == 0, r.stderr
    out = sorted(p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*") if p.is_file())
    assert out == ["5_a/x.png", "5_a/x.txt", "5_a/x_flip.png", "5_a/x_flip.txt"]
    assert Image.open(tmp_path / "dst" / "5_a" / "x.png").size == (512, 768)
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    r = run_cli("dataset", "prepare", str(src), str(src / "out"), "--size", "512x512")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli("dataset", "prepare", str(src), str(tmp_path / "d2"), "--size", "500x500")
    assert r.returncode == 2 and "64" in r.stderr


def test_dataset_toml_batch_size_is_per_process(tmp_path):
    save(tmp_path / "imgs" / "a.png", png_bytes(64, 64))
    toml = tmp_path / "ds.toml"
    toml.write_text('[[datasets]]\nbatch_size = 3\n[[datasets.subsets]]\nimage_dir = "imgs"\n\n'
                    '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n', encoding="utf-8")
    spec, _ = spec_from_config(DatasetConfig(dataset_config=str(toml)), 4, 64, processes=2)
    assert [b.batch_size for b in spec.datasets] == [6, 4]  # 3 per process x 2; the global default as given
