"""Dataset preparation: crop every image to one size into a new folder, never touching the source."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lora_train.dataset import prepare as prep
from lora_train.dataset.prepare import PRESETS, parse_size, prepare
from lora_train.errors import UserError

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (110, 120, 130)


def snapshot(root: Path) -> dict:
    """Every file and folder under root: bytes, mtime and mode (folder mtimes change when entries are added)."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else None, st.st_mtime_ns, st.st_mode)
    return out


def exif_rotated_jpeg(path: Path) -> None:
    """Stored 800x400, left half red; orientation 6 means 'turn 90 degrees clockwise to view'."""
    im = Image.new("RGB", (800, 400), BLUE)
    ImageDraw.Draw(im).rectangle((0, 0, 399, 399), fill=RED)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, quality=95, exif=exif.tobytes())


def disc_scene(path: Path, size=(2000, 1000), centre=(1700, 500), radius=80, noise=0.0, colour_field=False) -> None:
    """A red disc on plain grey, on grey with sensor-like noise, or on large smooth patches of colour."""
    rng = np.random.default_rng(1)
    if colour_field:
        im = Image.fromarray(rng.uniform(60, 200, (6, 6, 3)).astype(np.uint8)).resize(size, Image.BICUBIC)
    else:
        a = np.full((size[1], size[0], 3), GREY, dtype=np.float64) + rng.normal(0, noise, (size[1], size[0], 3))
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    cx, cy = centre
    ImageDraw.Draw(im).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=RED)
    im.save(path)


def red_pixels(im: Image.Image) -> int:
    a = np.asarray(im.convert("RGB")).astype(int)
    return int(((a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)).sum())


@pytest.fixture
def src(tmp_path) -> Path:
    root = tmp_path / "src"
    a, b = root / "10_zkz", root / "5_other" / "nested"
    a.mkdir(parents=True)
    b.mkdir(parents=True)

    rgba = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((100, 50, 200, 150), fill=(0, 128, 0, 255))
    rgba.save(a / "rgba.png")
    (a / "rgba.txt").write_text("zkz, green ball", encoding="utf-8")

    Image.linear_gradient("L").resize((1000, 1500)).save(a / "grey.png")
    (a / "grey.caption").write_text("zkz, gradient", encoding="utf-8")

    Image.new("RGB", (640, 640), (200, 30, 30)).convert("P", palette=Image.ADAPTIVE).save(a / "palette.png")

    Image.new("CMYK", (800, 600), (0, 255, 255, 0)).save(a / "cmyk.jpg", quality=95)  # pure red in CMYK
    (a / "cmyk.txt").write_bytes("zkz, 赤".encode("utf-16"))  # copied byte for byte, whatever the encoding
    (a / "cmyk.caption").write_text("zkz, red", encoding="utf-8")

    exif_rotated_jpeg(a / "rotated.jpg")
    (a / "rotated.txt").write_text("zkz, rotated", encoding="utf-8")

    Image.new("RGB", (50, 40), BLUE).save(b / "tiny.bmp")
    Image.new("RGB", (100, 700), RED).save(b / "tall.webp")
    (b / "tall.txt").write_text("other, tall", encoding="utf-8")
    (b / "notes.md").write_text("not an image, not a caption", encoding="utf-8")
    return root


def test_presets_and_sizes():
    assert parse_size("512x768") == (512, 768)
    assert parse_size(" 1024 X 640 ") == (1024, 640)
    assert parse_size("sd15-512x768") == (512, 768)
    assert parse_size("SDXL-768x1024") == (768, 1024)
    assert parse_size((640, 384)) == (640, 384)
    assert set(PRESETS) == {"sd15-512x512", "sd15-512x768", "sd15-768x512", "sdxl-1024x1024", "sdxl-768x1024", "sdxl-1024x768"}
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in PRESETS.values())
    with pytest.raises(UserError, match=r"width 500 must be a positive multiple of 64 \(e.g. 512x512\)"):
        parse_size("500x512")
    with pytest.raises(UserError, match="height 0"):
        parse_size("512x0")
    with pytest.raises(UserError, match="did you mean 'sdxl-1024x1024'"):
        parse_size("sdxl-1024x1042")
    with pytest.raises(UserError, match="not WIDTHxHEIGHT"):
        parse_size("big")


def test_prepare_writes_every_image_at_the_target_size(src, tmp_path):
    before = snapshot(src)
    dst = tmp_path / "out"
    calls = []
    report = prepare(src, dst, "sd15-512x768", progress=lambda done, total, path: calls.append((done, total, path.name)))

    assert snapshot(src) == before
    assert report.skipped == []
    assert report.images == 7 and [c[:2] for c in calls] == [(i, 7) for i in range(1, 8)]
    # only the 1000x1500 gradient covers 512x768 without scaling up (rotated.jpg is 400x800 once upright)
    assert report.upscaled == 6
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert files == [
        "10_zkz/cmyk.caption", "10_zkz/cmyk.png", "10_zkz/cmyk.txt", "10_zkz/grey.caption", "10_zkz/grey.png",
        "10_zkz/palette.png", "10_zkz/rgba.png", "10_zkz/rgba.txt", "10_zkz/rotated.png", "10_zkz/rotated.txt",
        "5_other/nested/tall.png", "5_other/nested/tall.txt", "5_other/nested/tiny.png",
    ]  # fmt: skip
    assert sorted(report.written) == sorted(p for p in dst.rglob("*") if p.is_file())
    for png in dst.rglob("*.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (512, 768), png
    for caption in src.rglob("*"):
        if caption.suffix in (".txt", ".caption"):
            assert (dst / caption.relative_to(src)).read_bytes() == caption.read_bytes()

    rgba = np.asarray(Image.open(dst / "10_zkz/rgba.png"))
    assert (rgba[0, 0] == 255).all()  # transparency composited on white
    assert rgba[384, 256, 1] > 100 and rgba[384, 256, 0] < 30  # the green ball stays in the middle
    cmyk = np.asarray(Image.open(dst / "10_zkz/cmyk.png")).reshape(-1, 3).mean(axis=0)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # CMYK red is still red
    rotated = np.asarray(Image.open(dst / "10_zkz/rotated.png")).astype(int)
    top, bottom = rotated[:300].reshape(-1, 3).mean(axis=0), rotated[-300:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 60, "EXIF orientation 6 was not applied: the red half must be on top"
    assert bottom[2] > 200 and bottom[0] < 60


def test_focus_crop_keeps_the_off_centre_subject(tmp_path):
    src = tmp_path / "src"
    (src / "1_disc").mkdir(parents=True)
    disc_scene(src / "1_disc" / "right.png")  # wide: the crop slides horizontally
    disc_scene(src / "1_disc" / "left.png", centre=(250, 300), radius=60)
    disc_scene(src / "1_disc" / "bottom.png", size=(900, 2400), centre=(450, 2150), radius=90)  # tall: slides vertically
    # each of these defeats one of the two saliency measures on its own (see prepare.saliency)
    disc_scene(src / "1_disc" / "grainy.png", centre=(1750, 250), noise=25.0)
    disc_scene(src / "1_disc" / "patches.png", size=(3000, 1000), centre=(2900, 900), radius=60, colour_field=True)
    before = snapshot(src)

    center = prepare(src, tmp_path / "center", (512, 512), crop="center")
    focus = prepare(src, tmp_path / "focus", (512, 512), crop="focus")

    assert snapshot(src) == before
    assert len(center.written) == len(focus.written) == 5
    cases = [("right", 80, 0.512), ("left", 60, 0.512), ("bottom", 90, 512 / 900), ("grainy", 80, 0.512), ("patches", 60, 0.512)]
    for name, radius, scale in cases:
        whole = np.pi * (radius * scale) ** 2
        with Image.open(tmp_path / "center" / "1_disc" / f"{name}.png") as im:
            assert red_pixels(im) == 0, name
        with Image.open(tmp_path / "focus" / "1_disc" / f"{name}.png") as im:
            assert im.size == (512, 512)
            assert red_pixels(im) > 0.95 * whole, name  # the whole disc, not a sliver of it
            a = np.asarray(im)
            assert not (a[0] == RED).all(axis=1).any() and not (a[-1] == RED).all(axis=1).any()
            assert not (a[:, 0] == RED).all(axis=1).any() and not (a[:, -1] == RED).all(axis=1).any(), "disc cut by the crop"


def test_focus_on_a_flat_image_or_matching_shape_is_the_centre_crop(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (1500, 700), GREY).save(src / "flat.png")
    disc_scene(src / "square.png", size=(1000, 1000), centre=(900, 500), radius=50)
    prepare(src, tmp_path / "c", "512x512", crop="center")
    prepare(src, tmp_path / "f", "512x512", crop="focus")
    for name in ("flat.png", "square.png"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "f" / name).read_bytes()


def test_flip_copies_are_exact_mirrors_with_the_same_caption(src, tmp_path):
    before = snapshot(src)
    dst = tmp_path / "out"
    report = prepare(src, dst, "512x512", crop="focus", flip=True)
    assert snapshot(src) == before
    assert report.images == 7 and len(list(dst.rglob("*_flip.png"))) == 7
    for png in dst.rglob("*.png"):
        if png.stem.endswith("_flip"):
            continue
        flipped = png.with_name(png.stem + "_flip.png")
        assert np.array_equal(np.asarray(Image.open(flipped)), np.asarray(Image.open(png))[:, ::-1])
        for ext in (".txt", ".caption"):
            if png.with_suffix(ext).exists():
                assert flipped.with_suffix(ext).read_bytes() == png.with_suffix(ext).read_bytes()
            else:
                assert not flipped.with_suffix(ext).exists()
    assert (dst / "10_zkz" / "rotated_flip.txt").read_text() == "zkz, rotated"


def test_bad_files_are_reported_and_skipped(src, tmp_path):
    folder = src / "10_zkz"
    (folder / "garbage.png").write_bytes(b"this is not a png")
    (folder / "empty.jpg").write_bytes(b"")
    good = (folder / "rotated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "garbage.txt").write_text("caption of a broken image")
    before = snapshot(src)

    report = prepare(src, tmp_path / "out", "512x512")

    assert snapshot(src) == before
    assert report.images == 7
    skipped = {p.name: reason for p, reason in report.skipped}
    assert set(skipped) == {"garbage.png", "empty.jpg", "truncated.jpg"}
    assert "empty" in skipped["empty.jpg"] and "truncated" in skipped["truncated.jpg"]
    assert all(p.parent == folder for p, _ in report.skipped)
    assert not (tmp_path / "out" / "10_zkz" / "garbage.txt").exists()  # captions go with written images only
    assert "3 skipped" in report.summary() and "garbage.png" in report.summary()


def test_same_stem_in_two_formats_gets_two_outputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (512, 512), RED).save(src / "a.png")
    Image.new("RGB", (512, 512), BLUE).save(src / "a.jpg")
    (src / "a.txt").write_text("shared caption")
    report = prepare(src, tmp_path / "out", "512x512", flip=True)
    names = sorted(p.name for p in report.written)
    assert names == ["a.png", "a.txt", "a_2.png", "a_2.txt", "a_2_flip.png", "a_2_flip.txt", "a_flip.png", "a_flip.txt"]
    colours = {np.asarray(Image.open(tmp_path / "out" / n))[0, 0].argmax() for n in ("a.png", "a_2.png")}
    assert colours == {0, 2}  # one red, one blue: neither overwrote the other


def test_refuses_overlapping_or_used_folders(src, tmp_path):
    before = snapshot(src)
    with pytest.raises(UserError, match="is the source folder"):
        prepare(src, src, "512x512")
    with pytest.raises(UserError, match="is the source folder"):
        prepare(src, src / "10_zkz" / "..", "512x512")
    with pytest.raises(UserError, match="inside the source folder"):
        prepare(src, src / "prepared", "512x512")
    with pytest.raises(UserError, match="inside the source folder"):
        prepare(src, src / "prepared", "512x512", overwrite=True)
    with pytest.raises(UserError, match="source folder .* is inside the output folder"):
        prepare(src, tmp_path, "512x512", overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(src / "10_zkz")
    with pytest.raises(UserError, match="inside the source folder"):
        prepare(src, link, "512x512", overwrite=True)
    with pytest.raises(UserError, match="does not exist"):
        prepare(tmp_path / "nope", tmp_path / "out", "512x512")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is a file"):
        prepare(src, tmp_path / "file", "512x512")
    with pytest.raises(UserError, match="crop 'focsu' is not one of center, focus \\(did you mean 'focus'\\?\\)"):
        prepare(src, tmp_path / "out", "512x512", crop="focsu")
    assert not (tmp_path / "out").exists()
    assert snapshot(src) == before


def test_non_empty_output_needs_overwrite(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        prepare(src, dst, "512x512")
    assert sorted(os.listdir(dst)) == ["keep.txt"]

    first = prepare(src, dst, "512x512", overwrite=True)
    again = prepare(src, dst, "768x512", overwrite=True)  # same names: replaced in place
    assert sorted(first.written) == sorted(again.written)
    assert (dst / "keep.txt").read_text() == "mine"
    with Image.open(dst / "10_zkz" / "grey.png") as im:
        assert im.size == (768, 512)


def test_overwrite_never_follows_a_link_into_the_source(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "10_zkz").symlink_to(src / "10_zkz")  # e.g. a user's shortcut left in the output folder
    before = snapshot(src)
    with pytest.raises(UserError, match="outside the output folder"):
        prepare(src, dst, "512x512", overwrite=True)
    assert snapshot(src) == before


def test_a_failed_write_leaves_no_partial_file(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(UserError, match="cannot write .*cmyk.png': No space left on device"):
        prepare(src, dst, "512x512")
    assert [p for p in dst.rglob("*") if p.is_file()] == []


def test_saliency_map_is_small_and_normalised():
    im = Image.new("RGB", (3000, 1000), GREY)
    ImageDraw.Draw(im).ellipse((2500, 400, 2700, 600), fill=RED)
    sal = prep.saliency(im)
    assert sal.shape == (43, 128) and abs(sal.sum() - 1) < 1e-9
    assert sal[:, 100:].sum() > 0.5  # most of it on the disc's side
    assert prep.saliency(Image.new("RGB", (300, 200), GREY)) is None
