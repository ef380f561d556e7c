"""What published files look like from outside: their permissions, and ss_network_args left out when a
run has none (as sd-scripts does), with old files that say "None" still read."""

import json
import os
import stat

import pytest
import torch
from conftest import make_dataset, small_run_config

from lora_train.dataset.plan import make_plan
from lora_train.dataset.scan import scan
from lora_train.dataset.source import spec_from_config
from lora_train.model.adapter import ModelInfo
from lora_train.network.files import atomic_write_bytes, load_lora, save_lora
from lora_train.tools.inspect import inspect_lora
from lora_train.network.network import LoRANetwork
from lora_train.train.from_metadata import config_from_metadata
from lora_train.train.metadata import training_metadata

posix = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path) -> str:
    return oct(stat.S_IMODE(os.stat(path).st_mode))


@posix
@pytest.mark.parametrize("mask,mode", [(0o022, "0o644"), (0o027, "0o640"), (0o002, "0o664")], ids=["umask-022", "umask-027", "umask-002"])
def test_saved_lora_gets_the_mode_open_would_give(tmp_path, umask, mask, mode):
    umask(mask)
    net = LoRANetwork([], dim=2)
    path = save_lora(tmp_path / "zkz.safetensors", net.kohya_state_dict() | {"x": torch.zeros(1)}, {"ss_a": "1"})
    assert _mode(path) == mode
    with open(tmp_path / "plain.bin", "wb") as f:  # what the rule is taken from
        f.write(b"x")
    assert _mode(tmp_path / "plain.bin") == mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@posix
def test_every_write_follows_the_umask_also_over_a_private_file(tmp_path, umask):
    umask(0o022)
    card = tmp_path / "zkz.json"
    card.write_text("{}")
    card.chmod(0o600)
    atomic_write_bytes(card, b'{"a": 1}')  # cards and preview PNGs go through the same function
    assert _mode(card) == "0o644" and card.read_bytes() == b'{"a": 1}'
    atomic_write_bytes(tmp_path / "new" / "preview.png", b"png")
    assert _mode(tmp_path / "new" / "preview.png") == "0o644"


@posix
def test_reading_the_umask_leaves_it_as_it_was(umask):
    from lora_train.network.files import current_umask

    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027
    assert umask(0o022) == 0o027


@posix
def test_umask_without_proc_is_read_and_restored(umask, monkeypatch):
    from lora_train.network import files

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(files, "open", no_proc, raising=False)  # macOS, BSD
    umask(0o027)
    assert files.current_umask() == 0o027
    assert umask(0o022) == 0o027


def _metadata(tmp_path, **network):
    data = make_dataset(tmp_path / "data", count=2, size=64)
    config = small_run_config(data, "zkz", **network)
    spec, problems = spec_from_config(config.dataset, 2, 512)
    plan = make_plan(scan(spec, problems), spec, batch_size=2, max_train_epochs=1, max_train_steps=None,
                     gradient_accumulation_steps=1, steps_multiple=64)
    net = LoRANetwork([], dim=4, alpha=4.0)
    return training_metadata(config, ModelInfo("sd1", "epsilon", 512), net, plan, plan.scan, session_id=1, started_at=0.0,
                             seed=3, train_unet=True, train_te=True)


def test_no_network_args_means_no_key_as_in_sd_scripts(tmp_path):
    md = _metadata(tmp_path)
    assert "ss_network_args" not in md
    assert all(isinstance(v, str) for v in md.values())
    with_args = _metadata(tmp_path / "conv", conv_dim=4, conv_alpha=1.0)
    assert json.loads(with_args["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0"}


@pytest.mark.parametrize("stored", [None, "None", ""], ids=["absent", "None (older files)", "empty"])
def test_files_without_network_args_read_back_the_same(tmp_path, stored):
    md = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0"}
    if stored is not None:
        md["ss_network_args"] = stored
    config, notes = config_from_metadata(md)
    assert (config.network.network_dim, config.network.network_alpha, config.network.conv_dim) == (8, 4.0, None)
    assert not any("network_args" in n for n in notes)

    path = save_lora(tmp_path / "old.safetensors", {"lora_unet_x.alpha": torch.tensor(4.0)}, md)
    report = inspect_lora(path)
    assert report["summary"].get("ss_network_args") == stored
    assert report["summary"]["ss_network_dim"] == "8"
    assert load_lora(path)[1].get("ss_network_args") == stored


def test_network_args_from_metadata_still_become_config():
    config, _ = config_from_metadata({"ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1.0"})})
    assert (config.network.conv_dim, config.network.conv_alpha) == (4, 1.0)
