"""`python -m lora_train ...`: the headless front end."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from lora_train.errors import UserError, msg


def _progress_listener(shown: frozenset[str] = frozenset()):
    """tqdm progress and the run's messages; `shown`: notes already printed (the config's)."""
    from tqdm import tqdm

    from lora_train.train import events as ev

    state: dict = {}

    def listen(e):
        if isinstance(e, ev.Started):
            for note in e.notes:
                if note not in shown:
                    print(f"{t('note')}: {tr(note)}", file=sys.stderr)
            print(tr(msg("training: {images} images, {epochs} epochs x {per_epoch} steps = {total} steps", images=e.num_images,
                             epochs=e.epochs, per_epoch=e.steps_per_epoch, total=e.total_steps)), file=sys.stderr)
            state["bar"] = tqdm(total=e.total_steps, unit="step", dynamic_ncols=True, file=sys.stderr)
        elif isinstance(e, ev.Step):
            bar = state["bar"]
            bar.update(1)
            # with scale_weight_norms, sd-scripts' bar shows the keys scaled and the average key norm too
            norms = {"keys_scaled": int(e.norms["max_norm/keys_scaled"]), "avg_key_norm": f"{e.norms['norm/avg_key_norm']:.4g}"} if e.norms else {}
            bar.set_postfix(epoch=e.epoch, loss=f"{e.loss:.4f}", **norms, refresh=False)
        elif isinstance(e, ev.CheckpointSaved):
            tqdm.write(tr(msg("saved {path}", path=e.path)), file=sys.stderr)
        elif isinstance(e, ev.Samples):
            tqdm.write(tr(msg("samples: {paths}", paths=", ".join(e.paths))), file=sys.stderr)
        elif isinstance(e, ev.Notice):
            tqdm.write(f"{t('note')}: {tr(e.text)}", file=sys.stderr)
        elif isinstance(e, (ev.Finished, ev.Cancelled, ev.Failed)):
            if "bar" in state:
                state["bar"].close()
            if isinstance(e, ev.Cancelled):
                print(tr(msg("cancelled at step {step}; saved {path}", step=e.step, path=e.path) if e.path
                             else msg("cancelled at step {step}", step=e.step)), file=sys.stderr)

    return listen


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _run_training(config, loss_csv: Path, estimate: bool = False) -> Path | None:
    from lora_train.app import job
    from lora_train.model.registry import load_adapter
    from lora_train.sample.previews import preview_fn
    from lora_train.train.estimate import RunTimer, after_run_lines
    from lora_train.train.observers import LossCsv
    from lora_train.train.trackers import build_trackers

    adapter = load_adapter(config.model.pretrained_model_name_or_path, config.model.clip_skip, config.model)
    # a cached estimate is shown for free; calibration steps run only for --estimate or max_train_minutes
    sample_fn = preview_fn(config, adapter)
    result, _, lines = job.prepare_estimate(config, adapter, calibrate=estimate, sample_fn=sample_fn)
    trainer = job.build_trainer(config, adapter, sample_fn=sample_fn)
    if not _is_main_process():  # under accelerate launch, rank 0 reports and writes
        return trainer.run(None, threading.Event())
    for line in lines:
        print(tr(line), file=sys.stderr)
    timer = RunTimer(adapter.device)
    listeners = [_progress_listener(frozenset(config.warnings + config.notes)), LossCsv(loss_csv), timer]
    listeners += build_trackers(config.logging, trainer.notes)
    plan = trainer.plan
    for problem in plan.scan.problems + plan.problems:
        print(f"{t('warning')}: {tr(msg('skipped {problem}', problem=problem))}", file=sys.stderr)
    for note in plan.scan.notes:
        print(f"{t('note')}: {tr(note)}", file=sys.stderr)
    for warning in plan.warnings:
        print(f"{t('warning')}: {tr(warning)}", file=sys.stderr)
    config.save_toml(Path(config.saving.output_dir) / f"{config.saving.output_name}.toml")
    cancel = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # first Ctrl-C stops cleanly and saves; a second one aborts
        cancel.set()
        signal.signal(signal.SIGINT, previous)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    try:
        return trainer.run(lambda e: [listen(e) for listen in listeners], cancel)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
        for line in after_run_lines(config, result, trainer.plan, timer) if result is not None else []:
            print(tr(line), file=sys.stderr)


def cmd_train(args) -> int:
    from lora_train.train.config import TrainConfig, parse_set_value

    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(msg("--set '{item}': expected key=value", item=item))
        config.update({key.strip(): parse_set_value(value.strip())}, source="--set")
    # before the model loads, so they are read even when the run then stops on another problem
    for warning in config.warnings:
        print(f"{t('warning')}: {tr(warning)}", file=sys.stderr)
    for note in config.notes:
        print(f"{t('note')}: {tr(note)}", file=sys.stderr)
    from lora_train.train.trackers import check_trackers

    check_trackers(config.logging)  # before the model loads: a tracker asked for is never skipped
    if args.dry_run:
        return _dry_run(config, args.estimate)
    out = Path(config.saving.output_dir)
    path = _run_training(config, out / f"{config.saving.output_name}-loss.csv", args.estimate)
    if path and _is_main_process():
        print(tr(msg("LoRA: {path}", path=path)))
        _print_ranking(out, config.saving.output_name)
    return 0


def _print_ranking(folder: Path, name: str) -> None:
    """After a run with validation_split, `pick`'s ranking of its saves (the CLI writes no cards to note it in)."""
    from lora_train.tools.pick import rank_if_validated, report_lines

    try:
        ranking = rank_if_validated(folder, name)
    except UserError as e:  # the run itself went fine
        print(f"{t('note')}: {tr(str(e))}", file=sys.stderr)
        return
    if ranking is not None:
        print(tr("\n".join(report_lines(ranking))))


def _dry_run(config, estimate: bool = False) -> int:
    """The effective config (TOML, on stdout) and what a run would do, without loading the model;
    with `estimate`, the model is loaded for the estimate (a few calibration steps unless cached),
    and max_train_minutes fits the epochs as the run would."""
    import tomli_w

    from lora_train.app.dry_run import dry_run
    from lora_train.dataset.check import format_report, plan_report

    lines = []
    if estimate:
        from lora_train.app import job
        from lora_train.model.registry import load_adapter
        from lora_train.sample.previews import preview_fn

        adapter = load_adapter(config.model.pretrained_model_name_or_path, config.model.clip_skip, config.model)
        lines = job.prepare_estimate(config, adapter, calibrate=True, sample_fn=preview_fn(config, adapter))[2]
    elif config.training.max_train_minutes is not None:
        lines = [msg("max_train_minutes: the epochs are fitted to it when the run starts (add --estimate to see them now)")]
    result = dry_run(config)
    print(tomli_w.dumps(config.to_toml_dict()))
    for note in result.notes:
        print(f"{t('note')}: {tr(note)}", file=sys.stderr)
    print(tr("\n".join([
        msg("# dry run: the model was loaded for the estimate; nothing was trained") if estimate
        else msg("# dry run: nothing was loaded or trained"),
        msg("model:    {model} ({family}, {resolution} px)", model=config.model.pretrained_model_name_or_path, family=result.family,
            resolution=result.resolution),
        msg("network:  {modules} modules, {parameters} parameters", modules=result.targets,
            parameters="?" if result.parameters is None else f"{result.parameters:,}"),
        format_report(plan_report(result.plan)),
        *lines,
    ])))
    return 0


def cmd_demo(args) -> int:
    """A concept LoRA on the tiny pretrained base, scored before and after: the trainer teaches."""
    from lora_train.testing import fidelity
    from lora_train.train.observers import LossCsv

    out = Path(args.output)
    # the fidelity test's own defaults where the user gave nothing, so the two cannot drift apart
    given = {k: v for k, v in (("epochs", args.epochs), ("reg_images", args.reg)) if v is not None}
    opts = fidelity.FidelityOptions(output=out, eval_prompts=args.prompts, collateral_prompts=args.collateral_prompts,
                                    output_name="demo-zkz", **given)
    started = time.time()
    report = fidelity.run(opts, log=lambda m: print(m, file=sys.stderr), listeners=[_progress_listener(), LossCsv(out / "loss.csv")])
    print(tr(msg("taught: a purple-over-orange colour pattern the base never saw, under the trigger word '{trigger}' "
                 "({images} images in {folder})", trigger=fidelity.TRIGGER, images=opts.images, folder=out / "dataset")))
    print(fidelity.format_table(report))
    print(tr("\n".join([
        msg("grid:      {path}  (rows: base and each saved epoch; columns: LoRA weight 1, 0.5, 0)", path=report.grid),
        msg("LoRA:      {path}", path=report.final.file),
        msg("config:    {path}", path=out / (Path(report.final.file).stem + ".toml")),
        msg("inspect:   {command}", command=f"python -m lora_train info {report.final.file}"),
        msg("done in {seconds} s", seconds=f"{time.time() - started:.0f}"),
    ])))
    # the acceptance bar, so a new user reads whether training worked instead of judging a table
    bar = fidelity.Thresholds()
    problems = fidelity.failures(report, bar)
    if problems:
        print(tr(msg("FAIL: {reasons}", reasons="; ".join(problems))))
        return 1
    print(tr(msg("PASS: concept {at_1} at weight 1 (bar {bar_1}), {at_0} at weight 0 (base {base} + {off}), "
                 "collateral drop {drop} (bar {bar_drop}), held-out loss lowest at weight {best}",
                 at_1=f"{report.weights['1.0']:.2f}", bar_1=f">= {bar.concept_at_1:.2f}", at_0=f"{report.weights['0.0']:.2f}",
                 base=f"{report.base_rate:.2f}", off=f"{bar.off_above_base:.2f}", drop=f"{report.collateral_drop:+.2f}",
                 bar_drop=f"<= {bar.collateral_drop:.2f}", best=f"{report.best_weight:g}")))
    return 0


def cmd_ui(args) -> int:
    from lora_train.ui.app import serve

    from lora_train.access import AccessPolicy

    access = AccessPolicy.build(args.dataset_root or [Path.cwd()], remote=args.listen,
                                insecure_allowed=args.enable_insecure_extension_access)
    serve(args.model, args.port, args.listen, args.lang, Path(args.lora_dir).resolve(), Path(args.work_dir).resolve(), access)
    return 0


def cmd_info(args) -> int:
    from lora_train.tools.inspect import inspect_lora

    report = inspect_lora(args.file)
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
        return 0 if report["valid"] else 1
    print(tr("\n".join([
        msg("file:          {path}", path=report["file"]),
        msg("network:       {network} ({modules} modules, ranks {ranks}, {conv} conv 3x3)", network=report["network"],
            modules=report["modules"], ranks=report["ranks"], conv=report["conv_modules"]),
        msg("architecture:  {architecture}", architecture=report["architecture"]),
    ])))
    for prefix, count in report["modules_per_prefix"].items():
        print(f"  {prefix:<11} {count}")
    for key, value in report["summary"].items():
        print(f"{key}: {value}")
    if report["tag_frequency"]:
        for folder, tags in report["tag_frequency"].items():
            top = sorted(tags.items(), key=lambda kv: -kv[1])[:10]
            print(tr(msg("tags in {folder}: {tags}", folder=folder, tags=", ".join(f"{tag} ({n})" for tag, n in top))))
    if report["hash_ok"] is False:
        print(tr(msg("warning: sshs_model_hash does not match the tensor data")))
    if report["valid"]:
        print(tr(msg("valid: every key is a kohya LoRA name, and every module has all the keys of its algorithm")))
        return 0
    print(tr(msg("INVALID: {count} problems", count=len(report["problems"]))))
    for p in report["problems"][:50]:
        print(f"  {tr(p)}")
    return 1


def cmd_pick(args) -> int:
    from lora_train.tools.pick import rank, report_lines, side_by_side

    ranking = rank(args.run)
    print(tr("\n".join(report_lines(ranking))))
    if args.grid and side_by_side(ranking, Path(args.grid)):
        print(tr(msg("previews side by side: {path}", path=args.grid)))
    return 0


def cmd_targets(args) -> int:
    from lora_train.model.reference import describe, reference_targets

    targets = reference_targets(args.arch, conv=args.conv)
    rows = [describe(t, args.dim, args.conv_dim) for t in targets]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        names = [r["name"] for r in rows]
        print("\n".join(names))
        counts: dict[str, int] = {}
        for r in rows:
            prefix = "lora_unet" if r["name"].startswith("lora_unet_") else r["name"].split("_text_model")[0]
            counts[prefix] = counts.get(prefix, 0) + 1
        print(tr(msg("# {count} modules: {counts}", count=len(rows), counts=", ".join(f"{k} {v}" for k, v in counts.items()))),
              file=sys.stderr)
    return 0


def sample_command(model_spec: str, loras: list[tuple[str, float]], prompt: str, **options) -> list[Path]:
    """`python -m lora_train sample`: load the model, then render with the LoRA files applied."""
    from lora_train.model import registry
    from lora_train.sample.render import sample_with_loras

    return sample_with_loras(registry.load_adapter(model_spec), loras, prompt, **options)


def cmd_sample(args) -> int:
    from lora_train.sample.render import parse_lora_arg

    paths = sample_command(args.model, [parse_lora_arg(x) for x in args.lora or []], args.prompt, n=args.n, seed=args.seed,
                           output_dir=args.output, steps=args.steps, width=args.width, height=args.height, scale=args.scale,
                           sampler=args.sampler, negative=args.negative)
    for p in paths:
        print(p)
    return 0


def cmd_config_from_lora(args) -> int:
    from lora_train.network.files import load_lora
    from lora_train.train.from_metadata import config_from_metadata

    _, metadata = load_lora(args.file)
    if not any(k.startswith("ss_") for k in metadata):
        raise UserError(msg("{path}: has no ss_* training metadata to rebuild a config from", path=args.file))
    config, notes = config_from_metadata(metadata)
    for note in notes:
        print(f"{t('note')}: {tr(note)}", file=sys.stderr)
    if args.output:
        print(tr(msg("wrote {path}", path=config.save_toml(args.output))))
    else:
        import tomli_w

        print(tomli_w.dumps(config.to_toml_dict()))
    return 0


def cmd_bench(args) -> int:
    from lora_train.bench import format_bench, run_bench

    print(tr(format_bench(run_bench(args.arch, args.resolution, args.dim, batch=args.batch, steps=args.steps, network=args.network,
                                     attention=args.attention, text=args.text_encoder, keep_freed=not args.glibc_trimming))))
    return 0


def cmd_dataset_check(args) -> int:
    from lora_train.dataset.check import CheckOptions, check_dataset, format_report

    options = CheckOptions(
        resolution=args.resolution, batch_size=args.batch_size, epochs=args.epochs, enable_bucket=not args.no_bucket,
        min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale, caption_extension=args.caption_extension, reg_data_dir=args.reg_data_dir,
        in_json=args.in_json, dataset_repeats=args.dataset_repeats,
        duplicates=not args.no_duplicates, verify=args.verify, tokens=args.tokens,
    )
    _, report = check_dataset(args.dir, options)
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else tr(format_report(report)))
    return 0


def cmd_dataset_prepare(args) -> int:
    from lora_train.dataset.prepare import parse_size, prepare

    report = prepare(args.src, args.dst, parse_size(args.size), crop=args.crop, flip=args.flip)
    for path, reason in report.skipped:
        print(tr(msg("skipped {problem}", problem=msg("{path}: {reason}", path=path, reason=reason))), file=sys.stderr)
    print(tr(msg("wrote {count} images to {folder} ({upscaled} upscaled from smaller sources)", count=len(report.written),
                 folder=args.dst, upscaled=report.upscaled)))
    return 0


def cmd_lbw(args) -> int:
    from lora_train.tools.lbw import bake
    from lora_train.tools.merge import parse_presets

    path, notes = bake(args.input, args.output, args.weights, parse_presets(args.preset))
    for note in notes:
        print(f"{t('note')}: {tr(note)}", file=sys.stderr)
    print(tr(msg("wrote {path}", path=path)))
    return 0


def cmd_merge(args) -> int:
    from lora_train.tools.merge import merge, parse_presets

    targets = None
    if args.model:
        from lora_train.model import registry

        targets = registry.load_adapter(args.model).file_targets()
    path, notes = merge(args.formula, args.output, parse_presets(args.preset), args.rank, args.lora_dir, targets)
    for note in notes:
        print(f"{t('note')}: {tr(note)}", file=sys.stderr)
    print(tr(msg("wrote {path}", path=path)))
    return 0


def _standalone_host(model: str, folder: Path):
    from lora_train.host.standalone import StandaloneHost

    return StandaloneHost(model, folder, folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_train", description="LoRA Train: kohya-compatible LoRA training.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA from a config (sd-scripts key names)")
    t.add_argument("--config", help="config file: TOML (sd-scripts / lora-scripts keys) or a kohya_ss GUI .json")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    t.add_argument("--dry-run", action="store_true",
                   help="read and check the config, dataset and model family, print the effective config and the plan; load nothing, train nothing")
    t.add_argument("--estimate", action="store_true",
                   help="time per step, total time and peak memory from a few calibration steps on the loaded model (cached per "
                        "settings); with --dry-run the model is loaded for it. A cached estimate is shown at every start anyway")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="teach the built-in tiny base a new colour pattern, show it before and after, and say PASS or FAIL")
    d.add_argument("--output", default="demo-output", help="folder for the dataset, LoRA, loss log and grid")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default: as the fidelity test)")
    # smaller numbers make a quick smoke run of the same pipeline (the scores then mean little)
    # the defaults are the fidelity test's (64 and 256): the demo's verdict is the acceptance bar's, and on
    # 16 / 64 prompts sampling noise alone moved the numbers across it (0.88 and a drop of 0.11 where 64 / 256 gave 0.91 and 0.02)
    d.add_argument("--prompts", type=int, default=64, help="trigger prompts scored per LoRA weight")
    d.add_argument("--collateral-prompts", type=int, default=256, help="prompts without the trigger scored per epoch")
    d.add_argument("--reg", type=int, default=None, metavar="N", help="regularization images (default: as the fidelity test)")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="metadata and key check of a LoRA file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    pk = sub.add_parser("pick", help="rank a run's saved epochs by validation loss and suggest one")
    pk.add_argument("run", metavar="RUN_OR_FOLDER", help="the run's output_dir, one of its saves, its <name>-loss.csv, or FOLDER/NAME")
    pk.add_argument("--grid", metavar="OUT.png", help="also paste the saves' preview images side by side into this image")
    pk.set_defaults(func=cmd_pick)

    ds = sub.add_parser("dataset", help="check or prepare a dataset folder").add_subparsers(dest="dataset_command", required=True)
    c = ds.add_parser("check", help="scan report, problems, buckets and step plan of a kohya folder or dataset TOML")
    c.add_argument("dir", help="train_data_dir (with <repeats>_<name> folders) or an sd-scripts dataset .toml")
    c.add_argument("--resolution", help="training resolution, 512 or 512,768 (default 512)")
    c.add_argument("--batch-size", type=int, default=1)
    c.add_argument("--epochs", type=int)
    c.add_argument("--min-bucket-reso", type=int, default=256)
    c.add_argument("--max-bucket-reso", type=int, default=1024)
    c.add_argument("--bucket-reso-steps", type=int, default=64)
    c.add_argument("--bucket-no-upscale", action="store_true")
    c.add_argument("--no-bucket", action="store_true", help="one fixed resolution (sd-scripts without --enable_bucket)")
    c.add_argument("--caption-extension")
    c.add_argument("--reg-data-dir")
    c.add_argument("--in-json", help="sd-scripts' fine-tuning metadata JSON for the images directly in DIR")
    c.add_argument("--dataset-repeats", type=int, default=1, help="repeats of the in-json images")
    c.add_argument("--no-duplicates", action="store_true", help="skip the duplicate search")
    c.add_argument("--verify", action="store_true", help="decode every image fully instead of reading headers")
    c.add_argument("--tokens", action="store_true", help="count CLIP tokens per caption against the 75/150/225 limits")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_dataset_check)
    pr = ds.add_parser("prepare", help="crop and resize a folder into a new folder (never writes into SRC)")
    pr.add_argument("src")
    pr.add_argument("dst")
    pr.add_argument("--size", required=True, help="WxH (multiples of 64) or a preset such as sd15-512x768")
    pr.add_argument("--crop", choices=["center", "focus"], default="center")
    pr.add_argument("--flip", action="store_true", help="also write horizontally flipped copies")
    pr.set_defaults(func=cmd_dataset_prepare)

    sp = sub.add_parser("sample", help="render images with a model and LoRAs (Euler a / DDIM)")
    sp.add_argument("--model", required=True, help="checkpoint path, builtin:tiny, builtin:tinybase or builtin:tiny-sdxl")
    sp.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--negative", default="")
    sp.add_argument("--n", type=int, default=1)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--steps", type=int, default=30)
    sp.add_argument("--width", type=int, default=512)
    sp.add_argument("--height", type=int, default=512)
    sp.add_argument("--scale", type=float, default=7.5)
    sp.add_argument("--sampler", default="euler_a")
    sp.add_argument("--output", required=True)
    sp.set_defaults(func=cmd_sample)

    cf = sub.add_parser("config-from-lora", help="rebuild a training config (TOML) from a LoRA's ss_* metadata")
    cf.add_argument("file")
    cf.add_argument("--output", help="write the TOML here instead of printing it")
    cf.set_defaults(func=cmd_config_from_lora)

    bn = sub.add_parser("bench", help="median LoRA training step vs the bare UNet forward+backward")
    bn.add_argument("--arch", choices=["sd15", "tiny", "sdxl", "tiny-sdxl"], default="tiny",
                    help="sdxl: full-size SDXL UNet (sgm's class with --sgm-path, else the same shapes from ldm's)")
    bn.add_argument("--resolution", type=int, default=256)
    bn.add_argument("--dim", type=int, default=32)
    bn.add_argument("--batch", type=int, default=1)
    bn.add_argument("--steps", type=int, default=5)
    bn.add_argument("--network", choices=["lora", "loha", "lokr", "dora"], default="lora",
                    help="the algorithm to time (LyCORIS' loha / lokr, or LoRA with DoRA)")
    bn.add_argument("--text-encoder", action="store_true",
                    help="also train the text encoder (a LoRA on CLIP, random token ids); the floor runs it frozen")
    bn.add_argument("--attention", choices=["sdpa", "model"], default="sdpa",
                    help="sdpa: PyTorch's fused attention, as a run outside the WebUI trains; model: the classes' own einsum attention")
    bn.add_argument("--glibc-trimming", action="store_true",
                    help="time both steps with glibc's own trimming of freed memory, not the setting a CPU run has (train/memory.py)")
    bn.set_defaults(func=cmd_bench)

    u = sub.add_parser("ui", help="serve the Train tab without the WebUI (standalone host)")
    u.add_argument("--model", required=True, help="builtin:tiny, builtin:tinybase, builtin:tiny-sdxl or a checkpoint file")
    u.add_argument("--port", type=int, default=7861)
    u.add_argument("--listen", action="store_true", help="serve on all interfaces, not only 127.0.0.1")
    u.add_argument("--lang", default=None, help="UI language, e.g. zh_CN (localizations/*.json)")
    u.add_argument("--lora-dir", default="lora-train-output/Lora", help="where LoRA files are published")
    u.add_argument("--work-dir", default="lora-train-output/runs", help="run state, samples, loss logs")
    u.add_argument("--dataset-root", action="append", metavar="DIR",
                   help="with --listen, the Dataset tab opens only folders under these (repeatable; default: the current folder)")
    u.add_argument("--enable-insecure-extension-access", action="store_true",
                   help="with --listen, allow any folder, moving files and model downloads (as the WebUI's flag)")
    u.set_defaults(func=cmd_ui)

    lb = sub.add_parser("lbw", help="bake lora-block-weight's block weights into a new LoRA file")
    lb.add_argument("input")
    lb.add_argument("output", help="the new file (never the input)")
    lb.add_argument("--weights", required=True, help="a preset (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5) "
                                                      "or 17/26 (SD1/SD2) or 12/20 (SDXL) comma-separated values")
    lb.add_argument("--preset", action="append", metavar="NAME:V1,V2,...", help="a preset of your own (repeatable)")
    lb.set_defaults(func=cmd_lbw)

    mg = sub.add_parser("merge", help="merge / subtract LoRAs with SuperMerger's formula, e.g. \"A:1:GP1,B:-1:GP2\"")
    mg.add_argument("formula", help="NAME:RATIO[:PRESET or block values],... ; NAME is a file or a LoRA in --lora-dir")
    mg.add_argument("--preset", action="append", metavar="NAME:V1,V2,...", help="block weights the formula names (repeatable)")
    mg.add_argument("--output", required=True)
    mg.add_argument("--rank", type=int, help="SVD to this rank (default: exact, the inputs' ranks side by side)")
    mg.add_argument("--model", help="the base model (checkpoint, builtin:tiny ...): needed for IA3, OFT, GLoRA and DoRA inputs")
    mg.add_argument("--lora-dir", help="where LoRA names are looked up (default: the current folder)")
    mg.set_defaults(func=cmd_merge)

    for needs_model in (t, sp, bn, u):
        needs_model.add_argument("--sgm-path", metavar="DIR",
                                 help="SDXL: Stability AI's generative-models checkout (or a WebUI folder, which has one in repositories/); "
                                      "default: $LORA_TRAIN_SGM_PATH")

    g = sub.add_parser("targets", help="the kohya module names a LoRA trains on an architecture")
    g.add_argument("--arch", required=True, choices=["sd15", "sd21", "sdxl"])
    g.add_argument("--conv", action="store_true", help="LoCon: include resnet and down/upsampler convs")
    g.add_argument("--dim", type=int, default=4, help="rank for the shapes shown (default 4, as sd-scripts)")
    g.add_argument("--conv-dim", type=int, default=4)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_targets)

    from lora_train.tagging.cli import add_parsers as add_tagging_parsers

    add_tagging_parsers(sub, t=t, tr=tr)
    from lora_train.tools.weights_cli import add_parsers as add_weights_parsers

    add_weights_parsers(sub, tr=tr)  # resize, bake, extract
    from lora_train.app.render_cli import add_parsers as add_render_parsers

    add_render_parsers(sub, tr=tr, train=_run_training, host=_standalone_host)  # reg-images, base-style
    return p


def _language() -> str | None:
    """The CLI's language: LORA_TRAIN_LANG (e.g. zh_CN), else the locale's when a translation exists."""
    from lora_train.ui import i18n

    wanted = os.environ.get("LORA_TRAIN_LANG") or os.environ.get("LC_ALL") or os.environ.get("LC_MESSAGES") or os.environ.get("LANG") or ""
    wanted = wanted.split(".")[0]
    if wanted in i18n.available():
        return wanted
    return next((lang for lang in i18n.available() if wanted and lang.split("_")[0] == wanted.split("_")[0]), None)


@functools.lru_cache(maxsize=1)
def _translator():
    """Errors, warnings and notes in the user's language (the same table as the tabs), made once."""
    from lora_train.ui.i18n import Translator

    try:
        return Translator(_language())
    except UserError:
        return Translator()


def t(text: str) -> str:
    """A fixed UI word ("error", "warning") in the user's language."""
    return _translator()(text)


def tr(message) -> str:
    """A message (`errors.msg`, an error) in the user's language."""
    return _translator().text(message)


# Notices from libraries under ours that a user can do nothing about, printed before our own output:
# ldm imports open_clip, which imports timm's old module path; lightning_fabric and torch repeat
# advice meant for their own users. Only these are silenced; our own warnings still print.
KNOWN_WARNINGS = (
    (FutureWarning, r"Importing from timm\.models\.(layers|registry|helpers) is deprecated", "timm"),
    (UserWarning, r"", "lightning_fabric"),
    (UserWarning, r"", "pytorch_lightning"),
    (FutureWarning, r"You are using `torch\.load` with `weights_only=False`", ""),
)


def silence_known_warnings() -> None:
    import warnings

    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def show_our_warnings() -> None:
    """A TOML file read after normalising pasted text (a dataset config, a prompts file) says so in
    one `warning:` line, in the user's language, instead of Python's warning format."""
    import warnings

    from lora_train.tomlfile import PastedTextWarning

    previous = warnings.showwarning
    if getattr(previous, "lora_train", False):  # main() called again in one process (tests)
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PastedTextWarning):
            print(f"{t('warning')}: {tr(str(message))}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    show.lora_train = True
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    silence_known_warnings()
    show_our_warnings()
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "sgm_path", None):
            from lora_train.model.sgm_import import ENV, import_sgm

            import_sgm(args.sgm_path)  # a wrong folder is an error now, not a fallback later
            os.environ[ENV] = args.sgm_path
        return args.func(args)
    except UserError as e:
        print(f"{t('error')}: {tr(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(tr(msg("interrupted")), file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
