"""What a training run tells its front end. The trainer knows nothing about tqdm, gradio or the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Started:
    total_steps: int
    steps_per_epoch: int
    epochs: int
    num_images: int
    notes: list[str]
    resumed_at: Optional[int] = None  # the step a resumed run continues after


@dataclass
class Step:
    step: int  # 1-based, counted over the whole run
    epoch: int  # 1-based
    loss: float
    lr: dict[str, float]  # "unet" / "textencoder"
    # with scale_weight_norms: sd-scripts' max-norm statistics by its log names (train/max_norm.py)
    norms: dict[str, float] = field(default_factory=dict)


@dataclass
class EpochEnd:
    epoch: int
    mean_loss: float


@dataclass
class Validation:
    """The loss on the held-out images after `step` (train/validation.py); `kind` "step" for
    validate_every_n_steps, "epoch" at the end of an epoch (before its EpochEnd)."""

    step: int
    epoch: int
    loss: float
    kind: str


@dataclass
class CheckpointSaved:
    path: str
    epoch: int
    step: int


@dataclass
class Samples:
    paths: list[str]
    epoch: int
    step: int


@dataclass
class Notice:
    """A message during the run (an upload that failed); the run goes on."""

    text: str


@dataclass
class Finished:
    path: str
    steps: int


@dataclass
class Cancelled:
    step: int
    path: Optional[str]  # the -interrupted save, if anything was trained


@dataclass
class Failed:
    error: BaseException
    step: int


Event = Started | Step | EpochEnd | Validation | CheckpointSaved | Samples | Notice | Finished | Cancelled | Failed
Listener = Callable[[Event], None]
