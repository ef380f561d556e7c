"""`python -m lora_train pick RUN_OR_FOLDER`: which saved epoch to use.

The saves of a run (`NAME-000004.safetensors`, `NAME-step00000012.safetensors`, `NAME.safetensors`) are
ranked by the loss on the held-out images (validation_split) at the step each was saved, read from
the run's `NAME-loss.csv`: the epoch's pass where there is one, else the step's; a save with neither
falls back to its epoch's average. The preview images rendered at those steps (`sample/`) are listed
beside them, and can be pasted side by side into one image.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_train.errors import UserError, msg
from lora_train.sample.previews import sample_epoch_step

LOSS_SUFFIX = "-loss.csv"


@dataclass
class Save:
    file: Path
    epoch: int | None
    step: int | None
    loss: float | None = None
    previews: list[Path] = field(default_factory=list)


@dataclass
class Ranking:
    name: str
    loss_csv: Path
    saves: list[Save]  # lowest validation loss first; saves without one last

    @property
    def best(self) -> Save | None:
        return self.saves[0] if self.saves and self.saves[0].loss is not None else None


def find_run(target: str | Path) -> tuple[Path, str]:
    """(the run's folder, its name) from a folder holding one run, a save of the run, its loss.csv, or FOLDER/NAME."""
    path = Path(target)
    if path.is_dir():
        names = sorted(p.name[: -len(LOSS_SUFFIX)] for p in path.glob(f"*{LOSS_SUFFIX}"))
        if len(names) == 1:
            return path, names[0]
        if not names:
            raise UserError(msg("{path}: no <name>-loss.csv here: give the output_dir of a run", path=path))
        raise UserError(msg("{path} holds several runs ({names}): give one as {example}", path=path, names=", ".join(names),
                            example=path / names[0]))
    if path.name.endswith(LOSS_SUFFIX) and path.is_file():
        return path.parent, path.name[: -len(LOSS_SUFFIX)]
    if path.suffix == ".safetensors" and path.is_file():
        name = _metadata(path).get("ss_output_name") or re.sub(r"-(\d{6}|step\d{8}|interrupted)$", "", path.stem)
        return path.parent, name
    if (path.parent / f"{path.name}{LOSS_SUFFIX}").is_file():
        return path.parent, path.name
    raise UserError(msg("{path}: not a run (a folder with <name>-loss.csv, a saved LoRA, or its loss.csv)", path=path))


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # a broken file is reported, not ranked
        raise UserError(msg("{path}: cannot be read ({error})", path=path, error=e)) from e


def read_validation(loss_csv: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(step -> validation loss at that step, epoch -> the epoch's validation average) from a run's loss.csv."""
    at_step: dict[int, float] = {}
    per_epoch: dict[int, float] = {}
    with loss_csv.open(encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                step, epoch = int(row["step"]), int(row["epoch"])
            except (KeyError, TypeError, ValueError):
                raise UserError(msg("{path}: line {line}: not a loss.csv that LoRA Train wrote (step and epoch columns)",
                                    path=loss_csv, line=line)) from None
            epoch_value, step_value = row.get("validation_epoch_average") or "", row.get("validation_step_average") or ""
            if epoch_value:
                per_epoch[epoch] = at_step[step] = float(epoch_value)
            elif step_value:
                at_step[step] = float(step_value)
    return at_step, per_epoch


def _saves(folder: Path, name: str) -> list[Save]:
    pattern = re.compile(rf"{re.escape(name)}(?:-(\d{{6}})|-step(\d{{8}}))?\.safetensors")
    saves = []
    for path in sorted(folder.iterdir()):
        m = pattern.fullmatch(path.name)
        if not m:
            continue
        md = _metadata(path)
        epoch = int(m.group(1)) if m.group(1) else _int(md.get("ss_epoch"))
        step = _int(md.get("ss_steps")) if md.get("ss_steps") else (int(m.group(2)) if m.group(2) else None)
        saves.append(Save(path, epoch, step))
    return saves


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def rank_if_validated(folder: Path, name: str) -> Ranking | None:
    """The ranking of a run that wrote validation loss; None for a run without (no validation_split)."""
    loss_csv = Path(folder) / f"{name}{LOSS_SUFFIX}"
    if not loss_csv.is_file() or not read_validation(loss_csv)[0]:
        return None
    return rank(Path(folder) / name)


def rank(target: str | Path) -> Ranking:
    folder, name = find_run(target)
    loss_csv = folder / f"{name}{LOSS_SUFFIX}"
    if not loss_csv.is_file():
        raise UserError(msg("{path} does not exist: pick reads the validation loss the run wrote there", path=loss_csv))
    at_step, per_epoch = read_validation(loss_csv)
    if not at_step:
        raise UserError(msg("{path} has no validation loss: set validation_split (e.g. 0.1) to hold out images, and train again",
                            path=loss_csv))
    saves = _saves(folder, name)
    if not saves:
        raise UserError(msg("{folder}: no saved LoRA of '{name}' ({name}-000001.safetensors ...)", folder=folder, name=name))
    samples = sorted((folder / "sample").glob(f"{name}_e*.png"))
    for save in saves:
        save.loss = at_step.get(save.step) if save.step is not None else None
        if save.loss is None and save.epoch is not None:
            save.loss = per_epoch.get(save.epoch)
        save.previews = [p for p in samples if _shows(p, save)]
    saves.sort(key=lambda s: (s.loss is None, s.loss if s.loss is not None else 0.0, s.step or 0))
    return Ranking(name, loss_csv, saves)


def _shows(path: Path, save: Save) -> bool:
    found = sample_epoch_step(path)
    if found is None:
        return False
    epoch, step = found
    return step == save.step if save.step is not None else epoch == save.epoch


def side_by_side(ranking: Ranking, out: Path, size: int = 256) -> Path | None:
    """The saves' previews pasted into one image: a column per save in ranked order, a row per prompt."""
    from PIL import Image, ImageDraw

    columns = [s for s in ranking.saves if s.previews]
    if not columns:
        return None
    rows = max(len(s.previews) for s in columns)
    head = 20
    grid = Image.new("RGB", (size * len(columns), head + size * rows), "white")
    draw = ImageDraw.Draw(grid)
    for j, save in enumerate(columns):
        loss = "-" if save.loss is None else f"{save.loss:.4f}"
        draw.text((j * size + 4, 4), f"{save.file.stem[-20:]} {loss}", fill="black")
        for i, preview in enumerate(save.previews):
            with Image.open(preview) as im:
                grid.paste(im.convert("RGB").resize((size, size)), (j * size, head + i * size))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def report_lines(ranking: Ranking) -> list[str]:
    """The table `pick` prints, the suggested file, and the previews of each save."""
    lines = [msg("run {name}: saves ranked by the loss on the held-out images ({path})", name=ranking.name, path=ranking.loss_csv),
             "  " + msg("#  file                                 epoch    step  validation")]
    for n, save in enumerate(ranking.saves, 1):
        loss = "-" if save.loss is None else f"{save.loss:.6f}"
        epoch, step = ("-" if v is None else str(v) for v in (save.epoch, save.step))
        lines.append(f"{n:>3}  {save.file.name:<36} {epoch:>5} {step:>7}  {loss:>10}")
    lines.append(suggestion(ranking))
    for save in ranking.saves:
        if save.previews:
            lines.append(msg("previews of {file}: {paths}", file=save.file.name, paths=", ".join(str(p) for p in save.previews)))
    return lines


def suggestion(ranking: Ranking) -> str:
    """The line naming the suggested save and why (the CLI's and the Tools tab's)."""
    best = ranking.best
    if best is None:  # no save was made at a step with a validation pass
        return msg("no save of {name} has a validation loss, so none is suggested", name=ranking.name)
    return msg("suggested: {path} (the lowest validation loss, {loss}, epoch {epoch}, step {step})", path=best.file,
               loss=f"{best.loss:.6f}", epoch=best.epoch, step=best.step)


# the card note below, as a pattern: a later ranking of the same run (after a Resume) replaces it
_CARD_NOTE = re.compile(r"suggested epoch \S+ \(.*\): lowest validation loss \S+ of \d+ saves")


def card_note(ranking: Ranking, stem: str | None = None) -> str | None:
    """The line a published card's notes get: which epoch is suggested and why. `stem`: the suggested
    file's name in the LoRA folder, when publishing renamed it."""
    best = ranking.best
    if best is None:
        return None
    return msg("suggested epoch {epoch} ({file}): lowest validation loss {loss} of {count} saves",
               epoch="-" if best.epoch is None else best.epoch, file=stem or best.file.stem, loss=f"{best.loss:.4f}",
               count=sum(s.loss is not None for s in ranking.saves))


def is_card_note(line: str) -> bool:
    return bool(_CARD_NOTE.fullmatch(line.strip()))
