"""Captions as token rows for a CLIP text encoder, the way sd-scripts feeds them:

- `max_token_length` 150 / 225: a caption keeps up to that many tokens instead of 75. The tokens are
  cut into 75-token chunks, each encoded on its own as BOS + 75 tokens + EOS (or pad) in a
  77-token row; the hidden states are joined as sd-scripts joins them: the first row's BOS, the
  75 inner states of every row, the last row's final state (2 + 75 x chunks positions). With 75
  (or none) this is the usual single row, cut at 75 tokens.
- `weighted_captions`: `(word:1.3)` weights (`prompt_weights`) multiply the hidden states of their
  tokens; BOS, EOS and padding keep weight 1. As in sd-scripts since its text-encoding strategies
  (2024-10), the mean is not restored and SDXL's pooled output is not weighted.

The WebUI concatenates whole 77-token rows instead; sd-scripts' layout is the one a LoRA made with
sd-scripts was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lora_train.errors import UserError, msg
from lora_train.model.prompt_weights import parse_weights

CHUNK = 75  # tokens per row between BOS and EOS
ROW = CHUNK + 2
LENGTHS = (75, 150, 225)


@dataclass(frozen=True)
class TextOptions:
    max_token_length: int | None = None  # None or 75: one row
    weighted: bool = False

    def __post_init__(self):
        if self.max_token_length is not None and self.max_token_length not in LENGTHS:
            raise UserError(msg("max_token_length must be 75, 150 or 225 (tokens per caption), got {value}", value=self.max_token_length))

    @property
    def chunks(self) -> int:
        return (self.max_token_length or CHUNK) // CHUNK


@dataclass(frozen=True)
class Vocab:
    """How one text encoder spells text: token ids without BOS/EOS, and its special ids."""

    encode: Callable[[str], list[int]]
    bos: int
    eos: int
    pad: int  # SD1's CLIP-L pads with EOS; OpenCLIP (SD2, SDXL's encoder 2) with 0


def hf_vocab(tokenizer) -> Vocab:
    """A Hugging Face CLIPTokenizer."""
    def encode(text: str) -> list[int]:
        # no truncation here (rows cut it), so no "longer than 77" warning either
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    return Vocab(encode, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def openclip_vocab() -> Vocab:
    """open_clip's tokenizer, as `open_clip.tokenize` uses it (zero padding)."""
    from open_clip import tokenizer as oc

    t = oc._tokenizer
    return Vocab(t.encode, t.encoder["<start_of_text>"], t.encoder["<end_of_text>"], 0)


def token_rows(captions: list[str], vocab: Vocab, options: TextOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, N*chunks x 77: each caption's rows one after the other; weights, N x (2 + 75*chunks):
    one per position of the joined hidden states)."""
    n = options.chunks
    rows, weights = [], []
    for caption in captions:
        if options.weighted:
            # each weighted run is tokenized on its own, as sd-scripts does
            ids, w = [], []
            for text, weight in parse_weights(caption):
                piece = vocab.encode(text)
                ids += piece
                w += [weight] * len(piece)
        else:
            ids = vocab.encode(caption)
            w = [1.0] * len(ids)
        ids, w = ids[: CHUNK * n], w[: CHUNK * n]
        full = [vocab.bos, *ids, vocab.eos] + [vocab.pad] * (CHUNK * n - len(ids))
        for k in range(n):
            rows.append(_row(full, k, n, vocab))
        weights.append([1.0, *w] + [1.0] * (CHUNK * n + 1 - len(w)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


def _row(full: list[int], k: int, n: int, vocab: Vocab) -> list[int]:
    row = [vocab.bos, *full[1 + CHUNK * k : 1 + CHUNK * (k + 1)], full[-1]]
    if n > 1:
        # sd-scripts' rules for a middle row: one that ends in a token gets an EOS (with EOS
        # padding it is one already), an empty one reads BOS EOS pad ...
        if row[-2] not in (vocab.eos, vocab.pad):
            row[-1] = vocab.eos
        if row[1] == vocab.pad:
            row[1] = vocab.eos
    return row


def join_chunks(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """N*n x 77 x D hidden states of `token_rows` -> N x (2 + 75*n) x D."""
    if n == 1:
        return hidden
    h = hidden.reshape(-1, n, ROW, hidden.shape[-1])
    inner = h[:, :, 1:-1].reshape(h.shape[0], CHUNK * n, h.shape[-1])
    return torch.cat([h[:, 0, :1], inner, h[:, -1, -1:]], dim=1)


def first_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Per caption, what its first row gave (SDXL's pooled output comes from the first chunk)."""
    return x[::n]


def weigh(hidden: torch.Tensor, weights: torch.Tensor, options: TextOptions) -> torch.Tensor:
    if not options.weighted:
        return hidden
    return hidden * weights.to(hidden.device, hidden.dtype).unsqueeze(-1)
