"""The `resize`, `bake` and `extract` subcommands of `python -m lora_train` (the work is in
resize.py, bake.py and extract.py; this file parses and prints)."""

from __future__ import annotations

import sys

from lora_train.errors import msg


def add_parsers(sub, tr) -> None:
    """`tr`: the CLI's translator of a message into the user's language."""
    from lora_train.tools.lowrank import DYNAMIC_METHODS, PRECISIONS

    r = sub.add_parser("resize", help="a LoRA file at another rank by SVD (sd-scripts' resize_lora.py)")
    r.add_argument("input", metavar="IN")
    r.add_argument("output", metavar="OUT")
    r.add_argument("--rank", type=int, required=True, help="the new rank (with --dynamic: the largest rank)")
    r.add_argument("--new-conv-rank", type=int, help="rank of convs larger than 1x1 (default: --rank)")
    r.add_argument("--dynamic", choices=DYNAMIC_METHODS, help="pick each module's rank from its singular values")
    r.add_argument("--param", type=float, help="the dynamic method's target (sv_ratio: max/min singular value; sv_fro, sv_cumulative: 0-1)")
    r.add_argument("--save-precision", choices=list(PRECISIONS), help="default: float, as sd-scripts")
    r.add_argument("--model", help="checkpoint (or builtin:*) whose modules shape non-LoRA modules (LoHa, LoKr, DoRA ...); "
                                   "default: the reference model of the file's base model version")
    r.set_defaults(func=lambda args: cmd_resize(args, tr))

    b = sub.add_parser("bake", help="merge LoRA files into a checkpoint, written as a new checkpoint")
    b.add_argument("checkpoint", metavar="CKPT")
    b.add_argument("loras", metavar="LORA[:W]", nargs="+")
    b.add_argument("--output", required=True, help="the new .safetensors checkpoint (never CKPT)")
    b.set_defaults(func=lambda args: cmd_bake(args, tr))

    e = sub.add_parser("extract", help="a LoRA from the weight difference of two checkpoints (sd-scripts' extract_lora_from_models.py)")
    e.add_argument("base", metavar="BASE")
    e.add_argument("tuned", metavar="TUNED")
    e.add_argument("--rank", type=int, required=True)
    e.add_argument("--conv-rank", type=int, help="also convs larger than 1x1 (LoCon), at this rank")
    e.add_argument("--output", required=True)
    e.add_argument("--clamp-quantile", type=float, default=0.99, help="clamp the factors to this quantile of their values (1: no clamp)")
    e.add_argument("--min-diff", type=float, default=0.01, help="the text encoder is extracted only when it differs by more than this")
    e.add_argument("--save-precision", choices=list(PRECISIONS), help="default: float, as sd-scripts")
    e.set_defaults(func=lambda args: cmd_extract(args, tr))


def _notes(notes, tr) -> None:
    for note in notes:
        print(tr(msg("note: {text}", text=note)), file=sys.stderr)


def cmd_resize(args, tr) -> int:
    from lora_train.tools.resize import average_retention, resize

    result = resize(args.input, args.output, args.rank, args.new_conv_rank, args.dynamic, args.param, args.save_precision, args.model)
    for m in result.modules:
        numbers = dict(name=f"{m.name:75}", sum=f"{m.sum_retained:.1%}", fro=f"{m.fro_retained:.1%}", ratio=f"{m.max_ratio:0.1f}")
        if args.dynamic:
            print(tr(msg("{name} | sum(S) retained: {sum}, fro retained: {fro}, max(S) ratio: {ratio}, dynamic | dim: {rank}, alpha: {alpha}",
                         rank=m.rank, alpha=m.alpha, **numbers)))
        else:
            print(tr(msg("{name} | sum(S) retained: {sum}, fro retained: {fro}, max(S) ratio: {ratio}", **numbers)))
    average = average_retention(result.modules)
    if average:
        print(tr(average))
    _notes(result.notes, tr)
    print(tr(msg("wrote {path}", path=result.path)))
    return 0


def cmd_bake(args, tr) -> int:
    from lora_train.tools.bake import bake, parse_lora_weight

    result = bake(args.checkpoint, [parse_lora_weight(x) for x in args.loras], args.output)
    _notes(result.notes, tr)
    print(tr(msg("baked {modules} LoRA modules into {tensors} tensors: wrote {path}", modules=result.modules, tensors=result.tensors,
                 path=result.path)))
    return 0


def cmd_extract(args, tr) -> int:
    from lora_train.tools.extract import extract

    result = extract(args.base, args.tuned, args.rank, args.output, args.conv_rank, args.clamp_quantile, args.min_diff, args.save_precision)
    _notes(result.notes, tr)
    print(tr(msg("extracted {modules} modules: wrote {path}", modules=result.modules, path=result.path)))
    return 0
