"""no_metadata and the metadata_* keys: what a trained file's header holds, read from the header
bytes themselves. Expected keys are sd-scripts' (train_util.SS_METADATA_MINIMUM_KEYS,
sai_model_spec.add_model_spec_arguments / build_metadata)."""

import base64
import json
import struct

import pytest
from conftest import make_dataset

from lora_train.app import job
from lora_train.errors import UserError
from lora_train.train.config import TrainConfig

# sd-scripts' SS_METADATA_MINIMUM_KEYS: kept with --no_metadata
SD_SCRIPTS_MINIMUM = {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args"}


def header(path) -> dict[str, str]:
    """The __metadata__ of a safetensors file: 8-byte little-endian length, then JSON."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def train(tmp_path, tiny_adapter, **extra):
    data = make_dataset(tmp_path / "data", count=2)
    config = TrainConfig().update({"train_data_dir": str(data), "output_dir": str(tmp_path / "out"), "output_name": "meta",
                                   "resolution": "64", "network_dim": 4, "network_alpha": 2, "max_train_steps": 2,
                                   "train_batch_size": 2, "seed": 1, **extra}, source="test")
    return job.build_trainer(config, tiny_adapter).run()


def test_no_metadata_keeps_only_what_sd_scripts_keeps(tmp_path, tiny_adapter):
    from lora_train.network.selftest import unmatched_modules
    from lora_train.tools.inspect import inspect_lora
    from lora_train.train.from_metadata import config_from_metadata

    full = header(train(tmp_path / "full", tiny_adapter))
    path = train(tmp_path / "bare", tiny_adapter, no_metadata=True, conv_dim=2, conv_alpha=1)
    bare = header(path)
    assert "ss_tag_frequency" in full and "ss_dataset_dirs" in full and "ss_seed" in full  # what no_metadata takes away
    ss = {k for k in bare if k.startswith("ss_")}
    assert ss == SD_SCRIPTS_MINIMUM  # conv_dim gives this run network args, so all six are there
    assert not ss & {"ss_tag_frequency", "ss_dataset_dirs", "ss_sd_model_name", "ss_steps", "ss_epoch", "ss_training_started_at"}
    assert (bare["ss_network_dim"], bare["ss_network_alpha"], json.loads(bare["ss_network_args"])["conv_dim"]) == ("4", "2.0", "2")
    # sd-scripts adds the modelspec keys to the minimum metadata, and the network's own hashes
    assert bare["modelspec.title"] == "meta" and bare["modelspec.architecture"] == full["modelspec.architecture"]
    assert {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"} <= set(bare)
    assert set(bare) - ss - {"sshs_model_hash", "sshs_legacy_hash"} == {k for k in bare if k.startswith("modelspec.")}

    # our readers cope with it
    report = inspect_lora(path)
    assert report["valid"] and report["hash_ok"] and report["architecture"] == "sd15"
    config, notes = config_from_metadata(bare)
    assert (config.network.network_dim, config.network.network_alpha, config.network.conv_dim) == (4, 2.0, 2)
    assert unmatched_modules(path, tiny_adapter) == []


def test_metadata_keys_go_into_modelspec(tmp_path, tiny_adapter):
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image")
    values = {"metadata_title": "Red Circles v2", "metadata_author": "Me", "metadata_description": "circles, red",
              "metadata_license": "CreativeML Open RAIL-M", "metadata_tags": "circle,red", "metadata_usage_hint": "use zkz",
              "metadata_thumbnail": str(thumb), "metadata_merged_from": "a, b", "metadata_trigger_phrase": "zkz",
              "metadata_preprocessor": "center crop", "metadata_is_negative_embedding": "False"}
    md = header(train(tmp_path, tiny_adapter, min_timestep=100, **values))
    expected = {f"modelspec.{k[len('metadata_'):]}": v for k, v in values.items()}
    expected["modelspec.thumbnail"] = "data:image/png;base64," + base64.b64encode(thumb.read_bytes()).decode()
    assert {k: md.get(k) for k in expected} == expected
    assert md["ss_output_name"] == "meta"  # the title is the user's; the run's name stays in ss_output_name
    assert md["modelspec.timestep_range"] == "100,1000"  # sd-scripts: max defaults to 1000
    assert md["modelspec.sai_model_spec"] == "1.0.1"

    plain = header(train(tmp_path / "plain", tiny_adapter))
    assert plain["modelspec.title"] == "meta"  # sd-scripts' default: output_name
    assert not {k for k in plain if k[len("modelspec."):] in ("author", "license", "tags", "thumbnail", "timestep_range")}


def test_a_missing_thumbnail_stops_before_training(tmp_path, tiny_adapter):
    with pytest.raises(UserError) as e:
        train(tmp_path, tiny_adapter, metadata_thumbnail=str(tmp_path / "nope.png"))
    assert str(e.value) == f"metadata_thumbnail: '{tmp_path / 'nope.png'}' does not exist (give an image file or a data: URL)"
    assert not (tmp_path / "out" / "meta.safetensors").exists()
