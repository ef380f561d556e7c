"""CLIP tokenizer and text-model config files, written locally (no model hub).

The host's SD1 text encoder (`ldm...FrozenCLIPEmbedder`) calls `CLIPTokenizer.from_pretrained(version)`
and `CLIPTextModel.from_pretrained(version)`. We give it a folder with the same files as
`openai/clip-vit-large-patch14`, built from the BPE merges that open_clip ships, so token ids are
identical to OpenAI's tokenizer.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

# openai/clip-vit-large-patch14's text tower (what SD1.x uses).
CLIP_L_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
)

# SD2's OpenCLIP ViT-H text tower as sd-scripts converts it to Hugging Face layout: the last of
# its 24 layers is dropped because SD2 conditions on the penultimate layer.
OPENCLIP_H_TEXT_CONFIG = dict(
    CLIP_L_TEXT_CONFIG,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)

# SDXL's second encoder (OpenCLIP ViT-bigG-14), all 32 layers: SDXL also takes the pooled output
OPENCLIP_BIGG_TEXT_CONFIG = dict(
    CLIP_L_TEXT_CONFIG,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)

HUB_CLIP_L = "openai/clip-vit-large-patch14"

TOKENIZER_CONFIG = {
    "model_max_length": 77,
    "do_lower_case": True,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "errors": "replace",
    "tokenizer_class": "CLIPTokenizer",
}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    import open_clip.tokenizer

    bpe_path = Path(open_clip.tokenizer.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    # Same slice as OpenAI's and open_clip's SimpleTokenizer: 49152 - 256 - 2 merges after the header.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_folder(folder: str | os.PathLike, text_config: dict) -> Path:
    """Write tokenizer files and a CLIPTextModel config.json into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG, indent=1),
        "special_tokens_map.json": json.dumps({k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}),
        "config.json": json.dumps(dict(text_config, architectures=["CLIPTextModel"], model_type="clip_text_model"), indent=1),
    }
    for name, text in files.items():
        path = folder / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
    return folder


def cache_dir() -> Path:
    root = os.environ.get("LORA_TRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora_train")
    return Path(root)


def clip_l_folder() -> Path:
    """Local stand-in for `openai/clip-vit-large-patch14` (tokenizer + config, no weights)."""
    return write_clip_folder(cache_dir() / "clip-vit-large-patch14", CLIP_L_TEXT_CONFIG)


@lru_cache(maxsize=1)
def clip_l_tokenizer():
    """SD1's CLIP tokenizer from that folder (no download), built once per process: token counts
    for the dataset check and the tag editor."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_l_folder()))
