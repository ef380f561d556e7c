"""Event listeners that write what a run did: `loss.csv` and TensorBoard scalars with sd-scripts' names
(trackers.py picks the trackers a config asks for)."""

from __future__ import annotations

from pathlib import Path

from lora_train.train import events as ev
from lora_train.train.max_norm import AVERAGE_KEY_NORM, KEYS_SCALED, MAX_KEY_NORM

_NORM_COLUMNS = (KEYS_SCALED, AVERAGE_KEY_NORM, MAX_KEY_NORM)  # empty unless scale_weight_norms is set


class LossCsv:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")
        self.file.write("step,epoch,loss,lr_unet,lr_textencoder,keys_scaled,average_key_norm,max_key_norm\n")

    def __call__(self, e) -> None:
        if isinstance(e, ev.Step):
            norms = ",".join(f"{e.norms[k]:g}" if k in e.norms else "" for k in _NORM_COLUMNS)
            self.file.write(f"{e.step},{e.epoch},{e.loss:.6f},{e.lr.get('unet', '')},{e.lr.get('textencoder', '')},{norms}\n")
            self.file.flush()
        elif isinstance(e, (ev.Finished, ev.Cancelled, ev.Failed)):
            self.file.close()


class Scalars:
    """The scalars sd-scripts logs, by its names: `loss/current`, `loss/average` (running mean of the
    epoch), `lr/<group>` and, with scale_weight_norms, `max_norm/keys_scaled`, `norm/avg_key_norm`,
    `max_norm/max_key_norm` at each step; `loss/epoch` at the end of an epoch. A tracker writes them."""

    def __init__(self):
        self._epoch: list[float] = []
        self.step = 0

    def __call__(self, e) -> None:
        if isinstance(e, ev.Step):
            self._epoch.append(e.loss)
            self.step = e.step
            values = {"loss/current": e.loss, "loss/average": sum(self._epoch) / len(self._epoch)}
            self.write(values | {f"lr/{name}": lr for name, lr in e.lr.items()} | e.norms, e.step)
        elif isinstance(e, ev.EpochEnd):
            self.write_epoch(e.mean_loss, e.epoch)
            self._epoch = []
        elif isinstance(e, (ev.Finished, ev.Cancelled, ev.Failed)):
            self.close()

    def write(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def write_epoch(self, mean_loss: float, epoch: int) -> None:
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

    def write_epoch(self, mean_loss: float, epoch: int) -> None:
        self.writer.add_scalar("loss/epoch", mean_loss, epoch)

    def close(self) -> None:
        self.writer.close()


class Wandb(Scalars):
    """A wandb run; the epoch mean is logged at the epoch's last step (wandb's steps only go forward)."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def write(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def write_epoch(self, mean_loss: float, epoch: int) -> None:
        self.run.log({"loss/epoch": mean_loss, "epoch": epoch}, step=self.step)

    def close(self) -> None:
        self.run.finish()
