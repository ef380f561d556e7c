"""Starting points by subject and base, like the online trainers offer. Values are sd-scripts keys;
they are applied over the current form, so anything a preset does not name stays as the user set it."""

from __future__ import annotations

SUBJECTS = ("character", "style", "concept")
BASES = ("SD1.5", "SDXL")

_COMMON = {
    "optimizer_type": "AdamW", "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3,
    "lr_warmup_steps": 0.05, "enable_bucket": True, "cache_latents": True, "min_snr_gamma": 5.0,
    "save_every_n_epochs": 1, "shuffle_caption": True, "max_grad_norm": 1.0,
}
_SUBJECT = {
    # a character: the trigger word stays first, text encoder trained gently
    "character": {"network_dim": 32, "network_alpha": 16, "learning_rate": 5e-4, "unet_lr": 5e-4, "text_encoder_lr": 1e-4,
                  "keep_tokens": 1, "max_train_epochs": 10, "noise_offset": None},
    # a style: every tag may move, more epochs at a lower rate, a bit of noise offset for contrast
    "style": {"network_dim": 32, "network_alpha": 16, "learning_rate": 3e-4, "unet_lr": 3e-4, "text_encoder_lr": 5e-5,
              "keep_tokens": 0, "max_train_epochs": 15, "noise_offset": 0.05},
    # a concept or object: smaller rank is enough
    "concept": {"network_dim": 16, "network_alpha": 8, "learning_rate": 4e-4, "unet_lr": 4e-4, "text_encoder_lr": 1e-4,
                "keep_tokens": 1, "max_train_epochs": 12, "noise_offset": None},
}
_BASE = {
    "SD1.5": {"resolution": "512", "train_batch_size": 2, "min_bucket_reso": 256, "max_bucket_reso": 1024,
              "bucket_reso_steps": 64, "network_train_unet_only": False, "cache_text_encoder_outputs": False,
              "gradient_checkpointing": False, "clip_skip": None},
    # SDXL: UNet only with cached text-encoder outputs is what fits in consumer VRAM
    "SDXL": {"resolution": "1024", "train_batch_size": 1, "min_bucket_reso": 512, "max_bucket_reso": 2048,
             "bucket_reso_steps": 32, "network_train_unet_only": True, "cache_text_encoder_outputs": True,
             # cached text-encoder outputs need captions that do not change between steps
             "gradient_checkpointing": True, "clip_skip": None, "shuffle_caption": False},
}
_SDXL_LR = {"character": 1e-4, "style": 1e-4, "concept": 1e-4}


def preset(subject: str, base: str) -> dict:
    if subject not in SUBJECTS or base not in BASES:
        raise KeyError(f"no preset for {subject} x {base}")
    values = {**_COMMON, **_SUBJECT[subject], **_BASE[base]}
    if base == "SDXL":
        values.update(learning_rate=_SDXL_LR[subject], unet_lr=_SDXL_LR[subject], text_encoder_lr=None)
    return values


# The network types the tab offers, with the defaults the guides our users follow give each: the SDXL tutorial's
# dim/alpha/conv_dim/conv_alpha (LoRA 32/1/-/-, LoCon 16/8/8/1, LoHa 8/4/4/1), kohya_ss' LyCORIS presets for the
# rest. Choosing one sets these fields; the fields (Expert: network_module, algo ...) stay what a run trains.
_NOT_LYCORIS = {"network_module": "networks.lora", "algo": None, "preset": None, "dora_wd": False, "factor": -1}
_LYCORIS = {"network_module": "lycoris.kohya", "preset": None, "dora_wd": False, "factor": -1}
NETWORK_TYPES: dict[str, dict] = {
    "LoRA": {**_NOT_LYCORIS, "network_dim": 32, "network_alpha": 1, "conv_dim": None, "conv_alpha": None},
    "LoCon": {**_NOT_LYCORIS, "network_dim": 16, "network_alpha": 8, "conv_dim": 8, "conv_alpha": 1},
    "LoHa": {**_LYCORIS, "algo": "loha", "network_dim": 8, "network_alpha": 4, "conv_dim": 4, "conv_alpha": 1},
    "LoKr": {**_LYCORIS, "algo": "lokr", "factor": 8, "network_dim": 8, "network_alpha": 8, "conv_dim": 4, "conv_alpha": 1},
    "DoRA": {**_LYCORIS, "algo": "lora", "dora_wd": True, "preset": "attn-mlp", "network_dim": 16, "network_alpha": 8,
             "conv_dim": None, "conv_alpha": None},
    "IA3": {**_LYCORIS, "algo": "ia3", "preset": "ia3", "conv_dim": None, "conv_alpha": None},
    "Diag-OFT": {**_LYCORIS, "algo": "diag-oft", "preset": "attn-mlp", "network_dim": 16, "conv_dim": None, "conv_alpha": None},
}


def network_type_of(network) -> str:
    """The network type a NetworkConfig trains, by NETWORK_TYPES' names (what the radio shows)."""
    if network.network_module != "lycoris.kohya":
        return "LoCon" if network.conv_dim else "LoRA"
    algo = (network.algo or "lora").lower()
    if network.dora_wd:
        return "DoRA"
    return next((name for name, v in NETWORK_TYPES.items() if v.get("algo") == algo and not v["dora_wd"]), "LoCon" if algo in ("lora", "locon") else algo)
