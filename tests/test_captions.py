import os
import random
import re
import stat

import pytest

from lora_train.dataset import captions as cap
from lora_train.dataset.captions import CaptionError, CaptionOptions, process_caption

ZH = "中文标签, 1girl"


# --- encodings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, encoding",
    [
        (ZH.encode("utf-8"), "utf-8"),
        (b"\xef\xbb\xbf" + ZH.encode("utf-8"), "utf-8-sig"),
        (b"\xff\xfe" + ZH.encode("utf-16-le"), "utf-16-le-sig"),
        (b"\xfe\xff" + ZH.encode("utf-16-be"), "utf-16-be-sig"),
        (ZH.encode("utf-16-le"), "utf-16-le"),
        (ZH.encode("utf-16-be"), "utf-16-be"),
        (ZH.encode("gbk"), "gbk"),
        (ZH.encode("utf-32"), "utf-32"),
    ],
)
def test_reads_each_encoding(tmp_path, data, encoding):
    f = tmp_path / "a.txt"
    f.write_bytes(data)
    assert cap.read_caption_text(f) == cap.CaptionText(ZH, encoding)
    assert cap.read_caption(f) == ZH
    assert cap.tags(cap.read_caption(f)) == ["中文标签", "1girl"]


def test_utf16_without_bom_with_one_and_cjk_chars(tmp_path):
    # 一 (U+4E00) puts a NUL byte on the "wrong" side; the ASCII majority still decides.
    text = "一个女孩, 1girl, solo, long hair"
    for codec in ("utf-16-le", "utf-16-be"):
        f = tmp_path / f"{codec}.txt"
        f.write_bytes(text.encode(codec))
        assert cap.read_caption_text(f) == cap.CaptionText(text, codec)


def test_gb18030_only_characters(tmp_path):
    text = "𠀀, 1girl"  # outside GBK: four-byte GB18030 sequence
    with pytest.raises(UnicodeEncodeError):
        text.encode("gbk")
    f = tmp_path / "a.txt"
    f.write_bytes(text.encode("gb18030"))
    assert cap.read_caption_text(f) == cap.CaptionText(text, "gb18030")


def test_empty_and_blank_files(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"")
    assert cap.read_caption_text(f) == cap.CaptionText("", "utf-8")
    assert cap.read_caption(f) == ""
    f.write_bytes(b"\xef\xbb\xbf")
    assert cap.read_caption_text(f) == cap.CaptionText("", "utf-8-sig")
    f.write_bytes(b"\r\n  \n")
    assert cap.read_caption(f) == ""


def test_first_non_empty_line_and_wildcard_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"\r\n  1girl, solo  \r\n\r\na girl\rthird\n")
    assert cap.read_caption(f) == "1girl, solo"
    assert cap.read_caption(f, wildcard=True) == "1girl, solo\na girl\nthird"
    # line endings survive in the raw text, so a rewrite is byte-identical
    assert cap.read_caption_text(f).text == "\r\n  1girl, solo  \r\n\r\na girl\rthird\n"


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00",  # binary with NULs
        b"\x00a\x00",  # NULs, odd length
        b"caf\xe9 au lait",  # cp1252: not UTF-8, not GBK
        b"\xff\xfe\x00\xd8",  # UTF-16 BOM then a lone surrogate
        b"\xff\xff\xff",
    ],
)
def test_undecodable_raises_with_reason(tmp_path, data):
    f = tmp_path / "a.txt"
    f.write_bytes(data)
    with pytest.raises(CaptionError, match=r"\w+"):
        cap.read_caption_text(f)
    with pytest.raises(CaptionError):
        cap.read_caption(f)


def test_missing_file_is_a_caption_error(tmp_path):
    with pytest.raises(CaptionError, match="cannot read"):
        cap.read_caption_text(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "encoding, prefix",
    [
        ("utf-8", b"1"),
        ("utf-8-sig", b"\xef\xbb\xbf"),
        ("utf-16-le-sig", b"\xff\xfe"),
        ("utf-16-be-sig", b"\xfe\xff"),
        ("utf-16-le", b"1\x00"),
        ("utf-16-be", b"\x001"),
        ("gbk", b"1"),
    ],
)
def test_edit_keeps_encoding(tmp_path, encoding, prefix):
    f = tmp_path / "a.txt"
    cap.write_caption_text(f, "1girl, 中文标签", encoding)
    assert f.read_bytes().startswith(prefix)
    before = cap.read_caption_text(f)
    assert before == cap.CaptionText("1girl, 中文标签", encoding)
    cap.write_caption_text(f, before.text + ", 新标签\r\n", before.encoding)
    assert cap.read_caption_text(f) == cap.CaptionText("1girl, 中文标签, 新标签\r\n", encoding)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind


def test_rewrite_is_byte_identical(tmp_path):
    f = tmp_path / "a.txt"
    original = b"\xff\xfe" + "a, b\r\nline two\r\n".encode("utf-16-le")
    f.write_bytes(original)
    t = cap.read_caption_text(f)
    cap.write_caption_text(f, t.text, t.encoding)
    assert f.read_bytes() == original


def test_write_keeps_mode_and_fails_cleanly(tmp_path):
    f = tmp_path / "a.txt"
    cap.write_caption_text(f, "old", "gbk")
    os.chmod(f, 0o640)
    cap.write_caption_text(f, "new", "gbk")
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    with pytest.raises(CaptionError, match="gbk"):
        cap.write_caption_text(f, "emoji 😀", "gbk")
    with pytest.raises(CaptionError, match="unknown encoding"):
        cap.write_caption_text(f, "x", "no-such-codec")
    assert f.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_through_symlink_edits_the_target(tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    cap.write_caption_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


# --- process_caption ----------------------------------------------------------------------------

TAGS = [f"t{i}" for i in range(8)]
CAPTION = ", ".join(TAGS)


def runs(caption, opts, n=100, seed=0, epoch=1):
    rng = random.Random(seed)
    return [process_caption(caption, opts, epoch, rng) for _ in range(n)]


def test_defaults_match_sd_scripts():
    o = CaptionOptions()
    assert (o.shuffle_caption, o.keep_tokens, o.keep_tokens_separator, o.secondary_separator) == (False, 0, "", None)
    assert (o.caption_separator, o.caption_prefix, o.caption_suffix) == (",", None, None)
    assert (o.caption_dropout_rate, o.caption_dropout_every_n_epochs, o.caption_tag_dropout_rate) == (0.0, 0, 0.0)
    assert o.enable_wildcard is False


def test_no_options_leaves_caption_alone():
    rng = random.Random(0)
    assert process_caption("a,b ,  c", CaptionOptions(), 1, rng) == "a,b ,  c"
    assert process_caption("first\nsecond", CaptionOptions(), 1, rng) == "first"


def test_keep_tokens_fixed_rest_shuffled():
    outs = runs(CAPTION, CaptionOptions(shuffle_caption=True, keep_tokens=2))
    orders = {tuple(o.split(", ")) for o in outs}
    for order in orders:
        assert order[:2] == ("t0", "t1")
        assert sorted(order[2:]) == TAGS[2:]
    assert len(orders) >= 2
    # every non-kept tag shows up in more than one position: a real shuffle, not a rotation
    assert all(len({o[i] for o in orders}) > 1 for i in range(2, 8))


def test_same_seed_same_output_and_global_random_untouched():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.1)
    state = random.getstate()
    assert runs(CAPTION, opts, seed=7) == runs(CAPTION, opts, seed=7)
    assert runs(CAPTION, opts, seed=7) != runs(CAPTION, opts, seed=8)
    assert random.getstate() == state


def test_keep_tokens_separator():
    caption = "1girl, frieren ||| a, b, c, d, e ||| masterpiece, best quality"
    outs = runs(caption, CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||"))
    for out in outs:
        parts = out.split(", ")
        assert "|||" not in out
        assert parts[:2] == ["1girl", "frieren"] and parts[-2:] == ["masterpiece", "best quality"]
        assert sorted(parts[2:-2]) == ["a", "b", "c", "d", "e"]
    assert len(set(outs)) >= 2
    # one separator: no fixed suffix; keep_tokens is ignored when the separator is there
    for out in runs("x ||| a, b, c", CaptionOptions(shuffle_caption=True, keep_tokens=3, keep_tokens_separator="|||")):
        assert out.startswith("x, ") and sorted(out.split(", ")[1:]) == ["a", "b", "c"]
    # our choice: without shuffle the separator still goes (sd-scripts trained it as text)
    opts = CaptionOptions(keep_tokens_separator="|||")
    assert process_caption("a, b ||| c, d ||| e", opts, 1, random.Random(0)) == "a, b, c, d, e"
    assert process_caption("a, b, c", opts, 1, random.Random(0)) == "a, b, c"


def test_tag_dropout_only_touches_non_kept_tags():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=2, caption_tag_dropout_rate=1.0)
    assert set(runs(CAPTION, opts)) == {"t0, t1"}
    opts = CaptionOptions(keep_tokens_separator="|||", caption_tag_dropout_rate=1.0)
    assert set(runs("a, b ||| c, d ||| e", opts)) == {"a, b, e"}
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=2, caption_tag_dropout_rate=0.0)
    assert all(sorted(o.split(", ")) == TAGS for o in runs(CAPTION, opts))
    # rate 0.5 without shuffle: order kept, about half the flexible tags gone
    opts = CaptionOptions(keep_tokens=1, caption_tag_dropout_rate=0.5)
    outs = runs(CAPTION, opts, n=400)
    kept = [o.split(", ") for o in outs]
    assert all(k[0] == "t0" and k == sorted(k, key=TAGS.index) for k in kept)
    mean = sum(len(k) - 1 for k in kept) / len(kept)
    assert 3.0 < mean < 4.0  # 7 * 0.5


def test_secondary_separator_moves_and_drops_together():
    caption = "a, sky;;;cloud;;;day, b, c, d"
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;", caption_tag_dropout_rate=0.5)
    outs = runs(caption, opts, n=200)
    assert any("sky,cloud,day" in o for o in outs) and any("sky" not in o for o in outs)
    for o in outs:
        assert ";;;" not in o
        assert ("sky" in o) == ("cloud" in o) == ("day" in o) == ("sky,cloud,day" in o)
    # replaced even when nothing is shuffled
    assert process_caption("a;;;b", CaptionOptions(secondary_separator=";;;"), 1, random.Random(0)) == "a,b"


def test_prefix_suffix_before_shuffle():
    opts = CaptionOptions(caption_prefix="zkz,", caption_suffix=", from side")
    assert process_caption("a, b", opts, 1, random.Random(0)) == "zkz, a, b , from side"
    # the prefix is part of the tags: keep_tokens=1 keeps it first
    opts = CaptionOptions(caption_prefix="zkz,", shuffle_caption=True, keep_tokens=1)
    assert all(o.startswith("zkz, ") for o in runs(CAPTION, opts))
    # a prefix ending in the keep separator fixes the trigger, as in sd-scripts' docs
    opts = CaptionOptions(caption_prefix="zkz, 1girl |||", shuffle_caption=True, keep_tokens_separator="|||")
    assert all(o.startswith("zkz, 1girl, ") for o in runs(CAPTION, opts))


def test_caption_dropout_every_n_epochs():
    opts = CaptionOptions(caption_dropout_every_n_epochs=3, caption_prefix="p")
    rng = random.Random(0)
    got = [process_caption("a, b", opts, epoch, rng) for epoch in range(1, 10)]
    assert got == ["p a, b", "p a, b", "", "p a, b", "p a, b", "", "p a, b", "p a, b", ""]


def test_caption_dropout_rate():
    assert set(runs("a, b", CaptionOptions(caption_dropout_rate=1.0))) == {""}
    outs = runs("a, b", CaptionOptions(caption_dropout_rate=0.25), n=2000)
    assert 0.2 < outs.count("") / len(outs) < 0.3
    assert set(outs) == {"", "a, b"}


def test_wildcard_picks_every_option():
    opts = CaptionOptions(enable_wildcard=True)
    outs = runs("1girl, {red|green|blue} hair, {{retro style}}", opts, n=200)
    assert set(outs) == {f"1girl, {c} hair, {{retro style}}" for c in ("red", "green", "blue")}
    # without enable_wildcard the braces are text
    assert runs("{a|b}", CaptionOptions(), n=1) == ["{a|b}"]


def test_wildcard_multiline_picks_one_line_with_prefix_on_each():
    caption = "1girl, solo\na girl on a stage\n{red|blue} sky"
    opts = CaptionOptions(enable_wildcard=True, caption_prefix="zkz,")
    outs = set(runs(caption, opts, n=300))
    assert outs == {"zkz, 1girl, solo", "zkz, a girl on a stage", "zkz, red sky", "zkz, blue sky"}
    # the picked line is then shuffled like any caption
    opts = CaptionOptions(enable_wildcard=True, shuffle_caption=True, keep_tokens=1)
    for o in runs("x, a, b, c\ny, d, e, f", opts):
        assert o.split(", ")[0] in ("x", "y") and len(o.split(", ")) == 4


def test_custom_caption_separator():
    opts = CaptionOptions(caption_separator=";", shuffle_caption=True, keep_tokens=1)
    for o in runs("a; b, c; d; e", opts):
        assert o.startswith("a; ") and sorted(o.split("; ")) == ["a", "b, c", "d", "e"]



def tag_counts(opts, steps, total_steps=0, caption=CAPTION):
    return [len(process_caption(caption, opts, 1, random.Random(0), step, total_steps).split(", ")) for step in range(steps)]


def test_token_warmup_adds_tags_over_the_first_steps():
    """sd-scripts: floor(step * (tags - token_warmup_min) / token_warmup_step) + token_warmup_min tags
    before token_warmup_step, all after; here 8 tags from 2 over 12 steps: one more every 2 steps."""
    assert CaptionOptions().token_warmup_min == 1 and CaptionOptions().token_warmup_step == 0
    opts = CaptionOptions(token_warmup_min=2, token_warmup_step=12)
    assert tag_counts(opts, 14) == [2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8]
    assert process_caption(CAPTION, opts, 1, random.Random(0), 0) == "t0, t1"  # the first tags, in order
    # below 1: a fraction of the run's steps, rounded down (0.25 of 50 = 12)
    assert tag_counts(CaptionOptions(token_warmup_min=2, token_warmup_step=0.25), 14, total_steps=50) == tag_counts(opts, 14)
    # after the warm-up the caption is split and joined as with shuffle (", "), as in sd-scripts
    assert process_caption("t0,t1", opts, 1, random.Random(0), 12) == "t0, t1"


def test_token_warmup_keeps_kept_tags_and_shuffles_what_it_takes():
    opts = CaptionOptions(token_warmup_min=1, token_warmup_step=7, keep_tokens=1)
    assert process_caption(CAPTION, opts, 1, random.Random(0), 0) == "t0, t1"
    assert tag_counts(opts, 8) == [2, 2, 3, 4, 5, 6, 7, 8]  # 1 kept + floor(step * 6 / 7) + 1
    shuffled = CaptionOptions(token_warmup_min=3, token_warmup_step=10, shuffle_caption=True)
    assert {frozenset(process_caption(CAPTION, shuffled, 1, random.Random(seed), 0).split(", ")) for seed in range(20)} == {
        frozenset({"t0", "t1", "t2"})}
    kts = CaptionOptions(token_warmup_min=1, token_warmup_step=3, keep_tokens_separator="|||")
    assert process_caption("a, b ||| c, d, e ||| z", kts, 1, random.Random(0), 0) == "a, b, c, z"

# --- prompt escaping ----------------------------------------------------------------------------

# A1111's modules/prompt_parser.py tokenizer: an escape yields its second character, a lone
# backslash yields nothing, brackets and ":number)" change weights.
A1111 = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


def a1111_literal(prompt):
    """The text A1111 reads from `prompt`, or None if any part would change attention weights."""
    out = []
    for m in A1111.finditer(prompt):
        tok = m.group(0)
        if tok.startswith("\\"):
            out.append(tok[1:])
        elif tok in ("(", ")", "[", "]") or m.group(1) is not None:
            return None
        else:
            out.append(tok)
    return "".join(out)


def test_escape_examples():
    assert cap.escape_prompt("hood (clothing)") == r"hood \(clothing\)"
    assert cap.escape_prompt("[sic]") == r"\[sic\]"
    assert cap.escape_prompt(r"C:\path") == r"C:\\path"
    # already escaped text is escaped again: the escape is of the literal text, always
    assert cap.escape_prompt(r"\(") == r"\\\("
    assert cap.unescape_prompt(r"hood \(clothing\)") == "hood (clothing)"
    assert cap.unescape_prompt(r"a\b") == r"a\b"  # a backslash before other text stays
    assert a1111_literal("hood (clothing)") is None
    assert a1111_literal(cap.escape_prompt("hood (clothing)")) == "hood (clothing)"


def test_escape_round_trip_and_a1111_reads_it_literally():
    rng = random.Random(1234)
    alphabet = "ab ,:()[]\\{}|<>.1é中文标签😀\n\t"
    samples = [
        "",
        "\\",
        "\\\\",
        "\\(",
        r"already \(escaped\)",
        "(tag:1.2)",
        "trailing\\",
        "((double))",
        ":)",
        "<lora:x:1>",
        "中文(标签)",
        "😀[emoji]\\",
    ]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(30))) for _ in range(500)]
    for x in samples:
        e = cap.escape_prompt(x)
        assert cap.unescape_prompt(e) == x, x
        assert a1111_literal(e) == x, x


# --- tokens -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from lora_train.model.clip_files import CLIP_L_TEXT_CONFIG, write_clip_folder

    folder = write_clip_folder(tmp_path_factory.mktemp("clip"), CLIP_L_TEXT_CONFIG)
    return CLIPTokenizer.from_pretrained(str(folder))


def test_count_tokens(tokenizer):
    assert cap.count_tokens("a photo of a cat", tokenizer) == 5
    assert cap.count_tokens("1girl, solo", tokenizer) == 4  # 1 / girl / , / solo
    assert cap.count_tokens("", tokenizer) == 0
    assert cap.count_tokens("cat, " * 40, tokenizer) == 80

    class TokenizeOnly:  # an object with only `tokenize`
        def tokenize(self, text):
            return tokenizer.tokenize(text)

    assert cap.count_tokens("a photo of a cat", TokenizeOnly()) == 5


def test_token_budget(tokenizer):
    assert [cap.token_budget(n) for n in (0, 1, 75, 76, 150, 151, 225, 226, 1000)] == [
        75, 75, 75, 150, 150, 225, 225, None, None,
    ]
    assert cap.token_budget(cap.count_tokens("cat, " * 40, tokenizer)) == 150
