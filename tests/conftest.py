import os
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, not two each fighting for both
    torch.set_num_threads(1)

from lora_train.model.loading import quiet

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
if not FIXTURES.is_dir():  # CI clones main with shared/ beside it
    FIXTURES = Path(os.environ.get("LORA_TRAIN_FIXTURES", "../shared/fixtures")).resolve()

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"sd-scripts fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # tokenizer/config folders the tiny model writes go to a per-run cache
    os.environ.setdefault("LORA_TRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny model for the session. Tests that change it must restore it (that is what they test)."""
    from lora_train.model.tiny import build_tiny

    with quiet():
        return build_tiny(0)


@pytest.fixture
def tiny_adapter(tiny_model):
    from lora_train.model.ldm import LdmAdapter

    return LdmAdapter(tiny_model, name="tiny")


def snapshot(model: torch.nn.Module) -> dict:
    """Every parameter and buffer (cloned), with requires_grad flags and train/eval modes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "modes": {k: m.training for k, m in model.named_modules()},
    }


def assert_same_as(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k in before["state"] if not torch.equal(before["state"][k], after["state"][k])]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"
    assert after["grad"] == before["grad"]
    assert after["modes"] == before["modes"]
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, f"hooks left on {hooked[:3]}"


def make_dataset(root: Path, count: int = 4, repeats: int = 1, size: int = 64) -> Path:
    from lora_train.demo import make_dataset as demo_dataset

    return demo_dataset(root, count=count, repeats=repeats, size=size)


def small_run_config(data: Path, name: str, epochs: int = 2, **extra):
    """A run the tiny model trains in seconds: 64 px, rank 4, batch 2, a save every epoch."""
    from lora_train.train.config import TrainConfig

    return TrainConfig().update({"train_data_dir": str(data), "output_name": name, "max_train_epochs": epochs,
                                 "train_batch_size": 2, "resolution": "64", "network_dim": 4, "network_alpha": 4.0,
                                 "learning_rate": 1e-3, "seed": 3, "save_every_n_epochs": 1, **extra}, source="test")
