"""config-from-lora on files written by sd-scripts and kohya_ss: their ss_* metadata, as sd-scripts'
train_network.py writes it (`metadata = {...}` then `str()` of every value, JSON for the dicts,
`ss_datasets` with a dataset_config, `module.Class(args)` for ss_optimizer)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from lora_train.network.files import save_lora
from lora_train.train.config import TrainConfig
from lora_train.train.from_metadata import config_from_metadata

ROOT = Path(__file__).resolve().parents[1]


def sd_scripts_flat() -> dict[str, str]:
    """An SD1.5 LoCon trained with train_network.py and flat dataset options (no dataset_config)."""
    args = {
        "ss_session_id": 1234567, "ss_training_started_at": 1700000000.5, "ss_output_name": "mychar",
        "ss_learning_rate": 0.0001, "ss_text_encoder_lr": 5e-05, "ss_unet_lr": 0.0001, "ss_num_train_images": 200,
        "ss_num_reg_images": 0, "ss_num_batches_per_epoch": 100, "ss_num_epochs": 10, "ss_gradient_checkpointing": True,
        "ss_gradient_accumulation_steps": 1, "ss_max_train_steps": 1000, "ss_lr_warmup_steps": 0,
        "ss_lr_scheduler": "cosine_with_restarts", "ss_network_module": "networks.lora", "ss_network_dim": 32,
        "ss_network_alpha": 16.0, "ss_network_dropout": None, "ss_mixed_precision": "fp16", "ss_full_fp16": False,
        "ss_v2": False, "ss_base_model_version": "sd_v1", "ss_clip_skip": 2, "ss_max_token_length": 225,
        "ss_cache_latents": True, "ss_seed": 42, "ss_lowram": False, "ss_noise_offset": 0.05,
        "ss_multires_noise_iterations": None, "ss_multires_noise_discount": 0.3, "ss_adaptive_noise_scale": None,
        "ss_zero_terminal_snr": False, "ss_training_comment": None, "ss_sd_scripts_commit_hash": "0a1b2c3",
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1,betas=(0.9, 0.99))", "ss_max_grad_norm": 1.0,
        "ss_caption_dropout_rate": 0.0, "ss_caption_dropout_every_n_epochs": 0, "ss_caption_tag_dropout_rate": 0.0,
        "ss_face_crop_aug_range": None, "ss_prior_loss_weight": 1.0, "ss_min_snr_gamma": 5.0, "ss_scale_weight_norms": None,
        "ss_ip_noise_gamma": None, "ss_debiased_estimation": False, "ss_noise_offset_random_strength": False,
        "ss_ip_noise_gamma_random_strength": False, "ss_loss_type": "l2", "ss_huber_schedule": "snr", "ss_huber_scale": 1,
        "ss_huber_c": 0.1, "ss_fp8_base": False, "ss_fp8_base_unet": False,
        "ss_batch_size_per_device": 2, "ss_total_batch_size": 2, "ss_resolution": (512, 512), "ss_color_aug": False,
        "ss_flip_aug": True, "ss_random_crop": False, "ss_shuffle_caption": True, "ss_enable_bucket": True,
        "ss_bucket_no_upscale": False, "ss_min_bucket_reso": 256, "ss_max_bucket_reso": 1024, "ss_keep_tokens": 1,
        "ss_dataset_dirs": json.dumps({"10_mychar": {"n_repeats": 10, "img_count": 20}}), "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps({"10_mychar": {"mychar": 20, "red hair": 12}}), "ss_bucket_info": json.dumps(None),
        "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"}),
        "ss_sd_model_hash": "e1441589", "ss_new_sd_model_hash": "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516",
        "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    }
    return {k: str(v) for k, v in args.items()}  # sd-scripts: metadata = {k: str(v) for k, v in metadata.items()}


def test_an_sd_scripts_lora_file_gives_back_its_config(tmp_path):
    lora = save_lora(tmp_path / "mychar-000010.safetensors", {"lora_unet_x.alpha": torch.tensor(16.0)}, sd_scripts_flat())
    r = subprocess.run([sys.executable, "-m", "lora_train", "config-from-lora", str(lora), "--output", str(tmp_path / "back.toml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    c = TrainConfig.from_toml(tmp_path / "back.toml")
    assert (c.network.network_module, c.network.network_dim, c.network.network_alpha, c.network.conv_dim, c.network.conv_alpha) == (
        "networks.lora", 32, 16.0, 8, 4.0)
    assert (c.optimizer.optimizer_type, c.optimizer.optimizer_args) == ("AdamW8bit", ["weight_decay=0.1", "betas=(0.9, 0.99)"])
    assert (c.optimizer.learning_rate, c.optimizer.unet_lr, c.optimizer.text_encoder_lr, c.optimizer.lr_scheduler) == (
        1e-4, 1e-4, 5e-5, "cosine_with_restarts")
    assert (c.training.mixed_precision, c.training.seed, c.training.min_snr_gamma, c.training.noise_offset) == ("fp16", 42, 5.0, 0.05)
    assert (c.training.max_train_epochs, c.training.train_batch_size, c.training.gradient_checkpointing) == (10, 2, True)
    assert (c.model.clip_skip, c.dataset.resolution, c.dataset.flip_aug, c.dataset.shuffle_caption, c.dataset.keep_tokens) == (
        2, "512,512", True, True, 1)
    assert (c.dataset.max_bucket_reso, c.saving.output_name) == (1024, "mychar")
    if "max_token_length" in TrainConfig.key_index():  # another key sd-scripts records as ss_<key>
        assert c.get("max_token_length") == 225
    assert "10_mychar: 20 images, 10 repeats" in r.stderr
    assert "v1-5-pruned-emaonly.safetensors" in r.stderr


def test_sd_scripts_dataset_config_runs_read_ss_datasets():
    md = sd_scripts_flat()
    for key in ("ss_batch_size_per_device", "ss_resolution", "ss_flip_aug", "ss_shuffle_caption", "ss_keep_tokens", "ss_enable_bucket",
                "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_color_aug", "ss_random_crop", "ss_bucket_no_upscale", "ss_reg_dataset_dirs"):
        del md[key]  # with a dataset_config sd-scripts writes ss_datasets instead
    subset = {"img_count": 20, "num_repeats": 10, "color_aug": False, "flip_aug": False, "random_crop": False, "shuffle_caption": True,
              "keep_tokens": 1, "keep_tokens_separator": "|||", "secondary_separator": None, "enable_wildcard": False,
              "caption_prefix": None, "caption_suffix": None, "resize_interpolation": None, "image_dir": "10_char",
              "class_tokens": "char", "is_reg": False}
    datasets = [{"is_dreambooth": True, "batch_size_per_device": 4, "num_train_images": 260, "num_reg_images": 0,
                 "resolution": (1024, 1024), "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048,
                 "tag_frequency": {}, "bucket_info": None, "resize_interpolation": None,
                 "subsets": [subset, {**subset, "img_count": 30, "num_repeats": 2, "flip_aug": True, "image_dir": "2_style"},
                             {**subset, "img_count": 50, "num_repeats": 1, "image_dir": "reg", "is_reg": True}]}]
    md.update({"ss_datasets": json.dumps(datasets), "ss_base_model_version": "sdxl_base_v1-0",
               "ss_dataset_dirs": json.dumps({"10_char": {"n_repeats": 10, "img_count": 20}, "2_style": {"n_repeats": 2, "img_count": 30}}),
               "ss_text_encoder_lr": str([0.0001, 5e-05]),  # SDXL: one rate per text encoder
               "ss_optimizer": "prodigyopt.prodigy.Prodigy(decouple=True,weight_decay=0.01,use_bias_correction=True,d_coef=2)",
               "ss_lr_scheduler": "constant"})
    c, notes = config_from_metadata(md)
    assert (c.dataset.resolution, c.training.train_batch_size, c.dataset.enable_bucket, c.dataset.max_bucket_reso) == ("1024,1024", 4, True, 2048)
    assert (c.dataset.shuffle_caption, c.dataset.keep_tokens, c.dataset.keep_tokens_separator) == (True, 1, "|||")
    assert c.dataset.flip_aug is False and any("the subsets differ in flip_aug" in n for n in notes)
    assert c.optimizer.text_encoder_lr == 1e-4 and any("one rate per text encoder" in n for n in notes)
    assert (c.optimizer.optimizer_type, c.optimizer.optimizer_args) == (
        "Prodigy", ["decouple=True", "weight_decay=0.01", "use_bias_correction=True", "d_coef=2"])
    (folders,) = [n for n in notes if n.startswith("dataset:")]
    assert folders.splitlines()[1:] == ["  10_char: 20 images, 10 repeats", "  2_style: 30 images, 2 repeats",
                                        "  reg: 50 regularization images, 1 repeats"]


def test_a_kohya_ss_lycoris_file():
    """kohya_ss' LyCORIS presets: network_args as LyCORIS writes them, strings, with one LoRA Train has no use for."""
    md = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "16", "ss_network_alpha": "8",
          "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1", "algo": "locon", "dropout": "0", "preset": "full",
                                         "use_tucker": "False", "rank_dropout_scale": "False", "train_norm": "False",
                                         "loraplus_lr_ratio": "16"}),
          "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01)", "ss_lr_scheduler": "cosine", "ss_v2": "True",
          "ss_base_model_version": "sd_v2", "ss_sd_model_name": "v2-1_768-ema-pruned.safetensors", "modelspec.prediction_type": "v",
          "ss_resolution": "(768, 768)"}
    c, notes = config_from_metadata(md)
    n = c.network
    assert (n.network_module, n.network_dim, n.network_alpha, n.algo, n.conv_dim, n.conv_alpha, n.preset, n.network_dropout) == (
        "lycoris.kohya", 16, 8.0, "locon", 4, 1.0, "full", 0.0)
    assert (c.optimizer.optimizer_type, c.optimizer.optimizer_args, c.optimizer.lr_scheduler) == ("AdamW", ["weight_decay=0.01"], "cosine")
    assert "ss_network_args: LoRA Train has no network argument loraplus_lr_ratio=16; left out" in notes
    if "v2" in TrainConfig.key_index():
        assert c.get("v2") is True and c.get("v_parameterization") is True
    else:
        assert "base model: v2; LoRA Train reads it from the checkpoint's .yaml" in notes


def test_a_value_that_does_not_fit_is_a_note_not_the_end():
    md = {"ss_network_dim": "32", "ss_seed": "not-a-number", "ss_optimizer": "torch.optim.sgd.SGD(momentum=0.9,nesterov=True)",
          "ss_resolution": "512"}
    c, notes = config_from_metadata(md)
    assert c.network.network_dim == 32 and c.dataset.resolution == "512,512"
    assert c.optimizer.optimizer_type == "SGDNesterov"  # sd-scripts builds SGDNesterov as SGD(nesterov=True)
    assert any("'seed' must be int" in n for n in notes)
