"""Every option of sd-scripts' train_network.py / sdxl_train_network.py is a config key, another
name for one, accepted with a note, or refused with a reason: a config written for sd-scripts,
kohya_ss or lora-scripts never meets "unknown key"."""

import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lora_train.errors import UserError
from lora_train.train import compat
from lora_train.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _options(fixtures_dir) -> list[tuple[str, str, object]]:
    """(key, argparse type, default) per row of the fixture."""
    rows = []
    for line in (fixtures_dir / "sd-scripts-train-network-args.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        key, kind, default = line.split("\t")[:3]
        try:
            value = ast.literal_eval(default)
        except (ValueError, SyntaxError):
            value = default
        rows.append((key, kind, value))
    return rows


def _asking(kind: str):
    """A value that asks for the option."""
    return {"store_true": True, "int": 3, "float": 0.5, "int_or_float": 0.5}.get(kind, "x")


def test_every_sd_scripts_option_is_known(fixtures_dir):
    rows = _options(fixtures_dir)
    assert len(rows) == 196
    index = TrainConfig.key_index()
    counts = {"implemented": 0, "noted": 0, "refused": 0}
    for key, kind, _ in rows:
        if key in index or key == "network_args":
            counts["implemented"] += 1
            continue
        assert key in compat.known_keys(), f"{key}: sd-scripts has it; it must be a key, an alias, NOTED or REFUSED"
        try:
            config = TrainConfig().update({key: _asking(kind)}, source="s.toml")
        except UserError as e:
            assert key in compat.REFUSED, f"{key}: {e}"
            assert str(e) == f"s.toml: {key}: {compat.REFUSED[key]}"
            assert "unknown" not in str(e)
            counts["refused"] += 1
        else:
            assert key in compat.NOTED or key in compat.ALIASES, key
            assert [n for n in config.notes if n.startswith(f"s.toml: {key}: ")], f"{key}: accepted without a note"
            implemented = key in compat.ALIASES and key != "cache_text_encoder_outputs_to_disk"  # that one caches in memory
            counts["implemented" if implemented else "noted"] += 1
    assert counts == {"implemented": 153, "noted": 36, "refused": 7}
    assert not compat.known_keys() & set(index), "a compat key shadows a config key"
    assert compat.known_keys() <= {key for key, _, _ in rows}, "compat lists only sd-scripts' options"


def test_default_values_ask_for_nothing(fixtures_dir):
    """The GUIs write every option with its default (xformers = false, zero_stage = 2): no note, no refusal."""
    for key, kind, default in _options(fixtures_dir):
        if key not in compat.known_keys():
            continue
        value = False if kind == "store_true" and default is None else default
        config = TrainConfig().update({key: value}, source="s.toml")
        assert config.notes == [], key
    TrainConfig().update({"v2": "false", "vae": "", "max_token_length": "75", "validation_split": 0.0, "lr_scheduler_args": []})


def test_notes_share_a_line_and_are_not_repeated():
    config = TrainConfig().update({"xformers": True, "sdpa": True, "max_data_loader_n_workers": 4,
                                   "persistent_data_loader_workers": True}, source="a.toml")
    assert config.notes == [
        f"a.toml: xformers: {compat.NOTED['xformers']}",
        f"a.toml: sdpa: {compat.NOTED['sdpa']}",
        f"a.toml: persistent_data_loader_workers: {compat.NOTED['persistent_data_loader_workers']}",
    ]
    assert config.dataset.max_data_loader_n_workers == 4  # a key now: threads that make the images ahead
    config.update({"sdpa": True}, source="--set")
    config.update({"sdpa": True}, source="--set")
    assert config.notes[3:] == [f"--set: sdpa: {compat.NOTED['sdpa']}"]
    # notes are not settings: a saved config does not carry them, and they do not make configs differ
    assert config == TrainConfig().update({"max_data_loader_n_workers": 4})
    assert "notes" not in config.to_toml_dict()


def test_refused_options_say_why_and_are_listed_with_unknown_keys():
    with pytest.raises(UserError) as e:
        TrainConfig().update({"fp8_base": True}, source="a.toml")
    assert str(e.value).startswith("a.toml: fp8_base: keeps the base model in 8-bit floats to save VRAM, a GPU-only path")
    with pytest.raises(UserError) as e:
        TrainConfig().update({"masked_loss": True}, source="a.toml")
    assert str(e.value) == "a.toml: masked_loss: not supported yet: weighting the loss by a mask (alpha_mask or conditioning_data_dir)"
    with pytest.raises(UserError) as e:
        TrainConfig().update({"deepspeed": True}, source="a.toml")
    assert "accelerate launch" in str(e.value)
    with pytest.raises(UserError) as e:
        TrainConfig().update({"netwrok_dim": 4, "xformer": True, "fp8_base_unet": True, "dataset_class": "my.Dataset"}, source="a.toml")
    assert str(e.value).splitlines() == [
        "a.toml: unknown keys:",
        "  netwrok_dim (did you mean 'network_dim'?)",
        "  xformer (did you mean 'xformers'?)",  # the suggestions know sd-scripts' options too
        "a.toml: these sd-scripts options cannot be used:",
        f"  fp8_base_unet: {compat.REFUSED['fp8_base_unet']}",
        f"  dataset_class: {compat.REFUSED['dataset_class']}",
    ]


def test_options_that_change_the_result_are_not_noted():
    """A note would let the run differ from sd-scripts' without the user choosing it."""
    for key in ("v2", "v_parameterization", "vae", "no_half_vae", "in_json", "max_token_length", "weighted_captions",
                "token_warmup_step", "scale_weight_norms", "base_weights", "face_crop_aug_range", "masked_loss",
                "resize_interpolation", "no_metadata", "fp8_base", "initial_step", "lr_scheduler_type"):
        assert key not in compat.NOTED, key
        assert (key in compat.REFUSED) != (key in TrainConfig.key_index()), f"{key}: implemented or refused, not both or neither"
    for key in ("validation_seed", "validation_split", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        assert key in TrainConfig.key_index() and key not in compat.known_keys(), key  # tests/test_validation.py: their effect


def test_aliases_set_their_key():
    config = TrainConfig().update({"caption_extention": ".caption"}, source="a.toml")
    assert config.dataset.caption_extension == ".caption"
    assert config.notes == ["a.toml: caption_extention: sd-scripts' old spelling, read as caption_extension"]
    # sd-scripts reads the old spelling over the new one
    assert TrainConfig().update({"caption_extension": ".txt", "caption_extention": ".cap"}).dataset.caption_extension == ".cap"
    assert TrainConfig().update({"use_8bit_adam": True}).optimizer.optimizer_type == "AdamW8bit"
    assert TrainConfig().update({"use_lion_optimizer": True, "optimizer_type": ""}).optimizer.optimizer_type == "Lion"
    assert TrainConfig().update({"optimizer_type": "adamw8bit", "use_8bit_adam": True}).optimizer.optimizer_type == "AdamW8bit"
    config = TrainConfig().update({"cache_text_encoder_outputs_to_disk": True, "cache_text_encoder_outputs": False})
    assert config.training.cache_text_encoder_outputs is True
    # two options choosing the optimizer: sd-scripts stops too; whichever comes first
    for flat in ({"use_8bit_adam": True, "optimizer_type": "Lion"}, {"optimizer_type": "Lion", "use_8bit_adam": True}):
        with pytest.raises(UserError, match="use_8bit_adam: optimizer_type is set too"):
            TrainConfig().update(flat, source="a.toml")
    with pytest.raises(UserError, match="use_lion_optimizer: use_8bit_adam is set too"):
        TrainConfig().update({"use_8bit_adam": True, "use_lion_optimizer": True}, source="a.toml")


TUTORIAL_SDXL = """
[sdxl_arguments]
cache_text_encoder_outputs = false
no_half_vae = false
min_timestep = 0
max_timestep = 1000

[model_arguments]
pretrained_model_name_or_path = "sd_xl_base_1.0.safetensors"
vae = ""

[dataset_arguments]
debug_dataset = false
in_json = ""
train_data_dir = "train"
dataset_repeats = 1
shuffle_caption = true
keep_tokens = 1
resolution = "1024,1024"
caption_dropout_rate = 0
caption_tag_dropout_rate = 0
caption_dropout_every_n_epochs = 0
color_aug = false
token_warmup_min = 1
token_warmup_step = 0

[training_arguments]
output_dir = "output"
output_name = "sdxl_lora"
save_precision = "fp16"
save_every_n_epochs = 1
train_batch_size = 4
max_token_length = 225
mem_eff_attn = false
sdpa = true
xformers = false
max_train_epochs = 10
max_data_loader_n_workers = 8
persistent_data_loader_workers = true
gradient_checkpointing = true
gradient_accumulation_steps = 1
mixed_precision = "bf16"

[logging_arguments]
log_with = "tensorboard"
logging_dir = "logs"
log_prefix = "sdxl_lora"

[sample_prompt_arguments]
sample_every_n_epochs = 1
sample_sampler = "euler_a"

[saving_arguments]
save_model_as = "safetensors"

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 1e-4
max_grad_norm = 1.0
lr_scheduler = "constant"
lr_warmup_steps = 0

[additional_network_arguments]
no_metadata = false
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_train_unet_only = true
"""


def test_the_tutorial_sdxl_config_loads_with_notes(tmp_path):
    """The sd-scripts SDXL config users copy from the tutorial: its 14 options that were "unknown"."""
    p = tmp_path / "sdxl.toml"
    p.write_text(TUTORIAL_SDXL, encoding="utf-8")
    config = TrainConfig.from_toml(p)
    assert config.network.network_dim == 32 and config.optimizer.optimizer_type == "AdamW8bit"
    assert config.training.max_token_length == 225
    assert (config.dataset.token_warmup_min, config.dataset.token_warmup_step) == (1, 0)
    assert config.notes == [f"{p}: sdpa: {compat.NOTED['sdpa']}",
                            f"{p}: persistent_data_loader_workers: {compat.NOTED['persistent_data_loader_workers']}"]


def test_config_notes_travel_with_the_trainer():
    from lora_train.train.loop import Trainer

    config = TrainConfig().update({"xformers": True}, source="a.toml")
    config.warnings.append("a.toml: read after normalising text pasted from a web page: U+00A0→' ' ×1")
    adapter = types.SimpleNamespace(info=types.SimpleNamespace(notes=["from the model"]), can_train_text_encoder=lambda: True)
    data = types.SimpleNamespace(plan=None, seed=0)
    trainer = Trainer(config, adapter, network=None, data=data)
    assert trainer.notes == [*config.warnings, *config.notes, "from the model"]


def test_cli_prints_notes_and_the_paste_warning_before_a_failure(tmp_path):
    p = tmp_path / "c.toml"
    # pasted: a non-breaking space before "=", and no model, so the run stops before loading anything
    p.write_text(f'train_data_dir = "{(tmp_path / "nope").as_posix()}"\nsdpa\u00a0= true\npersistent_data_loader_workers = true\n',
                 encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("LANG", "LC_ALL", "LC_MESSAGES", "LORA_TRAIN_LANG")}
    r = subprocess.run([sys.executable, "-m", "lora_train", "train", "--config", str(p), "--set", "xformers=true"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert lines[:4] == [
        f"warning: {p}: read after normalising text pasted from a web page: U+00A0→' ' ×1",
        f"note: {p}: sdpa: {compat.NOTED['sdpa']}",
        f"note: {p}: persistent_data_loader_workers: {compat.NOTED['persistent_data_loader_workers']}",
        f"note: --set: xformers: {compat.NOTED['xformers']}",
    ], r.stderr
    assert lines[4].startswith("error: ") and "pretrained_model_name_or_path" in lines[4]
