"""Preview sampling over the ModelAdapter contract: our DDIM / Euler (a) samplers with
classifier-free guidance, sd-scripts' sample prompt files, and PNGs with A1111 infotext."""

from lora_train.sample.prompts import SamplePrompt, load_prompts, parse_prompt_line

# `render` the function is not re-exported here: it would shadow the `render` module.
from lora_train.sample.render import decode_latents, generate_latents, sample_with_loras, save_sample

__all__ = [
    "SamplePrompt",
    "decode_latents",
    "generate_latents",
    "load_prompts",
    "parse_prompt_line",
    "sample_with_loras",
    "save_sample",
]
