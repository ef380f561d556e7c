"""LoCon: LoRA on a Conv2d with a kernel larger than 1x1 (sd-scripts' `conv_dim` / `conv_alpha`,
"C3Lier"). `lora_down` is a conv with the target's kernel, stride and padding, `lora_up` a 1x1 conv;
the file keys are LoRA's (`lora_down.weight`, `lora_up.weight`, `alpha`), as in sd-scripts'
`networks/lora.py` and LyCORIS' plain LoCon. LyCORIS' Tucker/CP variant (`lora_mid.weight`) is
another decomposition and not this class.
"""

from __future__ import annotations

from torch import nn

from lora_train.network.lora import LoRA, is_spatial_conv


class LoCon(LoRA):
    algorithm = "LoCon"

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        return is_spatial_conv(org)
