"""The modules a LoRA trains on a full-size SD1.5 / SD2.1 / SDXL, listed from meta-device models."""

from __future__ import annotations

from torch import nn

from lora_train.model.arch import ARCHS, meta_text_model, meta_unet
from lora_train.network.naming import PREFIX_TE, PREFIX_TE1, PREFIX_TE2
from lora_train.network.targets import Target, hf_clip_targets, is_linear, ldm_unet_targets, sdxl_unet_targets


def reference_targets(arch: str, conv: bool = False) -> list[Target]:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}' (known: {', '.join(ARCHS)})")
    if arch == "sdxl":
        return (hf_clip_targets(meta_text_model("sdxl-te1"), PREFIX_TE1) + hf_clip_targets(meta_text_model("sdxl-te2"), PREFIX_TE2)
                + sdxl_unet_targets(meta_unet(arch), conv))
    return hf_clip_targets(meta_text_model(arch), PREFIX_TE) + ldm_unet_targets(meta_unet(arch), conv)


def describe(target: Target, dim: int = 4, conv_dim: int = 4, alpha: float = 1.0, conv_alpha: float = 1.0) -> dict:
    """A target as kohya's shape lists describe it: class, sizes and the LoRA weight shapes."""
    m = target.module
    rank, a = (conv_dim, conv_alpha) if target.is_conv3x3 else (dim, alpha)
    out = {"name": target.name, "module_path": target.path, "class": type(m).__name__, "lora_dim": rank, "alpha": a}
    if isinstance(m, nn.MultiheadAttention):  # one projection of a fused attention: a Linear to sd-scripts
        out.update({"class": "Linear", "module_path": f"{target.path}[{target.part}]"})
        m = nn.Linear(m.embed_dim, m.embed_dim, device="meta")
    if is_linear(m):
        out.update(in_features=m.in_features, out_features=m.out_features,
                   lora_down_weight_shape=[rank, m.in_features], lora_up_weight_shape=[m.out_features, rank])
    else:
        out.update(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                   lora_down_weight_shape=[rank, m.in_channels, *m.kernel_size], lora_up_weight_shape=[m.out_channels, rank, 1, 1])
    return out
