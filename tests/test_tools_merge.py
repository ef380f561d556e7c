"""`merge` (SuperMerger's formula) and `lbw` (lora-block-weight's block weights baked in), checked
against the maths done here from the files' own tensors: a LoRA module changes its weight by
up @ down * alpha / rank, LoHa's by (w1a @ w1b) * (w2a @ w2b) * alpha / rank, and a block's value
multiplies the change of every module in that block. Which block a module is in comes from the
hand-written table below (lora-block-weight's ids for sd-scripts' names), not from the code."""

from __future__ import annotations

import json

import pytest
import torch

from lora_train.errors import UserError
from lora_train.network.files import load_lora, save_lora
from lora_train.network.module import target_weight_shape

# kohya name (of builtin:tiny) -> lora-block-weight block, by hand: down_blocks_i attentions/resnets_j is
# input_blocks_(3i+j+1), the downsampler input_blocks_(3i+3); up_blocks_i ... output_blocks_(3i+j)
BLOCK = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "BASE",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "IN01",
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": "IN05",
    "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_out_0": "IN07",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v": "M00",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2": "OUT05",
    "lora_unet_up_blocks_3_attentions_0_proj_in": "OUT09",
}
CONV_BLOCK = {  # LoCon: 3x3 convs
    "lora_unet_down_blocks_0_resnets_0_conv1": "IN01",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
    "lora_unet_up_blocks_0_resnets_1_conv1": "OUT01",
}
ID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
ID26 = ["BASE"] + [f"IN{i:02}" for i in range(12)] + ["M00"] + [f"OUT{i:02}" for i in range(12)]
GP1 = [1.0, 0.6, 0.9, 0.9, 0.9, 0.6, 0.5, 0.4, 0.4, 0.6, 0.8, 1.0, 1.1, 1.1, 1.1, 1.1, 1.1]  # the guide
GP2 = [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.2]


@pytest.fixture(scope="module")
def shapes(tiny_model):
    from lora_train.model.ldm import LdmAdapter

    return {t.name: tuple(target_weight_shape(t.module)) for t in LdmAdapter(tiny_model, name="tiny").file_targets()}


def write_lora(path, shapes, names, rank, alpha, seed, metadata=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        out, inp, *kernel = shapes[name]
        conv = bool(kernel)
        tensors[f"{name}.lora_down.weight"] = torch.randn((rank, inp, *kernel), generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn((out, rank, 1, 1) if conv else (out, rank), generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return save_lora(path, tensors, {"ss_base_model_version": "sd_v1", "ss_network_dim": str(rank), **(metadata or {})})


def lora_deltas(path) -> dict[str, torch.Tensor]:
    """up @ down * alpha / rank of every module, by hand."""
    tensors, _ = load_lora(path)
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = tensors[key].float(), tensors[f"{name}.lora_up.weight"].float()
            rank = down.shape[0]
            out[name] = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:]) * (
                float(tensors[f"{name}.alpha"]) / rank)
    return out


def assert_deltas_equal(got: dict, want: dict, tol=1e-4):
    zero = {n for n, d in want.items() if not d.abs().max()}
    assert set(got) | zero == set(want) | zero and set(got) <= set(want), (sorted(set(got) ^ set(want)))
    for name, d in want.items():
        g = got.get(name, torch.zeros_like(d))
        assert torch.allclose(g.reshape(d.shape), d, atol=tol * max(1.0, float(d.abs().max()))), name


def values(ids, table, names):
    return {n: table[ids.index(BLOCK.get(n) or CONV_BLOCK[n])] if (BLOCK.get(n) or CONV_BLOCK[n]) in ids else 0.0 for n in names}


def run(*argv):
    from lora_train.cli import main

    return main([str(a) for a in argv])


# -- merge -----------------------------------------------------------------------------------------
def test_merge_exact_is_the_ratio_and_block_weighted_sum_with_subtract(shapes, tmp_path):
    names = list(BLOCK)
    a = write_lora(tmp_path / "A.safetensors", shapes, names[:6], rank=4, alpha=2, seed=1)
    b = write_lora(tmp_path / "B_BASE.safetensors", shapes, names[1:], rank=2, alpha=8, seed=2)  # other rank and alpha
    out = tmp_path / "distilled.safetensors"
    gp1, gp2 = ",".join(map(str, GP1)), ",".join(map(str, GP2))
    assert run("merge", "A:0.7:GP1,B_BASE:-1:GP2", "--preset", f"GP1:{gp1}", "--preset", f"GP2:{gp2}",
               "--lora-dir", tmp_path, "--output", out) == 0
    da, db = lora_deltas(a), lora_deltas(b)
    wa, wb = values(ID17, GP1, da), values(ID17, GP2, db)
    want = {n: 0.7 * wa[n] * da[n] if n in da else 0 for n in set(da) | set(db)}
    for n in db:
        want[n] = want[n] - 1.0 * wb[n] * db[n]
    assert_deltas_equal(lora_deltas(out), want)
    tensors, md = load_lora(out)
    assert tensors[f"{names[1]}.lora_down.weight"].shape[0] == 4 + 2  # both inputs' ranks, side by side
    assert tensors[f"{names[0]}.lora_down.weight"].shape[0] == 4  # in A only: kept
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1"
    made_from = json.loads(md["lora_train_merged_from"])
    assert [(i["file"], i["ratio"], i["weights"]) for i in made_from["inputs"]] == [("A.safetensors", 0.7, "GP1"), ("B_BASE.safetensors", -1.0, "GP2")]
    assert md["ss_network_dim"] == md["ss_network_alpha"]


def test_merge_lora_with_locon_and_an_inline_26_value_list(shapes, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK)[:4], rank=3, alpha=3, seed=3)
    b = write_lora(tmp_path / "b.safetensors", shapes, list(BLOCK)[2:] + list(CONV_BLOCK), rank=2, alpha=1, seed=4)
    w26 = [round(0.1 * i - 1.0, 2) for i in range(26)]  # negatives, zero and positives
    out = tmp_path / "m.safetensors"
    formula = f"{a}:1.5,{b}:0.5:" + ",".join(map(str, w26))
    assert run("merge", formula, "--output", out) == 0
    da, db = lora_deltas(a), lora_deltas(b)
    wb = values(ID26, w26, db)
    want = {n: 1.5 * da.get(n, 0) + 0.5 * wb.get(n, 0) * db.get(n, 0) for n in set(da) | set(db)}
    got = lora_deltas(out)
    assert tuple(load_lora(out)[0]["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"].shape[2:]) == (3, 3)
    assert_deltas_equal(got, want)


def test_a_lora_minus_itself_is_nothing(shapes, tmp_path):
    write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK), rank=4, alpha=1, seed=5)
    out = tmp_path / "zero.safetensors"
    assert run("merge", "a:1,a:-1", "--lora-dir", tmp_path, "--output", out) == 0
    for name, d in lora_deltas(out).items():
        assert d.abs().max() < 1e-5, name


def test_merge_to_rank_n_is_the_svd_of_the_sum(shapes, tmp_path):
    names = list(BLOCK)
    a = write_lora(tmp_path / "a.safetensors", shapes, names, rank=4, alpha=2, seed=6)
    b = write_lora(tmp_path / "b.safetensors", shapes, names, rank=3, alpha=3, seed=7)
    out = tmp_path / "r2.safetensors"
    assert run("merge", "a:1,b:-0.5", "--rank", 2, "--output", out, "--lora-dir", tmp_path) == 0
    da, db = lora_deltas(a), lora_deltas(b)
    got = lora_deltas(out)
    tensors, md = load_lora(out)
    assert md["ss_network_dim"] == "2"
    for name in names:
        total = da[name] - 0.5 * db[name]
        s = torch.linalg.svdvals(total.reshape(total.shape[0], -1).double())
        tail = float(s[2:].square().sum().sqrt())
        err = float((got[name].double().reshape(total.shape) - total.double()).norm())
        assert tensors[f"{name}.lora_down.weight"].shape[0] == 2
        assert abs(err - tail) <= 0.01 * tail + 1e-6, (name, err, tail)


def write_loha(path, shapes, names, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        out, inp = shapes[name][:2]
        for w in ("w1", "w2"):
            tensors[f"{name}.hada_{w}_a"] = torch.randn(out, rank, generator=g) * 0.5
            tensors[f"{name}.hada_{w}_b"] = torch.randn(rank, inp, generator=g) * 0.5
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return save_lora(path, tensors, {"ss_base_model_version": "sd_v1"})


def test_a_loha_merges_through_its_delta(shapes, tiny_adapter, tmp_path):
    from lora_train.tools.merge import merge

    names = [n for n in BLOCK if len(shapes[n]) == 2]
    h = write_loha(tmp_path / "h.safetensors", shapes, names, rank=2, alpha=1, seed=8)
    a = write_lora(tmp_path / "a.safetensors", shapes, names, rank=2, alpha=2, seed=9)
    tensors, _ = load_lora(h)
    dh = {n: (tensors[f"{n}.hada_w1_a"] @ tensors[f"{n}.hada_w1_b"]) * (tensors[f"{n}.hada_w2_a"] @ tensors[f"{n}.hada_w2_b"]) * (1 / 2)
          for n in names}
    da = lora_deltas(a)
    full = max(min(shapes[n]) for n in names)  # a rank no module exceeds: the sum exactly
    out, _ = merge("h:1,a:-1", tmp_path / "m.safetensors", rank=full, lora_dir=tmp_path, targets=tiny_adapter.file_targets())
    assert_deltas_equal(lora_deltas(out), {n: dh[n] - da[n] for n in names}, tol=1e-3)
    # the CLI, with the model by name: the same file
    assert run("merge", "h:1,a:-1", "--rank", full, "--model", "builtin:tiny", "--lora-dir", tmp_path, "--output", tmp_path / "c.safetensors") == 0
    assert_deltas_equal(lora_deltas(tmp_path / "c.safetensors"), {n: dh[n] - da[n] for n in names}, tol=1e-3)
    with pytest.raises(UserError, match="--rank"):  # exact needs LoRA/LoCon inputs
        merge("h:1,a:-1", tmp_path / "m2.safetensors", lora_dir=tmp_path)


def test_merged_file_loads_with_no_unmatched_keys(shapes, tiny_adapter, tmp_path):
    from lora_train.network.network import network_from_file

    write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK) + list(CONV_BLOCK), rank=2, alpha=1, seed=10)
    write_lora(tmp_path / "b.safetensors", shapes, list(BLOCK), rank=4, alpha=4, seed=11)
    out = tmp_path / "m.safetensors"
    assert run("merge", "a:1:OUTALL,b:1", "--lora-dir", tmp_path, "--output", out) == 0
    net = network_from_file(out, tiny_adapter.file_targets())
    assert set(net.lora_modules) <= set(BLOCK) | set(CONV_BLOCK)


def test_dora_without_a_model_says_so_in_one_line(shapes, tmp_path):
    from lora_train.tools.merge import merge

    a = write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK)[:2], rank=2, alpha=1, seed=12)
    tensors, md = load_lora(a)
    name = list(BLOCK)[1]
    tensors[f"{name}.dora_scale"] = torch.ones(shapes[name][0], 1)
    d = save_lora(tmp_path / "d.safetensors", tensors, md)
    with pytest.raises(UserError, match=r"DoRA.*--model") as e:
        merge(f"{d}:1", tmp_path / "m.safetensors", rank=2)
    assert "\n" not in str(e.value)


def test_merge_and_lbw_never_overwrite_an_input(shapes, tmp_path, capsys):
    a = write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK), rank=2, alpha=1, seed=13)
    before = a.read_bytes()
    assert run("merge", "a:1,a:0.5", "--lora-dir", tmp_path, "--output", a) == 2
    assert run("lbw", a, a, "--weights", "ALL0.5") == 2
    assert capsys.readouterr().err.count("inputs are never overwritten") == 2
    assert a.read_bytes() == before


def test_unknown_preset_and_wrong_count_are_one_line_errors(shapes, tmp_path, capsys):
    a = write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK), rank=2, alpha=1, seed=14)
    assert run("merge", "a:1:GPX", "--lora-dir", tmp_path, "--output", tmp_path / "m.safetensors") == 2
    assert "GPX" in capsys.readouterr().err
    assert run("lbw", a, tmp_path / "o.safetensors", "--weights", "1,1,1") == 2
    err = capsys.readouterr().err
    assert "17 or 26" in err and err.count("\n") == 1


# -- lbw -------------------------------------------------------------------------------------------
def test_lbw_scales_each_module_by_its_block_value(shapes, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK), rank=3, alpha=2, seed=15, metadata={"ss_network_alpha": "2"})
    w = [-0.5, 0.0, 0.3, 0.4, 2.0, -1.0, 0.7, 0.25, 0.9, 1.1, -0.3, 0.8, 0.6, 0.5, 1.5, 0.2, 0.1]  # BASE -0.5
    out = tmp_path / "lbw.safetensors"
    assert run("lbw", a, out, "--weights=" + ",".join(map(str, w))) == 0  # a leading minus needs the = form
    da = lora_deltas(a)
    wa = values(ID17, w, da)
    assert wa["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == -0.5  # BASE is the text encoder
    assert_deltas_equal(lora_deltas(out), {n: wa[n] * d for n, d in da.items()})
    src_md, md = load_lora(a)[1], load_lora(out)[1]
    assert {k: v for k, v in md.items() if k.startswith("ss_")} == {k: v for k, v in src_md.items() if k.startswith("ss_")}
    assert json.loads(md["lora_train_lbw"])["blocks"]["IN05"] == 2.0
    assert set(load_lora(out)[0]) == set(load_lora(a)[0])


def test_lbw_preset_base_off_and_on(shapes, tmp_path):
    a = write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK), rank=2, alpha=1, seed=16)
    da = lora_deltas(a)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    # lora-block-weight's OUTALL: 1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1 -> BASE and OUT03-OUT11 on
    assert run("lbw", a, tmp_path / "outall.safetensors", "--weights", "OUTALL") == 0
    got = lora_deltas(tmp_path / "outall.safetensors")
    want = {n: d * (1.0 if BLOCK[n] == "BASE" or BLOCK[n].startswith("OUT") else 0.0) for n, d in da.items()}
    assert_deltas_equal(got, want)
    assert run("lbw", a, tmp_path / "te_off.safetensors", "--weights", "NOTE", "--preset", "NOTE:" + ",".join(["0"] + ["1"] * 16)) == 0
    got = lora_deltas(tmp_path / "te_off.safetensors")
    assert got[te].abs().max() == 0
    assert_deltas_equal({n: d for n, d in got.items() if n != te}, {n: d for n, d in da.items() if n != te})


def test_lbw_on_locon_gives_blocks_outside_the_17_layout_zero(shapes, tmp_path, capsys):
    a = write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK) + list(CONV_BLOCK), rank=2, alpha=1, seed=17)
    assert run("lbw", a, tmp_path / "o.safetensors", "--weights", "ALL") == 0
    assert "IN03, OUT01" in capsys.readouterr().err
    got, da = lora_deltas(tmp_path / "o.safetensors"), lora_deltas(a)
    assert_deltas_equal(got, {n: d * (0.0 if CONV_BLOCK.get(n) in ("IN03", "OUT01") else 1.0) for n, d in da.items()})


def test_lbw_scales_loha_through_w1a(shapes, tmp_path):
    from lora_train.tools.lbw import bake

    names = [n for n in BLOCK if len(shapes[n]) == 2]
    h = write_loha(tmp_path / "h.safetensors", shapes, names, rank=2, alpha=2, seed=18)
    out, _ = bake(h, tmp_path / "o.safetensors", "OUTS")  # OUTS: BASE and OUT07-OUT11 on, the rest off
    src, got = load_lora(h)[0], load_lora(out)[0]
    outs = dict(zip(ID17, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]))
    for n in names:
        delta = lambda t: (t[f"{n}.hada_w1_a"] @ t[f"{n}.hada_w1_b"]) * (t[f"{n}.hada_w2_a"] @ t[f"{n}.hada_w2_b"])  # noqa: E731
        assert torch.allclose(delta(got), outs.get(BLOCK[n], 0) * delta(src), atol=1e-6), n


# -- SDXL: 12/20 layouts, and the fused OpenCLIP attention of its second text encoder ----------------
XL_BLOCK = {
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": "BASE",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": "BASE",  # a part of a fused in_proj
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "IN04",
    "lora_unet_input_blocks_8_1_proj_in": "IN08",
    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q": "M00",
    "lora_unet_input_blocks_3_0_op": "IN03",  # a 3x3 conv: in the 20-value layout only
}
ID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02}" for i in range(6)]
ID20 = ["BASE"] + [f"IN{i:02}" for i in range(9)] + ["M00"] + [f"OUT{i:02}" for i in range(9)]


@pytest.fixture(scope="module")
def xl():
    from lora_train.model import registry

    adapter = registry.load_adapter("builtin:tiny-sdxl")
    targets = adapter.file_targets()
    return adapter, targets, {t.name: tuple(target_weight_shape(t.module)) for t in targets}


@pytest.mark.parametrize("ids", [ID12, ID20], ids=["12", "20"])
def test_lbw_sdxl_layouts(xl, tmp_path, ids):
    _, _, shapes = xl
    a = write_lora(tmp_path / "xl.safetensors", shapes, list(XL_BLOCK), rank=2, alpha=1, seed=20,
                   metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    w = [round(0.3 * i - 1.2, 2) for i in range(len(ids))]
    assert run("lbw", a, tmp_path / "o.safetensors", "--weights=" + ",".join(map(str, w))) == 0
    da = lora_deltas(a)
    want = {n: d * (w[ids.index(XL_BLOCK[n])] if XL_BLOCK[n] in ids else 0.0) for n, d in da.items()}
    assert_deltas_equal(lora_deltas(tmp_path / "o.safetensors"), want)


def test_ia3_on_a_fused_attention_part_merges_through_the_model(xl, tmp_path):
    from lora_train.tools.merge import merge

    adapter, targets, shapes = xl
    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    width = shapes[name][0]
    w = torch.randn(width, generator=torch.Generator().manual_seed(21))
    ia3 = save_lora(tmp_path / "ia3.safetensors", {f"{name}.weight": w, f"{name}.on_input": torch.tensor(0)},
                    {"ss_base_model_version": "sdxl_base_v1-0"})
    mha = next(t.module for t in targets if t.name == name)
    wq = mha.in_proj_weight.detach()[:width]  # q is the first third of the fused in_proj
    with pytest.raises(UserError, match=r"IA3.*--model"):
        merge(f"{ia3}:1", tmp_path / "no_model.safetensors", rank=width)
    out, _ = merge(f"{ia3}:0.5", tmp_path / "m.safetensors", rank=width, targets=targets)
    assert_deltas_equal(lora_deltas(out), {name: 0.5 * wq * w[:, None]}, tol=1e-3)


def test_merge_and_lbw_outputs_have_cards_that_say_what_they_were_made_from(shapes, tmp_path):
    import json

    write_lora(tmp_path / "a.safetensors", shapes, list(BLOCK), rank=2, alpha=1, seed=21)
    write_lora(tmp_path / "b.safetensors", shapes, list(BLOCK), rank=2, alpha=1, seed=22)
    (tmp_path / "a.json").write_text(json.dumps({"activation text": "zkz", "notes": "trained by me"}), encoding="utf-8")
    assert run("merge", "a:1,b:-1", "--lora-dir", tmp_path, "--output", tmp_path / "m.safetensors") == 0
    card = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert card["notes"].startswith("merged from a:1,b:-1") and "trained by me" in card["notes"]
    assert card["activation text"] == "zkz"
    assert run("lbw", tmp_path / "a.safetensors", tmp_path / "l.safetensors", "--weights", "OUTALL") == 0
    card = json.loads((tmp_path / "l.json").read_text(encoding="utf-8"))
    assert card["notes"].startswith("a.safetensors with the block weights OUTALL") and card["activation text"] == "zkz"
