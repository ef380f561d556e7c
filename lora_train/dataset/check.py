"""`dataset check`: the scan, problems, buckets and step plan of a dataset, as data for the CLI and UI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_train.dataset.duplicates import find_duplicates
from lora_train.dataset.images import ImageError, load_rgb
from lora_train.dataset.plan import DatasetPlan, make_plan
from lora_train.dataset.scan import Problem, scan
from lora_train.dataset.source import spec_from_config
from lora_train.dataset.spec import DatasetConfig
from lora_train.errors import msg


@dataclass
class CheckOptions:
    resolution: str | None = None
    batch_size: int = 1
    epochs: int | None = None
    max_train_steps: int = 1600
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str | None = None
    reg_data_dir: str | None = None
    in_json: str | None = None  # sd-scripts' fine-tuning metadata; the folder then holds the images themselves
    dataset_repeats: int = 1
    duplicates: bool = True
    verify: bool = False  # decode every image fully (slow), not just headers
    tokens: bool = False  # count CLIP tokens per caption (builds the tokenizer: a few seconds)


def check_dataset(path: str | Path, o: CheckOptions, default_resolution: int = 512) -> tuple[DatasetPlan, dict]:
    path = Path(path)
    d = DatasetConfig(
        train_data_dir=None if path.suffix == ".toml" else str(path),
        dataset_config=str(path) if path.suffix == ".toml" else None,
        reg_data_dir=o.reg_data_dir, in_json=o.in_json, dataset_repeats=o.dataset_repeats, resolution=o.resolution,
        caption_extension=o.caption_extension,
        enable_bucket=o.enable_bucket, min_bucket_reso=o.min_bucket_reso, max_bucket_reso=o.max_bucket_reso,
        bucket_reso_steps=o.bucket_reso_steps, bucket_no_upscale=o.bucket_no_upscale,
    )
    spec, folder_problems = spec_from_config(d, o.batch_size, default_resolution)
    s = scan(spec, folder_problems)
    if o.verify:
        good = []
        for item in s.items:
            try:
                load_rgb(item.path)
                good.append(item)
            except ImageError as e:
                s.problems.append(Problem(item.path, str(e)))
        s.items = good
    plan = make_plan(s, spec, batch_size=o.batch_size, max_train_epochs=o.epochs, max_train_steps=o.max_train_steps,
                     steps_multiple=min(64, o.bucket_reso_steps) if o.enable_bucket else 64)
    report = plan_report(plan)
    report["items"] = [
        {"path": str(i.path), "size": list(i.size), "bucket": list(plan.assignment(i).bucket), "repeats": plan.repeats_of[id(i)],
         "is_reg": i.is_reg, "caption": i.caption, "caption_encoding": i.caption_encoding}
        for i in plan.items
    ]
    if o.tokens:
        from lora_train.dataset.captions import count_tokens, token_budget
        from lora_train.model.clip_files import clip_l_tokenizer

        tokenizer = clip_l_tokenizer()
        over = 0
        for row in report["items"]:
            n = max(count_tokens(line, tokenizer) for line in row["caption"].split("\n"))
            row["tokens"], row["token_budget"] = n, token_budget(n)
            over += n > 75
        if over:
            report["warnings"].append(msg("{count} captions are longer than 75 tokens: set max_token_length 150/225 or shorten them", count=over))
    if o.duplicates:
        dups = find_duplicates([i.path for i in plan.items])
        report["duplicates"] = [{"a": str(x.a), "b": str(x.b), "kind": x.kind, "distance": x.distance} for x in dups]
    return plan, report


def plan_report(plan) -> dict:
    """A plan as `format_report` and `--json` show it (`train --dry-run` too)."""
    report = plan.to_dict()
    report["images"] = plan.train_images
    report["problems"] = [{"path": str(p.path), "reason": p.reason} for p in plan.scan.problems + plan.problems]
    report["notes"] = [{"path": str(p.path), "reason": p.reason} for p in plan.scan.notes]
    return report


def format_report(r: dict) -> str:
    lines = [msg("images: {train} training ({train_samples} with repeats), {reg} regularization ({reg_samples} with repeats)",
                 train=r["images"], train_samples=r["train_samples"], reg=r["reg_images"], reg_samples=r["reg_samples"])]
    lines.append(msg("buckets:"))
    for b in r["buckets"]:
        w, h = b["resolution"]
        bar = "#" * min(40, b["count"])
        lines.append("  " + msg("{size} {count} samples  {batches} batches  waste {waste} {bar}", size=f"{w:>4}x{h:<4}",
                                count=f"{b['count']:>5}", batches=f"{b['batches']:>4}", waste=f"{b['waste']:<3}", bar=bar))
    lines.append(msg("steps: {per_epoch} per epoch x {epochs} epochs = {total} total", per_epoch=r["steps_per_epoch"],
                     epochs=r["epochs"], total=r["total_steps"]))
    lines.append(msg("guideline: images x repeats x (2 with flip, 4 without) = {total} (usual {low}-{high})",
                     total=r["guideline_total"], low=r["guideline_range"][0], high=r["guideline_range"][1]))
    if r.get("main_closeup_ratio"):
        lines.append(msg("main-visual : close-up = {ratio} : 1", ratio=f"{r['main_closeup_ratio']:.1f}"))
    for w in r["warnings"]:
        lines.append(msg("warning: {warning}", warning=w))
    if r["problems"]:
        lines.append(msg("problems ({count}):", count=len(r["problems"])))
        lines += ["  " + msg("{path}: {reason}", path=p["path"], reason=p["reason"]) for p in r["problems"]]
    if r["notes"]:
        lines.append(msg("notes ({count}):", count=len(r["notes"])))
        lines += ["  " + msg("{path}: {reason}", path=p["path"], reason=p["reason"]) for p in r["notes"]]
    if r.get("duplicates"):
        lines.append(msg("duplicates ({count}):", count=len(r["duplicates"])))
        lines += ["  " + (msg("exact: {a} = {b}", a=d["a"], b=d["b"]) if d["kind"] == "exact" else msg("near: {a} = {b}", a=d["a"], b=d["b"]))
                  for d in r["duplicates"]]
    return "\n".join(lines)
