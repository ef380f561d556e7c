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
