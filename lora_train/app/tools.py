"""The Tools sub-tab's work: merge / subtract, block weights, resize and pick, over the host's LoRA
folder, so the tab only wires components.

Every path the tab reads or writes goes through the host's folder policy (`guard.guarded_path`), as
the Train tab's do: on a WebUI reachable from other machines a typed path or formula item may not
reach outside the allowed folders. Outputs are new files in the LoRA folder, named by a plain file
name: never an input, never an existing file (the WebUI caches a LoRA's weights by name, and an
overwritten published file cannot be undone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lora_train.app.base_style import PRESETS
from lora_train.app.guard import guarded_path
from lora_train.app.runs import RunManager
from lora_train.errors import UserError, msg
from lora_train.network.card import safe_name

# the guide's presets for `NAME:1:GP1,NAME_BASE:-1:GP2` (base_style.PRESETS), one per line as the tab shows them
GUIDE_PRESETS = "\n".join(f"{name}:{values}" for name, values in PRESETS.items())
WORST = 5  # modules listed by name under resize's average: where the rank cut hurts most


@dataclass
class Written:
    path: Path
    lines: list[str] = field(default_factory=list)  # what was written, the tool's notes, the host's load check


class Tools:
    def __init__(self, manager: RunManager):
        self.manager = manager
        self.host = manager.host

    # -- the LoRA folder ---------------------------------------------------------------------------
    def lora_files(self) -> list[str]:
        """The LoRA folder's files as the dropdowns list them: paths relative to it, subfolders included."""
        folder = self.host.lora_dir()
        if not folder.is_dir():
            return []
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors") if not p.name.startswith("."))

    def _folder(self) -> Path:
        return guarded_path(self.host.access(), self.host.lora_dir(), msg("LoRA folder"))

    def source(self, name: str) -> Path:
        """A source LoRA: a file of the LoRA folder (as listed) or a path, allowed by the policy."""
        text = (name or "").strip()
        if not text:
            raise UserError(msg("choose a source LoRA"))
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self._folder() / text
        if not path.is_file() and path.with_name(path.name + ".safetensors").is_file():
            path = path.with_name(path.name + ".safetensors")
        real = guarded_path(self.host.access(), path, msg("source LoRA"))
        if not real.is_file():
            raise UserError(msg("{path}: no such LoRA file", path=text))
        return real

    def output(self, name: str) -> Path:
        """`<name>.safetensors` in the LoRA folder, a name no file has yet."""
        stem = (name or "").strip()
        if stem.lower().endswith(".safetensors"):
            stem = stem[: -len(".safetensors")]
        if not stem:
            raise UserError(msg("give the output a name"))
        if safe_name(stem) != stem:
            raise UserError(msg("output name '{name}': write a file name for the LoRA folder, without folders or special characters",
                                name=name))
        path = self._folder() / f"{stem}.safetensors"
        if path.exists():
            raise UserError(msg("{file} exists in the LoRA folder: choose another name (the Tools tab never overwrites a file)",
                                file=path.name))
        return path

    def _published(self, path: Path, notes: list[str], more: list[str] | None = None) -> Written:
        """The host's list learns of the new file, and checks it loads, as a run's save is published;
        while a run holds the model, only the list is refreshed (the check would wait for the run)."""
        latest = self.manager.latest()
        if latest is not None and not latest.ended:
            self.host.lora_files_changed()
            checks = [msg("a run holds the model: the load check of {file} is skipped, the LoRA list is refreshed", file=path.name)]
        else:
            checks = self.host.after_publish(path)
        return Written(path, [msg("wrote {path}", path=path), *(more or []), *notes, *checks])

    # -- the tools ---------------------------------------------------------------------------------
    def merge(self, formula: str, presets_text: str, output: str, rank: Optional[float], model: str = "") -> Written:
        """SuperMerger's formula over LoRAs named in the LoRA folder (or by a path). `model`: merge's
        --model, the checkpoint whose weights IA3, OFT, GLoRA and DoRA items change (empty: none)."""
        from lora_train.tools import merge

        folder = self._folder()
        for item in merge.parse_formula(formula):
            guarded_path(self.host.access(), merge.resolve(item.source, folder), item.source)
        out = self.output(output)
        targets = self._model_targets(model)
        path, notes = merge.merge(formula, out, merge.parse_presets([presets_text or ""]), _rank(rank), folder, targets)
        return self._published(path, notes)

    def _model_targets(self, model: str):
        """The modules of the checkpoint named by `model` (a file the folder policy allows, or a built-in
        model), loaded on its own beside the host's; None for an empty field."""
        from lora_train.model import registry

        spec = (model or "").strip()
        if not spec:
            return None
        if not spec.startswith("builtin:"):
            real = guarded_path(self.host.access(), spec, msg("merge model"))
            if not real.is_file():
                raise UserError(msg("{path}: no such checkpoint file", path=spec))
            spec = str(real)
        return registry.load_adapter(spec).file_targets()

    def lbw(self, source: str, weights: str, presets_text: str, output: str) -> Written:
        """lora-block-weight's values (a preset name, one of the presets given for merge, or a list) baked in."""
        from lora_train.tools import lbw, merge

        if not (weights or "").strip():
            raise UserError(msg("give the block weights: a preset name or comma-separated values"))
        src, out = self.source(source), self.output(output)
        path, notes = lbw.bake(src, out, weights, merge.parse_presets([presets_text or ""]))
        return self._published(path, notes)

    def resize(self, source: str, rank: Optional[float], dynamic: Optional[str], param: Optional[float], output: str) -> Written:
        """sd-scripts' resize; `dynamic`: one of its methods or None (a fixed rank)."""
        from lora_train.tools.resize import resize

        src, out = self.source(source), self.output(output)
        new_rank = _rank(rank)
        if new_rank is None:
            raise UserError(msg("give the new rank (with a dynamic method: the largest rank)"))
        result = resize(src, out, new_rank, dynamic=dynamic or None, param=param if dynamic else None)
        return self._published(result.path, result.notes, retained_summary(result.modules))

    def pick(self, folder: str):
        """pick's ranking of a run's saves (default: the last run's folder). -> (ranking, side-by-side image or None)."""
        from lora_train.tools import pick

        text = (folder or "").strip() or self._last_run()
        real = guarded_path(self.host.access(), text, msg("run folder"))
        ranking = pick.rank(real)
        grid = pick.side_by_side(ranking, ranking.loss_csv.parent / f"{ranking.name}-pick.png")
        return ranking, grid

    def _last_run(self) -> str:
        """This session's last run, else the newest run folder of the host's work folder."""
        latest = self.manager.latest()
        if latest is not None and latest.work_dir:
            return latest.work_dir
        work = self.host.work_dir()
        runs = [p.parent for p in work.glob("*/*-loss.csv")] if work.is_dir() else []
        if not runs:
            raise UserError(msg("no run yet: give the output folder of a run"))
        return str(max(runs, key=lambda p: p.stat().st_mtime))


def _rank(value) -> Optional[int]:
    """A rank field: empty or 0 is none; a fraction is refused, not rounded."""
    if value is None or value == "" or float(value) == 0:
        return None
    if float(value) != int(float(value)):
        raise UserError(msg("rank '{rank}': a whole number", rank=value))
    return int(float(value))


def retained_summary(modules) -> list[str]:
    """sd-scripts' average Frobenius norm retention, and the modules that kept the least."""
    from lora_train.tools.resize import average_retention

    average = average_retention(modules)
    if average is None:
        return []
    kept = sorted((m for m in modules if m.fro_retained == m.fro_retained), key=lambda m: m.fro_retained)
    return [average] + [msg("kept least: {name} (rank {rank}): {fro} of its Frobenius norm", name=m.name, rank=m.rank,
                            fro=f"{m.fro_retained:.1%}") for m in kept[:WORST]]
