"""Negative controls of the fidelity bar: broken trainings and broken loaders, each scored exactly as the
passing run (the same trigger prompts, collateral prompts, seed and epochs), each of which must FAIL
the bar. A bar that a broken control passes proves nothing about the positive.

- swapped-target: the trainer trains towards the other prediction type's target (v for an eps model).
- half-scale / double-scale: the positive's final file, read by a loader that applies it at half /
  twice its trained strength (for LoRA: alpha x 0.5 / x 2, so weight 1.0 acts as 0.5 / 2.0).
- zero-up: the positive's final file with its up weights zeroed (an untrained file).
- shuffled-captions: a LoRA trained on the same images with the captions shuffled, so the trigger is
  not tied to the pattern (`shuffle_captions`).

The rescaled and zero-up controls re-score the positive's file; the two trained ones train at the
positive's length and score their final file only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

from lora_train.errors import UserError, msg
from lora_train.testing import fidelity

CONTROLS = ("swapped-target", "half-scale", "double-scale", "zero-up", "shuffled-captions")
TRAINED = ("swapped-target", "shuffled-captions")
_SCALES = {"half-scale": 0.5, "double-scale": 2.0}
# DoRA's trained magnitude: dropped with the up weights, or the file would still rescale the base's weights
DROPPED_KEYS = ("dora_scale",)


@dataclass
class ControlResult:
    name: str
    report: fidelity.FidelityReport
    failures: list[str]  # empty: the control passed the bar, which it must not

    @property
    def failed(self) -> bool:
        return bool(self.failures)


# -- the seams ----------------------------------------------------------------------------------
@contextlib.contextmanager
def swapped_target():
    """While open, the trainer trains towards the other prediction type's target: v for an eps model,
    eps for a v model (a trainer that reads the model's prediction type wrong). The training loop and
    validation look the target up as `train.loss.target` on every step; the measure of the held-out
    loss writes its own target out, so it still measures against the right one."""
    from lora_train.train import loss

    original = loss.target

    def swapped(latents, noise, alphas_t, prediction_type):
        return original(latents, noise, alphas_t, "v" if prediction_type == "epsilon" else "epsilon")

    loss.target = swapped
    try:
        yield
    finally:
        loss.target = original


class RescaledNetwork:
    """A network as a loader that gets its scale wrong applies it: weight w acts as w x factor. For LoRA
    (strength alpha / dim x weight) that is alpha x factor; for every algorithm it is the strength the
    file is applied at."""

    def __init__(self, network, factor: float):
        self.network, self.factor = network, factor

    def apply(self) -> None:
        self.network.apply()

    def remove(self) -> None:
        self.network.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.network.set_multiplier(multiplier * self.factor)


def rescaled_loader(factor: float):
    def load(path, adapter):
        return RescaledNetwork(fidelity._load_network(path, adapter), factor)

    return load


def zero_up_copy(path: Path, out: Path) -> Path:
    """A copy of a LoRA file with every up factor zeroed (and DoRA's magnitude dropped): the file an
    untrained network would write, with the trained file's keys, ranks and alphas."""
    import torch

    from lora_train.network.files import load_lora, save_lora

    from lora_train.network.algorithms import ALGORITHMS, split_key

    # each algorithm's change is linear in these (lora_up for LoRA, which starts at zero): zero, no change
    up = {key for cls in ALGORITHMS for key in cls.SCALES_WITH}
    tensors, metadata = load_lora(path)
    zeroed = {k: torch.zeros_like(v) if split_key(k)[1] in up else v for k, v in tensors.items() if split_key(k)[1] not in DROPPED_KEYS}
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_lora(out, zeroed, metadata)


def shuffle_captions(data: Path, reg: Path | None, seed: int) -> None:
    """Pool the captions of the concept images and of the regularization images and deal them out again
    over all those images at random (a fixed seed): the trigger then lands on plain images as often,
    per image, as on pattern images, so it is not tied to the pattern.

    Shuffling within the concept folder only would not untie it: every concept image shows the pattern
    and every concept caption holds the trigger, so any deal there still pairs the trigger with the
    pattern every time (only the shape, side and background words would be wrong)."""
    if reg is None:
        raise UserError(msg("shuffled-captions: needs regularization images (reg_images > 0) to untie the trigger from the pattern"))
    files = sorted(Path(data).glob("*/*.txt")) + sorted(Path(reg).glob("*/*.txt"))
    captions = [f.read_text(encoding="utf-8") for f in files]
    random.Random(seed + 4000).shuffle(captions)
    for f, caption in zip(files, captions):
        f.write_text(caption, encoding="utf-8")


# -- running them -------------------------------------------------------------------------------
def control_options(name: str, opts: fidelity.FidelityOptions) -> fidelity.FidelityOptions:
    """The positive's options with the control's own output folder and file name."""
    stem = opts.output_name or fidelity.default_output_name(opts)
    return dataclasses.replace(opts, output=Path(opts.output) / "controls" / name, output_name=f"{stem}-{name}")


def train_control(name: str, opts: fidelity.FidelityOptions, log=print, cache: Path | None = None) -> fidelity.FidelityReport:
    """A trained control (swapped-target, shuffled-captions) at `opts`' length, its final file scored."""
    if name == "swapped-target":
        with swapped_target():
            return fidelity.run(opts, log=log, final_only=True, cache=cache)
    if name == "shuffled-captions":
        return fidelity.run(opts, log=log, final_only=True, cache=cache,
                            prepare_data=lambda data, reg: shuffle_captions(data, reg, opts.seed))
    raise ValueError(name)


def rescore_control(name: str, opts: fidelity.FidelityOptions, report: fidelity.FidelityReport, adapter=None) -> fidelity.FidelityReport:
    """half-scale, double-scale or zero-up on the positive's final file; the positive's base scores."""
    from lora_train.model.registry import load_adapter
    from lora_train.model.tinybase import base_checkpoint

    adapter = adapter or load_adapter(opts.model or str(base_checkpoint()))
    final = report.final
    if name in _SCALES:
        result, _ = fidelity.evaluate_file(Path(final.file), final.epoch, adapter, opts, load=rescaled_loader(_SCALES[name]))
    elif name == "zero-up":
        out = control_options(name, opts)
        copy = zero_up_copy(Path(final.file), Path(out.output) / f"{out.output_name}.safetensors")
        result, _ = fidelity.evaluate_file(copy, final.epoch, adapter, opts)
    else:
        raise ValueError(name)
    return dataclasses.replace(report, epochs=[result], grid="")


def run_control(name: str, opts: fidelity.FidelityOptions, report: fidelity.FidelityReport,
                bar: fidelity.Thresholds = fidelity.Thresholds(), log=print, cache: Path | None = None, adapter=None) -> ControlResult:
    """One control against the passing run (`opts`, `report`): its report, and what in it misses `bar`."""
    if name not in CONTROLS:
        raise UserError(msg("unknown control '{name}' (known: {known})", name=name, known=", ".join(CONTROLS)))
    if name in TRAINED:
        result = train_control(name, control_options(name, opts), log=log, cache=cache)
    else:
        result = rescore_control(name, opts, report, adapter)
    return ControlResult(name, result, fidelity.failures(result, bar))


def run_controls(opts: fidelity.FidelityOptions, report: fidelity.FidelityReport, bar: fidelity.Thresholds = fidelity.Thresholds(),
                 log=print, cache: Path | None = None, names=CONTROLS) -> list[ControlResult]:
    out = []
    for name in names:
        log(msg("control {name}: running", name=name))
        out.append(run_control(name, opts, report, bar, log=log, cache=cache))
    return out


# -- output -------------------------------------------------------------------------------------
def format_controls(results: list[ControlResult]) -> str:
    """One row per control (concept at w=1 / w=0, collateral drop, best weight, fails the bar and why),
    then the verdict line."""
    lines = [msg("control             w=1.0  w=0.0  drop   best-w  fails the bar (first reason)"), "-" * 78]
    for r in results:
        rep = r.report
        # not a bare yes/no: the WebUI translates every text node equal to a key of zh_CN.json
        fails = msg("yes: {reason}", reason=r.failures[0]) if r.failed else msg("NO: it passes the bar")
        lines.append(f"{r.name:<18}  {rep.weights['1.0']:5.2f}  {rep.weights['0.0']:5.2f}  {rep.collateral_drop:+5.2f}  "
                     f"{rep.best_weight:>6g}  {fails}")
    lines.append(verdict(results))
    return "\n".join(lines)


def verdict(results: list[ControlResult]) -> str:
    passed = [r.name for r in results if not r.failed]
    if not passed:
        return msg("all {count} controls fail the bar", count=len(results))
    return msg("controls that did NOT fail the bar: {names}", names=", ".join(passed))
