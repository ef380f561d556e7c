"""sd-scripts' max_token_length (captions past 75 tokens, in 75-token chunks) and weighted_captions
((word:1.3) weights), on the tiny models. Expected values are built by hand: token rows written out,
the text encoder called directly on them, weights multiplied in."""

import pytest
import torch

from lora_train.errors import UserError
from lora_train.model.caption_tokens import TextOptions, openclip_vocab, token_rows
from lora_train.model.loading import quiet
from lora_train.model.prompt_weights import parse_weights

BOS, EOS = 49406, 49407  # CLIP's <|startoftext|>, <|endoftext|>
RED, BLUE = "red", "blue"  # one token each
LONG = " ".join([RED] * 75 + [BLUE] * 75)  # 150 tokens
FIRST = " ".join([RED] * 75)  # its first 75


@pytest.fixture(scope="module")
def sd1_model():
    from lora_train.model.tiny import build_tiny

    with quiet():
        return build_tiny(0)


@pytest.fixture(scope="module")
def xl():
    from lora_train.model.sgm import SgmAdapter
    from lora_train.model.tiny_sdxl import build_tiny_sdxl

    with quiet():
        return SgmAdapter(build_tiny_sdxl(0, sgm=False), name="tinyxl")


def _ids(adapter, word):
    ids = adapter.embedder.tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, word
    return ids[0]


def _encoder(adapter, rows, clip_skip=1):
    """The HF text model on hand-written rows (SD1's CLIP-L pads with EOS), with clip skip as sd-scripts applies it."""
    text = adapter.embedder.transformer
    tokens = torch.tensor([r + [EOS] * (77 - len(r)) for r in rows])
    with torch.no_grad():
        if clip_skip == 1:
            return text(input_ids=tokens).last_hidden_state
        return text.text_model.final_layer_norm(text(input_ids=tokens, output_hidden_states=True).hidden_states[-clip_skip])


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_225_tokens_encode_each_75_token_chunk_on_its_own(sd1_model, clip_skip):
    from lora_train.model.ldm import LdmAdapter

    adapter = LdmAdapter(sd1_model, clip_skip=clip_skip)
    red, blue = _ids(adapter, RED), _ids(adapter, BLUE)
    with torch.no_grad():
        long = adapter.encode_captions([LONG], TextOptions(225))
    chunk1, chunk2, empty = _encoder(adapter, [[BOS] + [red] * 75 + [EOS], [BOS] + [blue] * 75 + [EOS], [BOS, EOS]], clip_skip)
    assert long.shape == (1, 2 + 3 * 75, chunk1.shape[-1])
    # BOS and the first chunk: the encoder on the first 75 tokens alone
    torch.testing.assert_close(long[0, :76], chunk1[:76])
    torch.testing.assert_close(long[0, 76:151], chunk2[1:76])
    torch.testing.assert_close(long[0, 151:226], empty[1:76])
    torch.testing.assert_close(long[0, 226], empty[76])


def test_a_150_token_caption_conditions_past_75_tokens_only_with_max_token_length(sd1_model):
    from lora_train.model.ldm import LdmAdapter

    adapter = LdmAdapter(sd1_model)
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():
        def prediction(caption, options):
            return adapter.predict(noisy, t, adapter.encode_captions([caption], options))

        # 75 (sd-scripts' default): cut at 75 tokens, so the second half changes nothing
        cut, first = adapter.encode_captions([LONG], TextOptions(75)), adapter.encode_captions([FIRST])
        torch.testing.assert_close(cut[0], _encoder(adapter, [[BOS] + [_ids(adapter, RED)] * 75 + [EOS]])[0])
        assert torch.equal(cut, first) and torch.equal(adapter.encode_captions([LONG]), first)
        assert torch.equal(prediction(LONG, TextOptions(75)), prediction(FIRST, TextOptions(75)))
        # 225: the blue half reaches the UNet
        assert (prediction(LONG, TextOptions(225)) - prediction(FIRST, TextOptions(225))).abs().max() > 1e-4


def test_openclip_rows_follow_sd_scripts_chunk_rules():
    vocab = openclip_vocab()
    red = vocab.encode(RED)[0]
    # the default is open_clip.tokenize's own row
    import open_clip

    caption = " ".join([RED] * 100)
    rows, _ = token_rows([caption], vocab, TextOptions())
    assert torch.equal(rows, open_clip.tokenize([caption]))
    rows, weights = token_rows([caption], vocab, TextOptions(225))
    assert rows.tolist() == [
        [BOS] + [red] * 75 + [EOS],  # a full chunk ends with EOS
        [BOS] + [red] * 25 + [EOS] + [0] * 50,  # OpenCLIP pads with 0
        [BOS, EOS] + [0] * 75,  # an empty chunk is BOS EOS pad ...
    ]
    assert weights.shape == (1, 227) and weights.eq(1).all()


def test_sdxl_long_captions_chunk_both_encoders_and_pool_the_first_chunk(xl):
    import open_clip

    with torch.no_grad():
        long = xl.encode_captions([LONG], TextOptions(225))
        first = xl.encode_captions([FIRST], TextOptions(75))
        # the 75-token rows are the tokenizers' own
        tok1 = xl.te1.tokenizer([FIRST], truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
        h1 = xl._te1_hidden(tok1)
        h2, pooled = xl._te2_hidden_and_pooled(open_clip.tokenize([FIRST]))
    torch.testing.assert_close(first["crossattn"], torch.cat([h1, h2], dim=-1))
    torch.testing.assert_close(first["pooled"], pooled)
    assert long["crossattn"].shape == (1, 227, first["crossattn"].shape[-1])
    torch.testing.assert_close(long["crossattn"][:, :76], first["crossattn"][:, :76])
    assert (long["crossattn"][:, 76:151] - first["crossattn"][:, 1:76]).abs().max() > 1e-4  # blue, not red
    torch.testing.assert_close(long["pooled"], first["pooled"])  # sd-scripts pools the first chunk


def test_max_token_length_takes_sd_scripts_values_only():
    assert [TextOptions(v).chunks for v in (None, 75, 150, 225)] == [1, 1, 2, 3]
    with pytest.raises(UserError, match="max_token_length must be 75, 150 or 225"):
        TextOptions(100)


# --- weighted_captions --------------------------------------------------------------------------


def test_attention_syntax_reads_as_sd_scripts_documents_it():
    """The examples in sd-scripts' parse_prompt_attention docstring."""
    assert parse_weights("normal text") == [("normal text", 1.0)]
    assert parse_weights("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_weights("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_weights(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_weights("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
            ("sky", 1.4641), (".", 1.1)]
    assert [p for p, _ in got] == [p for p, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])
    assert parse_weights("") == [("", 1.0)] and parse_weights("a) b]") == [("a) b]", 1.0)]


def test_weights_multiply_the_hidden_states_of_their_tokens(sd1_model):
    from lora_train.model.ldm import LdmAdapter

    adapter = LdmAdapter(sd1_model)
    a, red, cat, dog = (_ids(adapter, w) for w in ("a", "red", "cat", "dog"))
    with torch.no_grad():
        weighted = adapter.encode_captions(["a (red:1.5) [cat] ((dog))"], TextOptions(weighted=True))
    plain = _encoder(adapter, [[BOS, a, red, cat, dog, EOS]])
    factors = torch.ones(77)
    factors[2], factors[3], factors[4] = 1.5, 1 / 1.1, 1.1 * 1.1
    torch.testing.assert_close(weighted, plain * factors[None, :, None])
    # without weighted_captions the brackets are caption text
    with torch.no_grad():
        assert adapter.encode_captions(["a (red:1.5) [cat] ((dog))"]).sub(plain).abs().max() > 1e-3


def test_weights_reach_later_chunks(sd1_model):
    from lora_train.model.ldm import LdmAdapter

    adapter = LdmAdapter(sd1_model)
    red, blue = _ids(adapter, RED), _ids(adapter, BLUE)
    with torch.no_grad():
        weighted = adapter.encode_captions([FIRST + " (blue:2)"], TextOptions(150, weighted=True))
    chunk1, chunk2 = _encoder(adapter, [[BOS] + [red] * 75 + [EOS], [BOS, blue, EOS]])
    want = torch.cat([chunk1[:76], chunk2[1:76], chunk2[76:]])
    want[76] *= 2
    torch.testing.assert_close(weighted[0], want)


def test_sdxl_weights_both_encoders_and_not_the_pooled_output(xl):
    with torch.no_grad():
        plain = xl.encode_captions(["a red cat"])
        weighted = xl.encode_captions(["a (red:1.5) cat"], TextOptions(weighted=True))
    factors = torch.ones(77)
    factors[2] = 1.5
    torch.testing.assert_close(weighted["crossattn"], plain["crossattn"] * factors[None, :, None])
    torch.testing.assert_close(weighted["pooled"], plain["pooled"])
