"""Event listeners that write what a run did: `loss.csv` and TensorBoard scalars with sd-scripts' names
(trackers.py picks the trackers a config asks for)."""

from __future__ import annotations

from pathlib import Path

from lora_train.train import events as ev
from lora_train.train.max_norm import AVERAGE_KEY_NORM, KEYS_SCALED, MAX_KEY_NORM

_NORM_COLUMNS = (KEYS_SCALED, AVERAGE_KEY_NORM, MAX_KEY_NORM)  # empty unless scale_weight_norms is set


class LossCsv:
    """One row per step. A step's row is written once its validation losses (validation_split) are in,
    so it lags one step. A resumed run keeps the rows of the steps before the resume."""

    HEADER = ("step,epoch,loss,lr_unet,lr_textencoder,keys_scaled,average_key_norm,max_key_norm,"
              "validation_step_average,validation_epoch_average\n")

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = None
        self.row: list[str] | None = None  # the last step's, until its validation is known

    def _open(self, resumed_at: int | None) -> None:
        kept = []
        if resumed_at is not None and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            if lines and lines[0] == self.HEADER:
                kept = [line for line in lines[1:] if line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) <= resumed_at]
        self.file = self.path.open("w", encoding="utf-8")
        self.file.write(self.HEADER + "".join(kept))

    def __call__(self, e) -> None:
        if self.file is None:
            self._open(getattr(e, "resumed_at", None))
        if isinstance(e, ev.Step):
            self._write_row()
            norms = [f"{e.norms[k]:g}" if k in e.norms else "" for k in _NORM_COLUMNS]
            self.row = [str(e.step), str(e.epoch), f"{e.loss:.6f}", str(e.lr.get("unet", "")), str(e.lr.get("textencoder", "")), *norms, "", ""]
        elif isinstance(e, ev.Validation) and self.row is not None and self.row[0] == str(e.step):
            self.row[-1 if e.kind == "epoch" else -2] = f"{e.loss:.6f}"
        elif isinstance(e, ev.EpochEnd):
            self._write_row()
        elif isinstance(e, (ev.Finished, ev.Cancelled, ev.Failed)):
            self._write_row()
            self.file.close()

    def _write_row(self) -> None:
        if self.row is not None:
            self.file.write(",".join(self.row) + "\n")
            self.file.flush()
            self.row = None


class Scalars:
    """The scalars sd-scripts logs, by its names: `loss/current`, `loss/average` (running mean of the
    epoch), `lr/<group>` and, with scale_weight_norms, `max_norm/keys_scaled`, `norm/avg_key_norm`,
    `max_norm/max_key_norm` at each step; `loss/epoch` at the end of an epoch. With validation_split,
    `loss/validation/step_average` and `loss/validation/step_divergence` (minus the epoch's running
    training mean) at the step, `loss/validation/epoch_average` and `loss/validation/epoch_divergence`
    per epoch (sd-scripts' names; its per-pass `step_current` scalars are commented out there and not
    logged here either). A tracker writes them."""

    def __init__(self):
        self._epoch: list[float] = []
        self.step = 0

    def __call__(self, e) -> None:
        if isinstance(e, ev.Step):
            self._epoch.append(e.loss)
            self.step = e.step
            values = {"loss/current": e.loss, "loss/average": sum(self._epoch) / len(self._epoch)}
            self.write(values | {f"lr/{name}": lr for name, lr in e.lr.items()} | e.norms, e.step)
        elif isinstance(e, ev.Validation):
            divergence = e.loss - sum(self._epoch) / len(self._epoch) if self._epoch else 0.0
            values = {f"loss/validation/{e.kind}_average": e.loss, f"loss/validation/{e.kind}_divergence": divergence}
            if e.kind == "epoch":
                self.write_epoch(values, e.epoch)
            else:
                self.write(values, e.step)
        elif isinstance(e, ev.EpochEnd):
            self.write_epoch({"loss/epoch": e.mean_loss}, e.epoch)
            self._epoch = []
        elif isinstance(e, (ev.Finished, ev.Cancelled, ev.Failed)):
            self.close()

    def write(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def write_epoch(self, values: dict[str, float], epoch: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoard(Scalars):
    def __init__(self, folder: Path, **writer_kwargs):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__()
        self.writer = SummaryWriter(str(folder), **writer_kwargs)

    def write(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def write_epoch(self, values: dict[str, float], epoch: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, epoch)

    def close(self) -> None:
        self.writer.close()


class Wandb(Scalars):
    """A wandb run; the epoch mean is logged at the epoch's last step (wandb's steps only go forward)."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def write_epoch(self, values: dict[str, float], epoch: int) -> None:
        self.run.log(values | {"epoch": epoch}, step=self.step)

    def close(self) -> None:
        self.run.finish()
