"""Event listeners that write what a run did: `loss.csv` and TensorBoard scalars with sd-scripts' names."""

from __future__ import annotations

from pathlib import Path

from lora_train.errors import msg
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


class TensorBoard:
    """`loss/current`, `loss/average` (running mean of the epoch), `loss/epoch`, `lr/<group>`, and with
    scale_weight_norms sd-scripts' `max_norm/keys_scaled`, `norm/avg_key_norm`, `max_norm/max_key_norm`."""

    def __init__(self, logging_dir: Path, prefix: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logging_dir / f"{prefix or ''}{__import__('time').strftime('%Y%m%d%H%M%S')}"))
        self._epoch: list[float] = []

    def __call__(self, e) -> None:
        w = self.writer
        if isinstance(e, ev.Step):
            self._epoch.append(e.loss)
            w.add_scalar("loss/current", e.loss, e.step)
            w.add_scalar("loss/average", sum(self._epoch) / len(self._epoch), e.step)
            for name, lr in e.lr.items():
                w.add_scalar(f"lr/{name}", lr, e.step)
            for name, value in e.norms.items():
                w.add_scalar(name, value, e.step)
        elif isinstance(e, ev.EpochEnd):
            w.add_scalar("loss/epoch", e.mean_loss, e.epoch)
            self._epoch = []
        elif isinstance(e, (ev.Finished, ev.Cancelled, ev.Failed)):
            w.close()


def tensorboard_or_note(logging_dir: str | None, prefix: str | None, notes: list[str]):
    if not logging_dir:
        return None
    try:
        return TensorBoard(Path(logging_dir), prefix)
    except ImportError:
        notes.append(msg("logging_dir is set but the tensorboard package is missing: pip install tensorboard"))
        return None
