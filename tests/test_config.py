"""The config tree reads sd-scripts / kohya_ss / lora-scripts TOML and writes it back."""

import pytest

from lora_train.errors import UserError
from lora_train.train.config import TrainConfig, parse_set_value

LORA_SCRIPTS_STYLE = """
pretrained_model_name_or_path = "./sd-models/model.safetensors"
train_data_dir = "./train/aki"
resolution = "512,512"
output_name = "aki"
output_dir = "./output"
save_every_n_epochs = 2
max_train_epochs = 10
train_batch_size = 1
network_train_unet_only = false
learning_rate = 1e-4
unet_lr = 1e-4
text_encoder_lr = 1e-5
lr_scheduler = "constant"
optimizer_type = "AdamW"
network_module = "networks.lora"
network_dim = 32
network_alpha = 32
network_args = ["conv_dim=8", "conv_alpha=4"]
seed = 1337
clip_skip = 2
caption_extension = ".txt"
save_precision = "fp16"
mixed_precision = "no"
"""


def test_reads_flat_lora_scripts_toml(tmp_path):
    p = tmp_path / "a.toml"
    p.write_text(LORA_SCRIPTS_STYLE, encoding="utf-8")
    c = TrainConfig.from_toml(p)
    assert c.network.network_dim == 32 and c.network.network_alpha == 32.0
    assert c.network.conv_dim == 8 and c.network.conv_alpha == 4.0
    assert c.optimizer.text_encoder_lr == 1e-5 and c.model.clip_skip == 2
    assert c.dataset.resolution == "512,512" and c.training.seed == 1337


def test_sectioned_tables_are_flattened_like_sd_scripts(tmp_path):
    p = tmp_path / "b.toml"
    p.write_text('[model_arguments]\npretrained_model_name_or_path = "m.ckpt"\n[training_arguments]\nmax_train_steps = 7\n', encoding="utf-8")
    c = TrainConfig.from_toml(p)
    assert c.model.pretrained_model_name_or_path == "m.ckpt" and c.training.max_train_steps == 7


def test_round_trip_through_toml(tmp_path):
    c = TrainConfig().update({"network_dim": 16, "conv_dim": 4, "conv_alpha": 2, "unet_lr": 3e-4, "output_name": "名前"})
    path = c.save_toml(tmp_path / "out.toml")
    assert "network_args" in path.read_text(encoding="utf-8")  # conv settings travel as sd-scripts writes them
    assert TrainConfig.from_toml(path) == c


def test_unknown_keys_are_listed_with_suggestions(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("netwrok_dim = 4\nlearnig_rate = 1e-4\nzzz = 1\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        TrainConfig.from_toml(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "netwrok_dim (did you mean 'network_dim'?)" in msg
    assert "learnig_rate (did you mean 'learning_rate'?)" in msg
    assert "zzz" in msg


def test_type_errors_name_the_key():
    with pytest.raises(UserError, match="'network_dim' must be int"):
        TrainConfig().update({"network_dim": "many"})
    with pytest.raises(UserError, match="'network_train_unet_only' must be bool"):
        TrainConfig().update({"network_train_unet_only": "perhaps"})


def test_set_values_parse_as_toml_or_string():
    assert parse_set_value("1e-4") == 1e-4
    assert parse_set_value("true") is True
    assert parse_set_value("512,768") == "512,768"
    assert parse_set_value('"x y"') == "x y"
    assert parse_set_value("./data/10_a") == "./data/10_a"


def test_bad_toml_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("network_dim = = 4", encoding="utf-8")
    with pytest.raises(UserError, match="not valid TOML"):
        TrainConfig.from_toml(p)
    with pytest.raises(UserError, match="does not exist"):
        TrainConfig.from_toml(tmp_path / "missing.toml")


# A config copied from a web page: each line carries one of the characters such pages put in
PASTED = (
    "\ufeff[model_arguments]\n"  # the file's BOM (utf-8-sig reads it)
    "pretrained_model_name_or_path\u00a0=\u00a0“C:\\models\\sd15.safetensors”\n"  # non-breaking spaces, smart quotes, a Windows path
    "network_dim\u3000＝\u300032\n"  # ideographic spaces, full-width equals sign
    "output_name = ‘my lora’\n"  # smart single quotes
    "caption_extension = ＂.txt＂\n"  # full-width quotes
    "\ufeffseed = 42\ufeff\n"  # byte-order marks pasted around a key and a value
    'optimizer_type = "AdamW8bit”\n'  # an ASCII quote closed by a smart one
    "# a comment keeps “its” quotes\u00a0as they are\n"
    'training_comment = "“quoted” and\u3000spaced"\n'  # a valid string keeps every character
)


def test_text_pasted_from_a_web_page_reads_with_one_warning(tmp_path):
    p = tmp_path / "pasted.toml"
    p.write_text(PASTED, encoding="utf-8")
    c = TrainConfig.from_toml(p)
    assert c.model.pretrained_model_name_or_path == "C:\\models\\sd15.safetensors"
    assert c.network.network_dim == 32 and c.saving.output_name == "my lora" and c.dataset.caption_extension == ".txt"
    assert c.training.seed == 42 and c.optimizer.optimizer_type == "AdamW8bit"
    assert c.saving.training_comment == "“quoted” and\u3000spaced"
    assert len(c.warnings) == 1
    warning = c.warnings[0]
    assert warning.startswith(f"{p}: read after normalising text pasted from a web page: ")
    for shown in ("U+00A0→' ' ×2", "U+3000→' ' ×2", "'＝'→'=' ×1", "U+FEFF→'' ×2", "'‘'→\"'\" ×1", "'＂'→'\"' ×2", "'”'→'\"' ×1"):
        assert shown in warning, shown
    assert "\n" not in warning


def test_a_valid_file_is_read_as_written(tmp_path):
    import warnings

    p = tmp_path / "valid.toml"
    p.write_text('training_comment = "“as typed”\u00a0here"  # “fine”\n', encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = TrainConfig.from_toml(p)
    assert c.saving.training_comment == "“as typed”\u00a0here" and c.warnings == []


def test_pasted_text_in_other_toml_files_warns_and_still_broken_text_is_an_error(tmp_path):
    from lora_train.tomlfile import PastedTextWarning, read_toml

    p = tmp_path / "dataset.toml"
    p.write_text("[general]\nshuffle_caption\u00a0= true\n", encoding="utf-8")
    with pytest.warns(PastedTextWarning, match="U\\+00A0"):
        assert read_toml(p) == {"general": {"shuffle_caption": True}}
    p.write_text("network_dim ＝ ＝ 4\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid TOML"):
        TrainConfig.from_toml(p)
