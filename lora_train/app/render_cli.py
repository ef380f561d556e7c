"""The `reg-images` and `base-style` subcommands of `python -m lora_train` (the work is in
reg_images.py and base_style.py; this file parses and prints). Standalone, the renderer is our sampler."""

from __future__ import annotations

import sys
from pathlib import Path

from lora_train.errors import msg


def add_parsers(sub, tr, train, host) -> None:
    """`tr`: the CLI's translator; `train(config, loss_csv) -> Path`: the CLI's training run;
    `host(model, folder) -> Host`: the standalone host (the app layer does not import hosts)."""
    r = sub.add_parser("reg-images", help="render N regularization images of a class prompt with the model itself (cached)")
    r.add_argument("--model", required=True, help="checkpoint path, builtin:tiny, builtin:tinybase or builtin:tiny-sdxl")
    r.add_argument("--prompt", required=True, help="the class prompt, e.g. \"a photo of a girl\" (also each image's caption)")
    r.add_argument("--n", type=int, required=True)
    r.add_argument("--output", required=True, metavar="DIR", help="the cache: a folder per model and settings is made in it")
    _render_options(r)
    r.add_argument("--repeats", type=int, default=1, help="the <repeats>_<class> folder's repeats")
    r.set_defaults(func=lambda args: cmd_reg_images(args, tr, host))

    b = sub.add_parser("base-style", help="train NAME_BASE on the base model's own renders of the captions, then write NAME-distilled")
    b.add_argument("--config", required=True, help="the style run's config (its LoRA must be trained already)")
    b.add_argument("--n", type=int, help="images to render (default: one per training image)")
    b.add_argument("--cache", metavar="DIR", help="where rendered images are kept (default: OUTPUT_DIR/base-style-images)")
    _render_options(b)
    b.set_defaults(func=lambda args: cmd_base_style(args, tr, train, host))


def _render_options(p) -> None:
    p.add_argument("--size", metavar="W,H", help="default: the model's resolution (base-style: the run's)")
    p.add_argument("--seed", type=int, default=None, help="image i gets seed+i (default 1; base-style: the run's seed)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scale", type=float, default=7.0)
    p.add_argument("--sampler", default="euler_a")
    p.add_argument("--negative", default="")


def _settings(args, default_size: tuple[int, int], default_seed: int):
    from lora_train.app.reg_images import RenderSettings
    from lora_train.dataset.spec import parse_resolution

    width, height = parse_resolution(args.size, 0) if args.size else default_size
    return RenderSettings(width, height, default_seed if args.seed is None else args.seed, args.sampler, args.steps, args.scale, args.negative)


def cmd_reg_images(args, tr, make_host) -> int:
    from lora_train.app.reg_images import reg_images

    host = make_host(args.model, Path(args.output))
    size = host.model_resolution()
    folder = reg_images(host.txt2img, host.model_key(), args.prompt, args.n, _settings(args, (size, size), 1), args.output, args.repeats,
                        log=lambda m: print(tr(m), file=sys.stderr))
    print(tr(msg("reg_data_dir: {path}", path=folder)))
    return 0


def cmd_base_style(args, tr, train, make_host) -> int:
    from lora_train.app import base_style
    from lora_train.dataset.spec import parse_resolution
    from lora_train.train.config import TrainConfig

    config = TrainConfig.from_file(args.config)
    spec = config.model.pretrained_model_name_or_path
    if not spec:
        from lora_train.model import registry

        registry.load_model(spec)  # the error that says what to set
    out = Path(config.saving.output_dir)
    base_style.style_file(config)  # before the model loads
    host = make_host(spec, out)
    size, family = parse_resolution(config.dataset.resolution, host.model_resolution()), host.model_family()
    plan = base_style.prepare(config, host.txt2img, host.model_key(), args.cache or out / "base-style-images", args.n,
                              _settings(args, size, config.training.seed or 1), log=lambda m: print(tr(m), file=sys.stderr))
    del host  # training loads the model as a `train` run does
    name = plan.config.saving.output_name
    base_file = train(plan.config, out / f"{name}-loss.csv")
    if base_file is None:
        return 1
    path, notes = base_style.finish(plan, Path(base_file), family)
    for note in notes:
        print(tr(msg("note: {text}", text=note)), file=sys.stderr)
    print(tr(msg("LoRA: {path}", path=base_file)))
    print(tr(msg("wrote {path} = {formula}", path=path, formula=base_style.formula(plan.source.stem))))
    return 0
