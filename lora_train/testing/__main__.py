"""`python -m lora_train.testing build-base | refine-base | fidelity | score | install-base | install-tiny-sdxl`."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see lora_train/__main__.py


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_train.testing", description="The tiny pretrained base and the LoRA fidelity test.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build-base", help="train the tiny base from scratch (about 50 min on 2 CPU cores)")
    p.add_argument("--output", required=True)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--unet-steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-free-colours", action="store_true",
                   help="train the VAE also on scene layouts with objects of any colour, one or two (off in the committed base)")
    p.add_argument("--vae-object-weight", type=float, default=0.0,
                   help="weigh the VAE's loss on object pixels this much more than on background (0 in the committed base)")
    p = sub.add_parser("refine-base", help="train a built base's decoder, then its UNet and text encoder, on (the committed base is its UNet step "
                                           "over the first stage: the command is in lora_train/testing/base_refine.py)")
    p.add_argument("--output", required=True)
    p.add_argument("--source", help="the built base to start from (default: the committed base)")
    p.add_argument("--decoder-steps", type=int)
    p.add_argument("--unet-steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("install-base", help="copy the base (+ yaml + tokenizer folder) into a folder such as the WebUI's models/Stable-diffusion")
    p.add_argument("folder")
    p = sub.add_parser("install-tiny-sdxl", help="write a tiny SDXL-architecture checkpoint (random weights, + yaml + tokenizer "
                                                 "folder) that the WebUI loads as SDXL; needs sgm")
    p.add_argument("folder")
    p.add_argument("--name", default="tinyxl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sgm-path", help="generative-models checkout or WebUI folder (default: $LORA_TRAIN_SGM_PATH)")
    p = sub.add_parser("fidelity", help="train a concept LoRA on the base, then score it at weights 1.0 / 0.5 / 0.0")
    # None: FidelityOptions' default, so the defaults live in one place
    p.add_argument("--output", default="fidelity-output")
    p.add_argument("--network", choices=("lora", "locon", "loha", "lokr", "dora"))  # fidelity.NETWORKS (not imported here: torch)
    p.add_argument("--steps", type=int, help="train this many steps instead of the default epochs")
    p.add_argument("--epochs", type=int)
    p.add_argument("--no-text-encoder", action="store_true", help="train the UNet only")
    p.add_argument("--concept", choices=("object", "style"),
                   help="object: a new colour pattern under the trigger (default); style: the base's objects in pastel, ', zkz style' after the caption")
    p.add_argument("--reg", type=int, metavar="N", help="N regularization images rendered by the base (prior preservation; 0: none)")
    p.add_argument("--prompts", type=int, help="trigger prompts per weight")
    p.add_argument("--collateral-prompts", type=int, help="prompts without the trigger")
    p.add_argument("--reg-scale", type=float, help="CFG scale of the regularization renders (1: the base's own unguided samples)")
    p.add_argument("--scale", type=float, help="CFG scale of every render (the WebUI's default is 7)")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", help="a checkpoint (with its .yaml) instead of the committed tiny base")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--controls", action="store_true",
                   help="then run every negative control (controls.CONTROLS) at the same length and prompts; each must fail the bar")
    p = sub.add_parser("score", help="labels of scene images: background, colour, shape, position")
    p.add_argument("images", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> int:
    from lora_train.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "build-base":
            from lora_train.testing.base import build_base

            build_base(args.output, vae_steps=args.vae_steps, unet_steps=args.unet_steps, seed=args.seed, log=lambda m: print(m, flush=True),
                       vae_free_colours=args.vae_free_colours, vae_object_weight=args.vae_object_weight)
        elif args.command == "refine-base":
            from lora_train.testing.base_refine import refine_base

            steps = {k: v for k, v in (("decoder_steps", args.decoder_steps), ("unet_steps", args.unet_steps)) if v is not None}
            refine_base(args.output, source=args.source, seed=args.seed, log=lambda m: print(m, flush=True), **steps)
        elif args.command == "install-base":
            from lora_train.testing.base import install_base

            print(install_base(args.folder))
        elif args.command == "install-tiny-sdxl":
            from pathlib import Path

            from lora_train.model.sgm_import import ENV, import_sgm
            from lora_train.model.tiny_sdxl import build_tiny_sdxl, save_tiny_sdxl

            import_sgm(args.sgm_path)
            if args.sgm_path:
                os.environ[ENV] = args.sgm_path
            print(save_tiny_sdxl(build_tiny_sdxl(args.seed, sgm=True), Path(args.folder) / f"{args.name}.safetensors"))
        elif args.command == "score":
            import json

            from lora_train.testing.scorer import score

            for path in args.images:
                print(json.dumps({"file": path, **score(path).as_dict()}))
        elif args.command == "fidelity":
            return _fidelity(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _fidelity(args) -> int:
    import json
    from pathlib import Path

    from lora_train.testing import fidelity

    given = {"network": args.network, "concept": args.concept, "steps": args.steps, "epochs": args.epochs, "reg_images": args.reg,
             "eval_prompts": args.prompts, "collateral_prompts": args.collateral_prompts, "scale": args.scale,
             "reg_scale": args.reg_scale, "seed": args.seed, "model": args.model}
    opts = fidelity.FidelityOptions(output=Path(args.output), train_text_encoder=not args.no_text_encoder,
                                    **{k: v for k, v in given.items() if v is not None})
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    # the base's own renders are the same for the positive and every control: rendered once
    cache = opts.output / "render-cache" if args.controls else None
    report = fidelity.run(opts, log=log, cache=cache)
    problems = fidelity.failures(report)
    results = []
    if args.controls:
        from lora_train.testing import controls

        results = controls.run_controls(opts, report, log=log, cache=cache)
    if args.json:
        extra = {"controls": [{"name": r.name, "failures": r.failures, "weights": r.report.weights, "collateral_drop": r.report.collateral_drop,
                               "best_weight": r.report.best_weight} for r in results]} if args.controls else {}
        print(json.dumps(dict(report.as_dict(), passed=not problems, failures=problems, **extra)))
    else:
        print(fidelity.format_table(report))
        print("PASS" if not problems else "FAIL: " + "; ".join(problems))
        if args.controls:
            print(controls.format_controls(results))
    # a control that passes the bar shows the bar cannot tell a broken run from a working one
    return 0 if not problems and all(r.failed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
