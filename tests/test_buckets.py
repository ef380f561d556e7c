"""Aspect-ratio buckets: the same bucket and resized size as sd-scripts for the same settings."""

import random
from collections import Counter

import pytest

from lora_train.dataset.buckets import BucketConfig, Buckets, assign, bucket_resolutions, crop_box
from lora_train.errors import UserError

DEFAULT = BucketConfig(enable_bucket=True)
S32 = BucketConfig((768, 768), enable_bucket=True, max_bucket_reso=1536, bucket_reso_steps=32)
WIDE = BucketConfig((768, 512), enable_bucket=True, min_bucket_reso=320, max_bucket_reso=1000)  # max rounds up to 1024
NO_UPSCALE = BucketConfig((512, 512), enable_bucket=True, bucket_no_upscale=True)
NO_BUCKET = BucketConfig((512, 768))

# Expected values come from sd-scripts itself, commit 48d368fa557731ad0488c07304dfeba8c07910eb
# (kohya-ss/sd-scripts, 2026-02-16): in a scratch folder outside this repo, make_bucket_resolutions,
# BucketManager and adjust_min_max_bucket_reso_by_steps were cut out of that commit's library/*.py and
# driven the way DreamBoothDataset.make_buckets drives them (BucketManager.make_buckets unless
# bucket_no_upscale; one predefined bucket = resolution without enable_bucket), then select_bucket
# was called on each size. Columns: (bucket w, bucket h, resized w, resized h).
# An off-by-one here means a LoRA trained on different crops than sd-scripts would use.
PREDEFINED_TABLE = [  # size, DEFAULT, S32, WIDE
    ((512, 512), (512, 512, 512, 512), (768, 768, 768, 768), (576, 576, 576, 576)),
    ((1024, 1024), (512, 512, 512, 512), (768, 768, 768, 768), (576, 576, 576, 576)),
    ((768, 768), (512, 512, 512, 512), (768, 768, 768, 768), (576, 576, 576, 576)),
    ((64, 64), (512, 512, 512, 512), (768, 768, 768, 768), (576, 576, 576, 576)),
    ((100, 100), (512, 512, 512, 512), (768, 768, 768, 768), (576, 576, 576, 576)),
    ((200, 300), (384, 640, 427, 640), (608, 928, 619, 928), (512, 768, 512, 768)),
    ((300, 200), (640, 384, 640, 427), (928, 608, 928, 619), (768, 512, 768, 512)),
    ((1023, 767), (576, 448, 598, 448), (864, 672, 896, 672), (704, 512, 704, 528)),
    ((767, 1023), (448, 576, 448, 598), (672, 864, 672, 896), (512, 704, 528, 704)),
    ((500, 2000), (256, 1024, 256, 1024), (384, 1536, 384, 1536), (320, 1024, 320, 1280)),
    ((2000, 500), (1024, 256, 1024, 256), (1536, 384, 1536, 384), (1024, 320, 1280, 320)),
    ((3000, 1000), (832, 256, 832, 277), (1312, 448, 1344, 448), (1024, 320, 1024, 341)),
    ((1000, 3000), (256, 832, 277, 832), (448, 1312, 448, 1344), (320, 1024, 341, 1024)),
    ((1920, 1080), (640, 384, 683, 384), (1024, 576, 1024, 576), (832, 448, 832, 468)),
    ((1080, 1920), (384, 640, 384, 683), (576, 1024, 576, 1024), (448, 832, 468, 832)),
    ((4000, 3000), (576, 448, 597, 448), (864, 672, 896, 672), (704, 512, 704, 528)),
    ((3000, 4000), (448, 576, 448, 597), (672, 864, 672, 896), (512, 704, 528, 704)),
    ((6000, 4000), (640, 384, 640, 427), (928, 608, 928, 619), (768, 512, 768, 512)),
    ((832, 1216), (384, 640, 438, 640), (608, 928, 635, 928), (512, 768, 525, 768)),
    ((1216, 832), (576, 448, 655, 448), (896, 640, 935, 640), (768, 512, 768, 525)),
    ((640, 480), (576, 448, 597, 448), (864, 672, 896, 672), (704, 512, 704, 528)),
    ((480, 640), (448, 576, 448, 597), (672, 864, 672, 896), (512, 704, 528, 704)),
    ((512, 768), (384, 640, 427, 640), (608, 928, 619, 928), (512, 768, 512, 768)),
    ((768, 512), (640, 384, 640, 427), (928, 608, 928, 619), (768, 512, 768, 512)),
    ((513, 511), (512, 512, 514, 512), (768, 768, 771, 768), (576, 576, 578, 576)),
    ((333, 777), (320, 768, 329, 768), (512, 1152, 512, 1195), (384, 896, 384, 896)),
    ((1234, 567), (704, 320, 704, 323), (1120, 512, 1120, 515), (896, 384, 896, 412)),
    ((8192, 8192), (512, 512, 512, 512), (768, 768, 768, 768), (576, 576, 576, 576)),
    ((256, 1024), (256, 1024, 256, 1024), (384, 1536, 384, 1536), (320, 1024, 320, 1280)),
    ((1024, 256), (1024, 256, 1024, 256), (1536, 384, 1536, 384), (1024, 320, 1280, 320)),
    ((4096, 256), (1024, 256, 4096, 256), (1536, 256, 4096, 256), (1024, 320, 5120, 320)),
    ((2500, 1600), (640, 384, 640, 410), (960, 608, 960, 614), (768, 512, 800, 512)),
    ((700, 700), (512, 512, 512, 512), (768, 768, 768, 768), (576, 576, 576, 576)),
    ((960, 540), (640, 384, 683, 384), (1024, 576, 1024, 576), (832, 448, 832, 468)),
    ((123, 456), (256, 960, 259, 960), (384, 1440, 388, 1440), (320, 1024, 320, 1186)),
    ((1600, 900), (640, 384, 683, 384), (1024, 576, 1024, 576), (832, 448, 832, 468)),
    ((896, 1152), (448, 576, 448, 576), (672, 864, 672, 864), (512, 704, 548, 704)),
]

FREE_TABLE = [  # size, NO_UPSCALE, NO_BUCKET
    ((512, 512), (512, 512, 512, 512), (512, 768, 768, 768)),
    ((1024, 1024), (512, 512, 512, 512), (512, 768, 768, 768)),
    ((768, 768), (512, 512, 512, 512), (512, 768, 768, 768)),
    ((64, 64), (64, 64, 64, 64), (512, 768, 768, 768)),
    ((100, 100), (64, 64, 100, 100), (512, 768, 768, 768)),
    ((200, 300), (192, 256, 200, 300), (512, 768, 512, 768)),
    ((300, 200), (256, 192, 300, 200), (512, 768, 1152, 768)),
    ((1023, 767), (512, 384, 512, 384), (512, 768, 1024, 768)),
    ((767, 1023), (384, 512, 384, 512), (512, 768, 576, 768)),
    ((500, 2000), (256, 1024, 256, 1024), (512, 768, 512, 2048)),
    ((2000, 500), (1024, 256, 1024, 256), (512, 768, 3072, 768)),
    ((3000, 1000), (768, 256, 768, 256), (512, 768, 2304, 768)),
    ((1000, 3000), (256, 768, 256, 768), (512, 768, 512, 1536)),
    ((1920, 1080), (640, 384, 683, 384), (512, 768, 1365, 768)),
    ((1080, 1920), (384, 640, 384, 683), (512, 768, 512, 910)),
    ((4000, 3000), (512, 384, 512, 384), (512, 768, 1024, 768)),
    ((3000, 4000), (384, 512, 384, 512), (512, 768, 576, 768)),
    ((6000, 4000), (576, 384, 576, 384), (512, 768, 1152, 768)),
    ((832, 1216), (384, 576, 394, 576), (512, 768, 525, 768)),
    ((1216, 832), (576, 384, 576, 394), (512, 768, 1122, 768)),
    ((640, 480), (512, 384, 512, 384), (512, 768, 1024, 768)),
    ((480, 640), (384, 512, 384, 512), (512, 768, 576, 768)),
    ((512, 768), (384, 576, 384, 576), (512, 768, 512, 768)),
    ((768, 512), (576, 384, 576, 384), (512, 768, 1152, 768)),
    ((513, 511), (512, 448, 513, 511), (512, 768, 771, 768)),
    ((333, 777), (320, 768, 333, 777), (512, 768, 512, 1195)),
    ((1234, 567), (704, 320, 704, 323), (512, 768, 1671, 768)),
    ((8192, 8192), (512, 512, 512, 512), (512, 768, 768, 768)),
    ((256, 1024), (256, 1024, 256, 1024), (512, 768, 512, 2048)),
    ((1024, 256), (1024, 256, 1024, 256), (512, 768, 3072, 768)),
    ((4096, 256), (2048, 128, 2048, 128), (512, 768, 12288, 768)),
    ((2500, 1600), (576, 384, 600, 384), (512, 768, 1200, 768)),
    ((700, 700), (512, 512, 512, 512), (512, 768, 768, 768)),
    ((960, 540), (640, 384, 683, 384), (512, 768, 1365, 768)),
    ((123, 456), (64, 448, 123, 456), (512, 768, 512, 1898)),
    ((1600, 900), (640, 384, 683, 384), (512, 768, 1365, 768)),
    ((896, 1152), (448, 576, 448, 576), (512, 768, 597, 768)),
]


def _check(cfg, size, expected):
    a = assign(cfg, *size)
    assert (*a.bucket, *a.resized) == expected, f"{size} under {cfg}"
    # sd-scripts' signed error: bucket ratio minus image ratio
    assert a.ar_error == a.bucket[0] / a.bucket[1] - size[0] / size[1]


@pytest.mark.parametrize("size,default,s32,wide", PREDEFINED_TABLE)
def test_predefined_buckets_match_sd_scripts(size, default, s32, wide):
    _check(DEFAULT, size, default)
    _check(S32, size, s32)
    _check(WIDE, size, wide)


@pytest.mark.parametrize("size,no_upscale,no_bucket", FREE_TABLE)
def test_no_upscale_and_no_bucket_match_sd_scripts(size, no_upscale, no_bucket):
    _check(NO_UPSCALE, size, no_upscale)
    _check(NO_BUCKET, size, no_bucket)


def test_bucket_sets_match_sd_scripts():
    assert bucket_resolutions(DEFAULT) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip
    s32 = bucket_resolutions(S32)
    assert len(s32) == 57 and s32[:3] == [(256, 1536), (288, 1536), (320, 1536)] and s32[-1] == (1536, 384)
    wide = bucket_resolutions(WIDE)
    # the square bucket is the largest grid square within the training area, not min(resolution)
    assert len(wide) == 17 and (576, 576) in wide and wide[-2:] == [(1024, 320), (1024, 384)]
    assert bucket_resolutions(NO_BUCKET) == [(512, 768)]
    assert bucket_resolutions(NO_UPSCALE) == []  # buckets follow the images


@pytest.mark.parametrize("size", [(50, 50), (64, 63), (63, 640), (30000, 100)])
def test_no_upscale_refuses_images_that_would_get_an_empty_bucket(size):
    # sd-scripts divides by zero on these, or makes a 0-pixel-wide bucket (63x640)
    with pytest.raises(UserError, match="too small or too narrow"):
        assign(NO_UPSCALE, *size)


@pytest.mark.parametrize(
    "cfg,message",
    [
        (BucketConfig(enable_bucket=True, min_bucket_reso=1024, max_bucket_reso=768), "larger than max_bucket_reso"),
        (BucketConfig(enable_bucket=True, min_bucket_reso=640), "min_bucket_reso .640. is larger than the shorter side"),
        (BucketConfig((1024, 768), enable_bucket=True, max_bucket_reso=960), "smaller than the longer side"),
        (BucketConfig(enable_bucket=True, bucket_reso_steps=0), "must be positive"),
        (BucketConfig(enable_bucket=True, min_bucket_reso=32), "at least bucket_reso_steps"),
        (BucketConfig(enable_bucket=True, bucket_reso_steps=32), "divisible by 64"),
        (BucketConfig((500, 512)), "multiple of 64"),
        (BucketConfig((512, 0)), "must be positive"),
    ],
)
def test_impossible_settings_are_refused(cfg, message):
    with pytest.raises(UserError, match=message):
        cfg.validate()


def test_settings_sd_scripts_adjusts_or_ignores():
    # SDXL-style steps are fine when the model allows them
    assert S32.validate(steps_multiple=32) == []
    notes = BucketConfig(enable_bucket=True, min_bucket_reso=300, max_bucket_reso=1000).validate()
    assert notes == [
        "min_bucket_reso 300 rounded down to 256, a multiple of bucket_reso_steps",
        "max_bucket_reso 1000 rounded up to 1024, a multiple of bucket_reso_steps",
    ]
    # without enable_bucket sd-scripts never looks at the bucket keys
    assert BucketConfig((512, 512), min_bucket_reso=2048, bucket_reso_steps=7).validate() == []
    # with buckets, resolution only sets the area: it need not sit on the grid
    assert BucketConfig((600, 600), enable_bucket=True).validate() == []


def _mixed():
    b = Buckets(DEFAULT)
    for name, size, repeats in [
        ("a", (1024, 1024), 10), ("b", (512, 512), 1),  # 512x512: 11 -> 4 batches, 1 empty slot
        ("c", (1920, 1080), 2), ("d", (1600, 900), 2), ("e", (960, 540), 2),  # 640x384: 6 -> 2 batches
        ("f", (1080, 1920), 5),  # 384x640: 5 -> 2 batches, 1 empty slot
        ("g", (500, 2000), 1),  # 256x1024: 1 -> 1 batch, 2 empty slots
    ]:  # fmt: skip
        b.add(name, *size, repeats=repeats)
    return b


def test_steps_per_epoch_counts_each_bucket_separately():
    # 4 + 2 + 2 + 1; one pooled list would give ceil(23 / 3) = 8
    assert _mixed().steps_per_epoch(3) == 9
    assert _mixed().steps_per_epoch(1) == 23


def test_report():
    r = _mixed().report(3)
    assert r["buckets"] == [
        {"resolution": (256, 1024), "images": 1, "images_x_repeats": 1, "batches": 1, "waste": 2},
        {"resolution": (384, 640), "images": 1, "images_x_repeats": 5, "batches": 2, "waste": 1},
        {"resolution": (512, 512), "images": 2, "images_x_repeats": 11, "batches": 4, "waste": 1},
        {"resolution": (640, 384), "images": 3, "images_x_repeats": 6, "batches": 2, "waste": 0},
    ]
    assert (r["images"], r["images_x_repeats"], r["batches"], r["waste"]) == (7, 23, 9, 4)
    # 16:9 in 5:3 three times (1/9 each), 9:16 in 3:5 once (0.0375); per image, repeats ignored
    assert r["mean_ar_error"] == pytest.approx((3 / 9 + 0.0375) / 7)
    assert Buckets(DEFAULT).report(3)["mean_ar_error"] == 0.0


def test_batches_cover_every_item_repeats_times():
    b = _mixed()
    for seed in range(5):
        batches = list(b.batches(3, random.Random(seed)))
        assert len(batches) == b.steps_per_epoch(3)
        assert Counter(x for batch in batches for x in batch) == {"a": 10, "b": 1, "c": 2, "d": 2, "e": 2, "f": 5, "g": 1}
        short = Counter()
        for batch in batches:
            buckets = {b.assignment(x).bucket for x in batch}
            assert len(buckets) == 1 and 1 <= len(batch) <= 3
            short[buckets.pop()] += len(batch) < 3
        assert max(short.values()) <= 1  # only a bucket's last batch may be short
    assert list(b.batches(3, random.Random(1))) == list(b.batches(3, random.Random(1)))
    assert list(b.batches(3, random.Random(1))) != list(b.batches(3, random.Random(2)))


def test_buckets_refuse_bad_input():
    b = Buckets(DEFAULT)
    b.add("x", 512, 512)
    with pytest.raises(ValueError, match="already added"):
        b.add("x", 512, 512)
    with pytest.raises(UserError, match="repeats"):
        b.add("y", 512, 512, repeats=0)
    with pytest.raises(UserError, match="train_batch_size"):
        b.steps_per_epoch(0)


def test_crop_box_centre_and_random():
    wide = assign(DEFAULT, 1920, 1080)  # 683x384 cut to 640x384: 43 px to spare
    assert crop_box(wide, False) == (21, 0, 661, 384)  # sd-scripts floors the centre offset
    both = assign(NO_UPSCALE, 513, 511)  # 513x511 cut to 512x448 without resizing
    assert crop_box(both, False) == (0, 31, 512, 479)
    rng = random.Random(0)
    lefts = {crop_box(wide, True, rng)[0] for _ in range(2000)}
    assert lefts == set(range(44))  # every offset, both edges included, as random.randint
    boxes = [crop_box(both, True, rng) for _ in range(200)]
    assert all(x1 - x0 == 512 and y1 - y0 == 448 and x0 in (0, 1) and 0 <= y0 <= 63 for x0, y0, x1, y1 in boxes)
    exact = assign(DEFAULT, 512, 512)
    assert crop_box(exact, True, rng) == (0, 0, 512, 512)
