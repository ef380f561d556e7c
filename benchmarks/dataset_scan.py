"""Benchmark: scan + bucket time for a generated dataset (default 10,000 images).

    .venv/bin/python -m benchmarks.dataset_scan [--images N] [--keep DIR]

Scanning reads image headers (size, EXIF orientation, truncation markers), not pixels; the last
line compares that with fully decoding a sample, to show what the header-only scan saves.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from lora_train.dataset.check import CheckOptions
from lora_train.dataset.images import load_rgb
from lora_train.dataset.plan import make_plan
from lora_train.dataset.scan import scan
from lora_train.dataset.source import spec_from_config
from lora_train.train.config import DatasetConfig

SIZES = [(512, 512), (768, 512), (512, 768), (1024, 1024), (1920, 1080), (1080, 1920), (3000, 2000), (2000, 3000),
         (640, 480), (1200, 1600), (900, 900), (2048, 1024)]


def make(root: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    sources = []
    src_dir = root / "_sources"
    src_dir.mkdir(parents=True)
    for k, (w, h) in enumerate(SIZES * 5):
        ext = (".png", ".jpg", ".webp")[k % 3]
        p = src_dir / f"s{k}{ext}"
        Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(p)
        sources.append(p)
    folders = [root / "data" / f"{r}_{name}" for r, name in ((10, "char"), (5, "outfit"), (3, "style"), (2, "bg"), (1, "misc"))]
    for f in folders:
        f.mkdir(parents=True)
    for i in range(n):
        src = sources[i % len(sources)]
        dst = folders[i % len(folders)] / f"img{i:05d}{src.suffix}"
        shutil.copyfile(src, dst)
        dst.with_suffix(".txt").write_text(f"zkz, tag{i % 50}, tag{i % 7}, white background", encoding="utf-8")
    shutil.rmtree(src_dir)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--keep", help="generate into this folder and keep it")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lt-bench-"))
    try:
        t = time.perf_counter()
        if not (root / "data").is_dir():
            make(root, args.images)
        print(f"generated {args.images} images in {time.perf_counter() - t:.1f} s ({root / 'data'})")
        o = CheckOptions(resolution="512", batch_size=4)
        cfg = DatasetConfig(train_data_dir=str(root / "data"), resolution=o.resolution, enable_bucket=True)
        t0 = time.perf_counter()
        spec, problems = spec_from_config(cfg, o.batch_size, 512)
        s = scan(spec, problems)
        t1 = time.perf_counter()
        plan = make_plan(s, spec, batch_size=o.batch_size, max_train_epochs=10)
        t2 = time.perf_counter()
        print(f"scan:   {len(s.items)} images in {t1 - t0:.2f} s ({(t1 - t0) / len(s.items) * 1e6:.0f} us/image)")
        print(f"bucket: {len(plan.items)} images, {len(plan.to_dict()['buckets'])} buckets, {plan.steps_per_epoch} steps/epoch in {t2 - t1:.2f} s")
        print(f"total:  {t2 - t0:.2f} s for scan + bucket")
        sample = [i.path for i in s.items[:200]]
        t3 = time.perf_counter()
        for p in sample:
            load_rgb(p)
        per = (time.perf_counter() - t3) / len(sample)
        print(f"for comparison, a full decode takes {per * 1e3:.1f} ms/image here: {per * len(s.items):.0f} s for all {len(s.items)}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
