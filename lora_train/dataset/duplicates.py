"""Exact and near-duplicate images in a dataset.

Exact: same file bytes. Near: difference hashes within a few bits *and* similar colours (the hash
alone sees only structure, so a red and a blue circle of the same shape would match). Candidate
pairs come from 4 bands of the 64-bit hash: two hashes within 3 bits share at least one band.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lora_train.dataset.cache import file_sha1

NEAR_BITS = 3
NEAR_COLOUR = 12.0  # mean absolute difference of 8x8 RGB thumbnails, 0-255


@dataclass
class Duplicate:
    a: Path
    b: Path
    kind: str  # "exact" | "near"
    distance: int = 0


def _fingerprint(path: Path) -> tuple[int, np.ndarray]:
    with Image.open(path) as im:
        im.draft("RGB", (64, 64))  # JPEG decodes at reduced scale
        im = ImageOps.exif_transpose(im).convert("RGB")
        grey = np.asarray(im.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
        thumb = np.asarray(im.resize((8, 8), Image.BILINEAR), dtype=np.float32)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2), thumb


def find_duplicates(paths: list[Path]) -> list[Duplicate]:
    out: list[Duplicate] = []
    by_sha: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        by_sha[file_sha1(p)].append(p)
    unique = []
    for group in by_sha.values():
        out += [Duplicate(group[0], other, "exact") for other in group[1:]]
        unique.append(group[0])
    prints = {}
    for p in unique:
        try:
            prints[p] = _fingerprint(p)
        except OSError:
            continue  # undecodable files are reported by the scan
    bands: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for p, (h, _) in prints.items():
        for band in range(4):
            bands[(band, (h >> (16 * band)) & 0xFFFF)].append(p)
    seen = set()
    for members in bands.values():
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                pair = (a, b) if str(a) < str(b) else (b, a)
                if pair in seen:
                    continue
                seen.add(pair)
                (ha, ta), (hb, tb) = prints[pair[0]], prints[pair[1]]
                distance = bin(ha ^ hb).count("1")
                if distance <= NEAR_BITS and float(np.abs(ta - tb).mean()) <= NEAR_COLOUR:
                    out.append(Duplicate(pair[0], pair[1], "near", distance))
    return out
