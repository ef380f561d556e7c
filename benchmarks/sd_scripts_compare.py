"""Benchmark: our `train` beside sd-scripts' `train_network.py`, same checkpoint, data and settings.

    .venv/bin/python -m benchmarks.sd_scripts_compare --checkpoint SD15.safetensors --data DIR \\
        [--sizes 256 512] [--steps 8] [--warmup 2] [--rounds 2] [--make-missing] \\
        [--sd-scripts DIR --sd-scripts-python PY] [--tokenizer-cache DIR] [--work DIR] [--json FILE]

Each round runs, for every size, both tools one after the other as child processes, the order
flipped every round (ours first in rounds 0, 2, ..., sd-scripts first in rounds 1, 3, ...), so a machine that
gets busier or quieter over the run slows both alike. Without `--sd-scripts` only ours runs.

The settings (SETTINGS, one dict of sd-scripts key names) are written once: as the TOML our
`python -m lora_train train --config` reads, and as the `--key value` arguments of
`train_network.py`. LoRA dim 32 / alpha 16 on the UNet and the text encoder (both trained), batch 1,
AdamW, constant learning rates (UNet 1e-4, text encoder 5e-5), fp32 (`mixed_precision = "no"`),
latents cached in memory before the first step, no buckets, `sdpa`, seed 42, one process with no
DataLoader workers (`max_data_loader_n_workers = 0`: our trainer loads cached latents in the training
thread; sd-scripts' default would fork worker processes), CPU (no GPU is looked for: CUDA_VISIBLE_DEVICES
is emptied for both). Each run trains `warmup + steps` steps.

What differs and cannot be set the same:
- the latent cache: sd-scripts caches one sample of the VAE's posterior per image; we cache the
  posterior (mean and std) and draw a fresh sample each step (a few elementwise ops per step);
- the model classes: ours trains on ldm's UNet / VAE and transformers 4.30's CLIP text model (its
  attention swapped to SDPA), sd-scripts on its own UNet port and its transformers' CLIP; both read
  the same single-file checkpoint;
- sd-scripts' `--sdpa` is our only attention path (`sdpa` is accepted by ours with a note);
- sd-scripts marks the noisy latents as needing a gradient and, when the text encoder trains, its
  token embeddings too, so its backward runs on to the UNet's input and into the embedding table;
  ours stops at the first module with a LoRA. That is each tool's own cost, not a setting;
- `tokenizer_cache_dir` is what makes sd-scripts load the CLIP tokenizer from disk; ours builds the
  same files itself and notes the key.

s/step. Both tools draw a tqdm bar for the training steps (ours without a description, sd-scripts'
as "steps:") on stderr, and tqdm redraws it after every step when steps take over 0.1 s. The child's
stderr is read here as it comes (a pipe, split at "\\r" and "\\n") and the arrival time of the first
redraw showing step n is t(n); t(0) is the bar's first draw. Step n's time is t(n) - t(n-1): the
whole loop iteration as the tool runs it (batch, forward, backward, optimizer, its own logging),
measured by the same clock for both tools. The first `warmup` steps (at least 1) are dropped and the
result is the median of the remaining `steps`; the table also gives their min and max. A step the bar skipped
(never seen at these step times) shares the gap evenly with the steps before it. Model loading,
latent caching and the final save are outside the timed steps (the table's `wall` column has them):
ours encodes the latents after drawing its bar, so its step 1 includes the caching, hence the
warmup of at least one step.

Peak RSS is the kernel's high-water mark of the child's resident set over the whole run, loading
included: `ru_maxrss` from `wait4`, the figure `/usr/bin/time -v` prints as "Maximum resident set
size". It is the largest single process's (a process the child forks counts on its own, not added
on); with no DataLoader workers that is the trainer itself. A polled sum over the process tree would
be no better: both tools briefly fork helpers (sd-scripts runs `git`), and a fork's resident set
repeats its parent's shared pages.

Only the timing plumbing is checked in CI (tests/test_benchmarks_compare.py); a full run needs a
full-size SD1.5 checkpoint (`--make-missing` writes a random-weight one, fp32 ldm layout, 4.3 GB)
and, for the comparison, an sd-scripts checkout with its own Python environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

OURS = "ours"
SD_SCRIPTS = "sd-scripts"
TOKENIZER_ID = "openai/clip-vit-large-patch14"  # sd-scripts' SD1 tokenizer; tokenizer_cache_dir holds it as openai_clip-vit-large-patch14
OUTPUT_NAME = "bench"

# sd-scripts' names; one dict for both tools
SETTINGS = {
    "network_module": "networks.lora",
    "network_dim": 32,
    "network_alpha": 16,
    "train_batch_size": 1,
    "optimizer_type": "AdamW",
    "learning_rate": 1e-4,
    "unet_lr": 1e-4,
    "text_encoder_lr": 5e-5,
    "lr_scheduler": "constant",
    "max_grad_norm": 1.0,
    "mixed_precision": "no",
    "save_precision": "float",
    "save_model_as": "safetensors",
    "cache_latents": True,
    "caption_extension": ".txt",
    "max_data_loader_n_workers": 0,
    "sdpa": True,
    "seed": 42,
}

# tqdm's bar once it is split at \r: "[desc: ] NN%|bar| n/total [elapsed<left, rate, postfix]"
_BAR = {
    OURS: re.compile(r"^\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \["),
    SD_SCRIPTS: re.compile(r"^steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \["),
}


def settings_for(size: int, total_steps: int, checkpoint: Path, data: Path, out: Path, tokenizer_cache: Path | None) -> dict:
    s = dict(SETTINGS, pretrained_model_name_or_path=str(checkpoint), train_data_dir=str(data), output_dir=str(out),
             output_name=OUTPUT_NAME, resolution=f"{size},{size}", max_train_steps=total_steps)
    if tokenizer_cache is not None:
        s["tokenizer_cache_dir"] = str(tokenizer_cache)
    return s


def toml_text(settings: dict) -> str:
    """A flat TOML of `settings` (sd-scripts' own config files are flat; our loader reads them)."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a TOML basic string is a JSON string for these values
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def sd_scripts_args(settings: dict) -> list[str]:
    """`train_network.py`'s arguments for `settings`: `--key value`, a true flag as `--key`, a false one left out."""
    args = []
    for key, value in settings.items():
        if value is False or value is None:
            continue
        args.append(f"--{key}")
        if value is not True:
            args.append(str(value))
    return args


def command(tool: str, toml_path: Path, settings: dict, python: str, sd_scripts: Path | None) -> list[str]:
    if tool == OURS:
        return [python, "-m", "lora_train", "train", "--config", str(toml_path)]
    assert sd_scripts is not None
    return [python, str(sd_scripts / "train_network.py"), *sd_scripts_args(settings)]


def child_env(tool: str, repo: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    if tool == OURS:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    else:
        env.pop("PYTHONPATH", None)  # sd-scripts' own venv; nothing of ours
    return env


class BarClock:
    """Arrival times of a tqdm bar's step counts, fed with the child's stderr as it comes."""

    def __init__(self, pattern: re.Pattern, clock=time.monotonic):
        self.pattern = pattern
        self.clock = clock
        self.times: dict[int, float] = {}  # step n -> when a redraw first showed n
        self.total: int | None = None
        self._partial = ""

    def feed(self, text: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        parts = re.split(r"[\r\n]", self._partial + text)
        self._partial = parts.pop()  # the part after the last \r or \n may still grow
        for part in parts:
            self._line(part, now)
        # tqdm writes "\r" + bar and flushes: a redraw ends only where the next one starts, so the
        # open part is read now too (the pattern needs "n/total [", which a cut-off redraw lacks)
        self._line(self._partial, now)

    def close(self, now: float | None = None) -> None:
        if self._partial:
            self._line(self._partial, self.clock() if now is None else now)
            self._partial = ""

    def _line(self, line: str, now: float) -> None:
        m = self.pattern.match(line)
        if m:
            n, total = int(m.group(1)), int(m.group(2))
            if self.total is None:
                self.total = total
            if total == self.total and n not in self.times:
                self.times[n] = now


def step_seconds(times: dict[int, float]) -> list[float]:
    """Seconds of steps 1..N from the arrival times of counts 0..N; a count the bar skipped shares
    its gap evenly with the steps before it, back to the last count seen."""
    if 0 not in times:
        return []
    out = []
    last_n, last_t = 0, times[0]
    for n in sorted(k for k in times if k > 0):
        gap = n - last_n
        out += [(times[n] - last_t) / gap] * gap
        last_n, last_t = n, times[n]
    return out


def summarize(steps: list[float], warmup: int) -> dict:
    timed = steps[warmup:]
    if not timed:
        return {"s_per_step": None, "min": None, "max": None, "timed_steps": 0}
    return {"s_per_step": statistics.median(timed), "min": min(timed), "max": max(timed), "timed_steps": len(timed)}


@dataclass
class RunResult:
    tool: str
    size: int
    round: int
    returncode: int
    wall_s: float
    step_s: list[float] = field(default_factory=list)
    s_per_step: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    timed_steps: int = 0
    peak_rss_mb: float | None = None
    log: str = ""


def run_one(tool: str, cmd: list[str], env: dict, cwd: Path, log_path: Path, warmup: int, echo: bool = False) -> tuple[RunResult, BarClock]:
    """Run `cmd`, timing its training bar; its stdout and stderr go to `log_path`."""
    clock = BarClock(_BAR[tool])
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.PIPE)
        fd = proc.stderr.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            clock.feed(chunk.decode("utf-8", errors="replace"))
            log.write(chunk.decode("utf-8", errors="replace"))
            if echo:
                sys.stderr.write(chunk.decode("utf-8", errors="replace"))
                sys.stderr.flush()
        clock.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for its rusage
        proc.stderr.close()
    wall = time.monotonic() - started
    steps = step_seconds(clock.times)
    result = RunResult(tool, 0, 0, proc.returncode, wall, steps, log=str(log_path),
                       peak_rss_mb=usage.ru_maxrss / 1024)  # kB on Linux
    s = summarize(steps, warmup)
    result.s_per_step, result.min_s, result.max_s, result.timed_steps = s["s_per_step"], s["min"], s["max"], s["timed_steps"]
    return result, clock


def round_order(tools: list[str], round_index: int) -> list[str]:
    """Ours first in rounds 0, 2, ...; sd-scripts first in rounds 1, 3, ..."""
    return list(tools) if round_index % 2 == 0 else list(reversed(tools))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[RunResult]) -> str:
    head = f"{'tool':<11} {'size':>4} {'round':>5} {'s/step':>8} {'min':>7} {'max':>7} {'n':>3} {'peak RSS MB':>11} {'wall s':>7}  exit"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.tool:<11} {r.size:>4} {r.round:>5} {_fmt(r.s_per_step, '8.3f')} {_fmt(r.min_s, '7.3f')} {_fmt(r.max_s, '7.3f')} "
                    f"{r.timed_steps:>3} {_fmt(r.peak_rss_mb, '11.0f')} {r.wall_s:7.0f}  {r.returncode}")
    return "\n".join(rows)


def summary(results: list[RunResult], sizes: list[int]) -> tuple[str, list[dict]]:
    """Per size and tool: the median of the rounds' s/step and the largest peak RSS; the ratios ours / sd-scripts."""
    lines = [f"{'size':>4} {'tool':<11} {'s/step':>8} {'peak RSS MB':>11}", "-" * 37]
    rows = []
    for size in sizes:
        per = {}
        for tool in (OURS, SD_SCRIPTS):
            ok = [r for r in results if r.tool == tool and r.size == size and r.returncode == 0 and r.s_per_step is not None]
            if not ok:
                continue
            per[tool] = (statistics.median(r.s_per_step for r in ok), max(r.peak_rss_mb or 0 for r in ok))
            lines.append(f"{size:>4} {tool:<11} {per[tool][0]:8.3f} {per[tool][1]:11.0f}")
        row = {"size": size, **{f"{tool}_s_per_step": v[0] for tool, v in per.items()}, **{f"{tool}_peak_rss_mb": v[1] for tool, v in per.items()}}
        if OURS in per and SD_SCRIPTS in per:
            row["ratio_s_per_step"] = per[OURS][0] / per[SD_SCRIPTS][0]
            row["ratio_peak_rss"] = per[OURS][1] / per[SD_SCRIPTS][1]
            lines.append(f"{size:>4} {'ours/sds':<11} {row['ratio_s_per_step']:8.2f} {row['ratio_peak_rss']:11.2f}")
        rows.append(row)
    return "\n".join(lines), rows


# --- the inputs: a random-weight SD1.5 checkpoint, four images, the tokenizer folder -----------------------


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A full-size SD1.5 checkpoint with random weights, in the original single-file (ldm) layout, fp32:
    v1-inference's LatentDiffusion from ldm's classes, the UNet's zero-initialised output layers given
    small random weights and the text encoder's LayerNorms moved off weight 1 / bias 0 (tiny.py's
    `make_weights_visible`), so every LoRA gets a gradient and nothing is NaN."""
    import safetensors.torch
    import torch

    from lora_train.model.loading import V1_INFERENCE_CONFIG, instantiate
    from lora_train.model.tiny import seeded_build

    model = seeded_build(lambda: instantiate(V1_INFERENCE_CONFIG), seed, lambda m: [m.cond_stage_model])
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"non-finite weights: {bad[:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(state, str(tmp), metadata={"format": "pt", "note": f"random weights, seed {seed}"})
    os.replace(tmp, path)
    return path


SHAPES = [("red", "circle", (220, 40, 40)), ("blue", "square", (40, 60, 220)), ("green", "triangle", (40, 180, 60)),
          ("orange", "diamond", (240, 150, 30))]


def make_data(root: Path, size: int = 512, trigger: str = "zkz") -> Path:
    """Four `size`-px PNGs of a coloured shape on a grey ground with .txt captions, in kohya's
    `1_<trigger>/` folder (1 repeat). `root` is what train_data_dir names."""
    from PIL import Image, ImageDraw

    folder = root / f"1_{trigger}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (colour, shape, rgb) in enumerate(SHAPES):
        img = Image.new("RGB", (size, size), (200, 200, 200))
        d = ImageDraw.Draw(img)
        a, b = size // 4, 3 * size // 4
        if shape == "circle":
            d.ellipse([a, a, b, b], fill=rgb)
        elif shape == "square":
            d.rectangle([a, a, b, b], fill=rgb)
        elif shape == "triangle":
            d.polygon([(size // 2, a), (b, b), (a, b)], fill=rgb)
        else:
            d.polygon([(size // 2, a), (b, size // 2), (size // 2, b), (a, size // 2)], fill=rgb)
        img.save(folder / f"{i:02d}_{shape}.png")
        (folder / f"{i:02d}_{shape}.txt").write_text(f"{trigger}, a {colour} {shape} on a grey background\n", encoding="utf-8")
    return root


def make_tokenizer_cache(cache: Path) -> Path:
    """sd-scripts' tokenizer_cache_dir for SD1: `openai_clip-vit-large-patch14/` with the CLIP tokenizer
    files ours builds from open_clip's BPE (the same token ids as OpenAI's), so nothing is downloaded."""
    from lora_train.model import clip_files

    clip_files.write_clip_folder(cache / TOKENIZER_ID.replace("/", "_"), clip_files.CLIP_L_TEXT_CONFIG)
    return cache


# --- the run ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sd_scripts_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="an SD1.5 single-file .safetensors")
    p.add_argument("--data", type=Path, required=True, help="train_data_dir: a folder of kohya N_name/ folders")
    p.add_argument("--make-missing", action="store_true", help="write the checkpoint (random weights), the data and the tokenizer folder if missing")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (after the warmup)")
    p.add_argument("--warmup", type=int, default=2, help="steps per run not counted (at least 1)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sd-scripts", type=Path, help="an sd-scripts checkout (train_network.py); without it only ours runs")
    p.add_argument("--sd-scripts-python", default=None, help="the Python of sd-scripts' environment (default: this one)")
    p.add_argument("--python", default=sys.executable, help="the Python that runs ours (default: this one)")
    p.add_argument("--tokenizer-cache", type=Path, default=None,
                   help="sd-scripts' tokenizer_cache_dir (default: WORK/tokenizers, written with --make-missing)")
    p.add_argument("--work", type=Path, default=None, help="configs, logs and outputs (default: a new temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="write every run's numbers here")
    p.add_argument("--echo", action="store_true", help="show the children's stderr as it comes")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--steps, --warmup and --rounds must be 1 or more (ours caches the latents inside its step 1)")
    if args.sd_scripts is not None and not (args.sd_scripts / "train_network.py").is_file():
        p.error(f"--sd-scripts {args.sd_scripts}: no train_network.py there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo = Path(__file__).resolve().parent.parent
    work = args.work or Path(tempfile.mkdtemp(prefix="sds-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_cache = args.tokenizer_cache or work / "tokenizers"
    if args.make_missing:
        if not args.checkpoint.is_file():
            print(f"writing {args.checkpoint} (random weights) ...", file=sys.stderr)
            make_checkpoint(args.checkpoint)
        if not args.data.is_dir():
            make_data(args.data)
        if args.sd_scripts is not None:
            make_tokenizer_cache(tokenizer_cache)
    for path, what in ((args.checkpoint, "checkpoint"), (args.data, "data")):
        if not path.exists():
            raise SystemExit(f"{what} {path} does not exist (--make-missing writes it)")
    tools = [OURS] + ([SD_SCRIPTS] if args.sd_scripts is not None else [])
    total = args.warmup + args.steps
    results: list[RunResult] = []
    print(f"work folder: {work}; {args.rounds} rounds x sizes {args.sizes} x {tools}, {total} steps each "
          f"({args.warmup} warmup)", file=sys.stderr)
    for rnd in range(args.rounds):
        for size in args.sizes:
            for tool in round_order(tools, rnd):
                out = work / f"r{rnd}-{size}-{tool}"
                out.mkdir(parents=True, exist_ok=True)
                settings = settings_for(size, total, args.checkpoint.resolve(), args.data.resolve(), out.resolve(),
                                        tokenizer_cache.resolve() if tool == SD_SCRIPTS else None)
                toml_path = out / "config.toml"
                toml_path.write_text(toml_text(settings), encoding="utf-8")
                python = args.python if tool == OURS else (args.sd_scripts_python or sys.executable)
                cmd = command(tool, toml_path, settings, python, args.sd_scripts.resolve() if args.sd_scripts else None)
                cwd = repo if tool == OURS else args.sd_scripts.resolve()
                result, clock = run_one(tool, cmd, child_env(tool, repo), cwd, out / "log.txt", args.warmup, echo=args.echo)
                result.size, result.round = size, rnd
                results.append(result)
                seen = max(clock.times, default=0)
                print(f"round {rnd} {size}px {tool}: exit {result.returncode}, {seen}/{total} steps seen, "
                      f"s/step {_fmt(result.s_per_step, '.3f')}, peak RSS {_fmt(result.peak_rss_mb, '.0f')} MB, "
                      f"wall {result.wall_s:.0f} s; log {result.log}", file=sys.stderr)
    print(table(results))
    print()
    text, rows = summary(results, args.sizes)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in results], "summary": rows, "settings": SETTINGS,
                                         "steps": args.steps, "warmup": args.warmup}, indent=1), encoding="utf-8")
    return 0 if all(r.returncode == 0 and r.timed_steps == args.steps for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
