"""The Tools tab's work (`app/tools.py`) over a fake host's LoRA folder: merge / subtract, block weights,
resize and pick write new files there with their cards, tell the host (its list and load check), say
what they did, never overwrite a file, and keep to the folder policy of a listening WebUI. Expected
numbers are worked out here from the files' own tensors and hand-written block tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_train.access import AccessPolicy
from lora_train.app.runs import RunManager, RunStatus
from lora_train.app.tools import GUIDE_PRESETS, Tools
from lora_train.errors import UserError
from lora_train.host.standalone import StandaloneHost
from lora_train.network.files import load_lora, save_lora

# kohya names -> lora-block-weight block, by hand (sd-scripts' down_blocks_i attentions_j is input_blocks_(3i+j+1),
# up_blocks_i attentions_j is output_blocks_(3i+j))
BLOCK = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "BASE",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "IN01",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v": "M00",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2": "OUT05",
    "lora_unet_up_blocks_3_attentions_0_proj_in": "OUT09",
}
ID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09",
        "OUT10", "OUT11"]
GP1 = dict(zip(ID17, [1.0, 0.6, 0.9, 0.9, 0.9, 0.6, 0.5, 0.4, 0.4, 0.6, 0.8, 1.0, 1.1, 1.1, 1.1, 1.1, 1.1]))  # the guide
GP2 = dict(zip(ID17, [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.2]))
OUTS = {b: 1.0 if b == "BASE" or b in ("OUT07", "OUT08", "OUT09", "OUT10", "OUT11") else 0.0 for b in ID17}  # lora-block-weight's OUTS


class FakeHost(StandaloneHost):
    """The standalone host with no model loaded: records what the Tools tab tells it."""

    def __init__(self, root: Path, access: AccessPolicy | None = None):
        super().__init__("builtin:tiny", root / "models" / "Lora", root / "lora_train" / "runs", access)
        self.published: list[Path] = []
        self.list_refreshed = 0

    def after_publish(self, path):
        self.published.append(Path(path))
        return [f"checked {Path(path).name}"]

    def lora_files_changed(self):
        self.list_refreshed += 1


def write_lora(path: Path, rank: int, alpha: float, seed: int, names=tuple(BLOCK)) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"] = torch.randn((rank, 6), generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn((5, rank), generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_lora(path, tensors, {"ss_base_model_version": "sd_v1", "ss_network_dim": str(rank)})


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """up @ down * alpha / rank of every module, by hand."""
    tensors, _ = load_lora(path)
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            out[name] = tensors[f"{name}.lora_up.weight"].float() @ down.float() * (float(tensors[f"{name}.alpha"]) / down.shape[0])
    return out


@pytest.fixture
def host(tmp_path):
    return FakeHost(tmp_path / "webui")


@pytest.fixture
def tools(host):
    return Tools(RunManager(host))


def test_merge_runs_the_guides_formula_in_the_lora_folder(host, tools):
    a = write_lora(host.lora_dir() / "Test0.safetensors", rank=4, alpha=2, seed=1)
    base = write_lora(host.lora_dir() / "styles" / "Test0_BASE.safetensors", rank=2, alpha=1, seed=2)  # a subfolder, as the WebUI lists
    before = {p: p.read_bytes() for p in (a, base)}
    written = tools.merge("Test0:1:GP1,Test0_BASE:-1:GP2", GUIDE_PRESETS, "Test0-distilled", 0)
    out = host.lora_dir() / "Test0-distilled.safetensors"
    assert written.path == out and out.is_file()
    da, db, merged = deltas(a), deltas(base), deltas(out)
    for name, block in BLOCK.items():
        expected = GP1[block] * da[name] - GP2[block] * db[name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-5)
    card = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert "Test0:1:GP1,Test0_BASE:-1:GP2" in card["notes"]
    assert host.published == [out], "the host refreshes its list and checks the file, as after a run's save"
    assert written.lines[0] == f"wrote {out}" and written.lines[-1] == "checked Test0-distilled.safetensors"
    assert {p: p.read_bytes() for p in (a, base)} == before
    assert "Test0-distilled.safetensors" in tools.lora_files() and "styles/Test0_BASE.safetensors" in tools.lora_files()


def test_merge_with_a_rank_is_the_best_rank_n_approximation(host, tools):
    a = write_lora(host.lora_dir() / "A.safetensors", rank=4, alpha=4, seed=3)
    b = write_lora(host.lora_dir() / "B.safetensors", rank=4, alpha=4, seed=4)
    tools.merge("A:1,B:0.5", "", "AB", 2)
    merged, da, db = deltas(host.lora_dir() / "AB.safetensors"), deltas(a), deltas(b)
    for name in BLOCK:
        total = da[name] + 0.5 * db[name]
        s = torch.linalg.svdvals(total)
        assert torch.linalg.matrix_rank(merged[name]) == 2
        # Eckart-Young: the error of the best rank-2 approximation is the tail of the singular values
        assert abs(float(torch.linalg.norm(total - merged[name])) - float(s[2:].norm())) < 1e-3 * float(s.norm())


def test_outputs_are_new_plain_names_in_the_lora_folder(host, tools):
    a = write_lora(host.lora_dir() / "A.safetensors", rank=2, alpha=2, seed=5)
    write_lora(host.lora_dir() / "B.safetensors", rank=2, alpha=2, seed=6)
    before = a.read_bytes()
    with pytest.raises(UserError, match="A.safetensors exists in the LoRA folder"):
        tools.merge("A:1,B:-1", "", "A", 0)
    with pytest.raises(UserError, match="B.safetensors exists in the LoRA folder"):
        tools.lbw("A.safetensors", "ALL", "", "B.safetensors")
    for bad in ("../escape", "sub/dir", ""):
        with pytest.raises(UserError, match="output"):
            tools.resize("A.safetensors", 1, None, None, bad)
    assert a.read_bytes() == before and not (host.lora_dir().parent / "escape.safetensors").exists()
    assert sorted(tools.lora_files()) == ["A.safetensors", "B.safetensors"] and host.published == []
    with pytest.raises(UserError, match="no LoRA named 'C'"):
        tools.merge("A:1,C:1", "", "AC", 0)
    with pytest.raises(UserError, match="rank '1.5': a whole number"):
        tools.merge("A:1,B:1", "", "AB", 1.5)


def test_block_weights_scale_each_block(host, tools):
    src = write_lora(host.lora_dir() / "A.safetensors", rank=3, alpha=1.5, seed=7)
    written = tools.lbw("A.safetensors", "OUTS", "", "A-lbw")
    baked, d = deltas(written.path), deltas(src)
    for name, block in BLOCK.items():
        torch.testing.assert_close(baked[name], OUTS[block] * d[name], rtol=1e-5, atol=1e-6)
    # a preset of the Merge section's text is a weight too
    written = tools.lbw("A", "GP2", GUIDE_PRESETS, "A-gp2")
    baked = deltas(written.path)
    for name, block in BLOCK.items():
        torch.testing.assert_close(baked[name], GP2[block] * d[name], rtol=1e-5, atol=1e-6)
    assert host.published == [host.lora_dir() / "A-lbw.safetensors", host.lora_dir() / "A-gp2.safetensors"]
    with pytest.raises(UserError, match="17 or 26"):
        tools.lbw("A.safetensors", "1,1,1", "", "A-bad")


def test_resize_says_how_much_each_module_kept(host, tools):
    src = write_lora(host.lora_dir() / "A.safetensors", rank=4, alpha=4, seed=8)
    written = tools.resize("A.safetensors", 2, None, None, "A-r2")
    kept = {}
    for name, delta in deltas(src).items():
        s = torch.linalg.svdvals(delta)
        kept[name] = float(s[:2].norm() / s.norm())  # sd-scripts' "fro retained": sqrt of the kept S^2 over all
    values = list(kept.values())
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    assert f"Average Frobenius norm retention: {mean:.2%} | std: {std:0.3f}" in written.lines
    worst = sorted(kept, key=kept.get)
    listed = [line for line in written.lines if line.startswith("kept least: ")]
    assert listed == [f"kept least: {n} (rank 2): {kept[n]:.1%} of its Frobenius norm" for n in worst]
    tensors, _ = load_lora(written.path)
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {2}
    assert host.published == [written.path]
    with pytest.raises(UserError, match="give the new rank"):
        tools.resize("A.safetensors", 0, None, None, "A-r0")


def _run_folder(folder: Path, name: str) -> None:
    folder.mkdir(parents=True)
    (folder / f"{name}-loss.csv").write_text(
        "step,epoch,loss,validation_step_average,validation_epoch_average\n5,1,0.2,,0.25\n10,2,0.2,,0.21\n15,3,0.2,,0.23\n", encoding="utf-8")
    for epoch, file in ((1, f"{name}-000001"), (2, f"{name}-000002"), (3, name)):
        save_lora(folder / f"{file}.safetensors", {"lora_unet_x.alpha": torch.tensor(1.0)},
                  {"ss_output_name": name, "ss_epoch": str(epoch), "ss_steps": str(5 * epoch)})


def test_pick_ranks_the_last_runs_saves(host, tools):
    from lora_train.ui.i18n import Translator
    from lora_train.ui.tools_tab import ranking_html

    with pytest.raises(UserError, match="no run yet"):
        tools.pick("")
    _run_folder(host.work_dir() / "style", "style")
    ranking, grid = tools.pick("")  # no run in this session: the newest run folder of the work folder
    assert [s.file.name for s in ranking.saves] == ["style-000002.safetensors", "style.safetensors", "style-000001.safetensors"]
    assert grid is None, "no previews to put side by side"
    shown = ranking_html(ranking, Translator())
    assert 'data-file="style-000002.safetensors" data-suggested="1"' in shown and shown.count('data-suggested="1"') == 1
    assert f"suggested: {host.work_dir() / 'style' / 'style-000002.safetensors'}" in shown
    # this session's last run wins over the folder's newest
    _run_folder(host.work_dir() / "other", "other")
    tools.manager._runs.append(RunStatus("run-1", "style", phase="finished", work_dir=str(host.work_dir() / "style")))
    assert tools.pick("")[0].name == "style"


def test_a_listening_webui_keeps_every_path_inside_the_allowed_folders(tmp_path):
    root, outside = tmp_path / "webui", tmp_path / "srv"
    host = FakeHost(root, AccessPolicy.build([root], remote=True))
    tools = Tools(RunManager(host))
    write_lora(host.lora_dir() / "A.safetensors", rank=2, alpha=2, seed=9)
    stranger = write_lora(outside / "B.safetensors", rank=2, alpha=2, seed=10)
    _run_folder(outside / "run", "run")
    for call in (lambda: tools.merge(f"A:1,{stranger}:-1", "", "AB", 0), lambda: tools.lbw(str(stranger), "ALL", "", "B2"),
                 lambda: tools.resize(str(stranger), 1, None, None, "B1"), lambda: tools.pick(str(outside / "run"))):
        with pytest.raises(UserError, match="outside the allowed folders"):
            call()
    assert tools.lora_files() == ["A.safetensors"] and host.published == []
    assert not (outside / "run" / "run-pick.png").exists()
    # inside the roots the same host works
    assert tools.lbw("A.safetensors", "ALL", "", "A2").path == host.lora_dir() / "A2.safetensors"


def test_while_a_run_holds_the_model_only_the_list_is_refreshed(host, tools):
    write_lora(host.lora_dir() / "A.safetensors", rank=2, alpha=2, seed=11)
    tools.manager._current = RunStatus("run-1", "busy", phase="training")
    written = tools.lbw("A.safetensors", "ALL0.5", "", "A-half")
    assert host.published == [] and host.list_refreshed == 1
    assert written.lines[-1] == "a run holds the model: the load check of A-half.safetensors is skipped, the LoRA list is refreshed"


@pytest.mark.gradio
def test_the_tabs_merge_button_shows_chinese_and_lists_the_new_file(host):
    """The tab's own handler (the function gradio calls), built in Chinese."""
    from lora_train.ui.i18n import Translator
    from lora_train.ui import compat
    from lora_train.ui.tabs import create_tabs

    write_lora(host.lora_dir() / "A.safetensors", rank=2, alpha=2, seed=12)
    write_lora(host.lora_dir() / "A_BASE.safetensors", rank=2, alpha=2, seed=13)
    blocks = create_tabs(RunManager(host), host, Translator("zh_CN"))
    ids = {block._id: getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    merge = next(ev for ev in compat.listeners(blocks) if ev.targets and ids.get(ev.targets[0]) == "lora_tools_merge")
    table = json.loads((Path(__file__).resolve().parents[1] / "localizations" / "zh_CN.json").read_text(encoding="utf-8"))
    message, lbw_list, resize_list = merge.fn("A:1:GP1,A_BASE:-1:GP2", GUIDE_PRESETS, "A-distilled", 0)
    out = host.lora_dir() / "A-distilled.safetensors"
    assert table["wrote {path}"].format(path=out) in message and 'data-error="0"' in message
    assert "A-distilled.safetensors" in lbw_list["choices"] and lbw_list["choices"] == resize_list["choices"]
    message, *_ = merge.fn("A:1,A_BASE:-1", "", "A", 0)
    assert 'data-error="1"' in message and "A.safetensors" in message and "wrote" not in message


@pytest.mark.gradio
def test_the_pick_image_box_shows_only_with_previews(host):
    """Without validation data Pick says so in one line and hides its (empty) image box."""
    from lora_train.ui import compat
    from lora_train.ui.tabs import create_tabs

    run = host.work_dir() / "runs" / "plain"
    run.mkdir(parents=True)
    loss_csv = run / "plain-loss.csv"
    loss_csv.write_text("step,epoch,loss,lr_unet,lr_textencoder\n1,1,0.5,1e-4,\n", encoding="utf-8")
    blocks = create_tabs(RunManager(host), host)
    ids = {block._id: getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    pick = next(ev for ev in compat.listeners(blocks) if ev.targets and ids.get(ev.targets[0]) == "lora_tools_pick")
    message, table, image = pick.fn(str(run))
    assert 'data-error="1"' in message and "validation_split" in message and table == ""
    assert image["visible"] is False and image["value"] is None
    loss_csv.write_text("step,loss\n1,0.5\n", encoding="utf-8")  # not ours: one line that names the file, not a KeyError
    message, _, image = pick.fn(str(run))
    assert 'data-error="1"' in message and "plain-loss.csv: line 2: not a loss.csv that LoRA Train wrote" in message


@pytest.mark.gradio
def test_merge_reads_ia3_items_through_the_model_field(tmp_path, tiny_adapter):
    """merge's --model in the tab: an IA3 item's change is its scale times the model's own weight."""
    root = tmp_path / "webui"
    host = FakeHost(root, AccessPolicy.build([root], remote=True))
    tools = Tools(RunManager(host))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    weight = next(t.module.weight for t in tiny_adapter.file_targets() if t.name == name).detach().float()
    scale = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(14))
    host.lora_dir().mkdir(parents=True)
    save_lora(host.lora_dir() / "ia3.safetensors", {f"{name}.weight": scale, f"{name}.on_input": torch.tensor(0)},
              {"ss_base_model_version": "sd_v1"})
    full = min(weight.shape)
    with pytest.raises(UserError, match=r"IA3.*--model"):
        tools.merge("ia3:0.5", "", "no-model", full)
    outside = tmp_path / "srv" / "model.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"not read")
    with pytest.raises(UserError, match="merge model: .*outside the allowed folders"):
        tools.merge("ia3:0.5", "", "m", full, str(outside))
    with pytest.raises(UserError, match="no such checkpoint file"):
        tools.merge("ia3:0.5", "", "m", full, str(root / "models" / "missing.safetensors"))
    assert host.published == []
    written = tools.merge("ia3:0.5", "", "m", full, "builtin:tiny")
    torch.testing.assert_close(deltas(written.path)[name], 0.5 * weight * scale[:, None], rtol=1e-3, atol=1e-4)
    # the tab hands its Model field to the same call
    from lora_train.ui import compat
    from lora_train.ui.tabs import create_tabs

    blocks = create_tabs(RunManager(host), host)
    ids = {block._id: getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    dep = next(ev for ev in compat.listeners(blocks) if ev.targets and ids.get(ev.targets[0]) == "lora_tools_merge")
    assert [ids[i] for i in dep.inputs][-1] == "lora_tools_merge_model"
