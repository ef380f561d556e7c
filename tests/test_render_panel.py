"""The Train tab's accordions for images the model makes itself (`ui/render_panel.py` over
`app/model_images.py`), on the standalone host and the real tiny model: "Make regularization images"
fills reg_data_dir (rendered once, then reused; refused while a run holds the model), and "Train
base-style LoRA" trains NAME_BASE through the run manager and publishes NAME-distilled whose deltas are
NAME x GP1 - NAME_BASE x GP2 per block, worked out here from the two published files."""

from __future__ import annotations

import html
import json
import re
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_dataset, small_run_config
from test_runs import TinyHost
from test_tools_merge import lora_deltas
from lora_train.app.base_style import PRESETS
from lora_train.app.runs import RunManager, RunRequest
from lora_train.ui.i18n import Translator
from lora_train.ui.render_panel import RenderPanel

# lora-block-weight's 17 SD1 blocks, and the block of a kohya name by sd-scripts' naming (by hand):
# down_blocks_i attentions/resnets_j is input_blocks_(3i+j+1), up_blocks_i ... output_blocks_(3i+j)
ID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09",
        "OUT10", "OUT11"]
GP2_EDITED = "0.5,0.2,0.2,0.2,0.2,0.2,0.2,0.3,0.3,0.3,0.3,0.3,0.4,0.4,0.4,0.4,0.4"  # not the preset: the textbox is read


def block_of(name: str) -> str:
    if name.startswith("lora_te"):
        return "BASE"
    if name.startswith("lora_unet_mid_block"):
        return "M00"
    m = re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_", name)
    assert m, name
    i, j = int(m.group(2)), int(m.group(4))
    return f"IN{3 * i + j + 1:02}" if m.group(1) == "down" else f"OUT{3 * i + j:02}"


class CountingHost(TinyHost):
    """The real standalone host; its txt2img counts the images it is asked for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.rendered: list[str] = []

    def txt2img(self, prompts):
        self.rendered += [p.prompt for p in prompts]
        return super().txt2img(prompts)


def make(tmp_path, tiny_model):
    host = CountingHost(tiny_model, tmp_path / "Lora", tmp_path / "runs")
    manager = RunManager(host)
    return host, manager, RenderPanel(manager, Translator())


def test_reg_button_fills_reg_data_dir_then_reuses_the_images(tmp_path, tiny_model):
    host, _, panel = make(tmp_path, tiny_model)
    folder, message = panel.on_reg("a photo of a girl", 2, 1, "64", "", "")
    images = Path(folder) / "1_a photo of a girl"
    assert sorted(p.name for p in images.iterdir()) == ["00000.png", "00000.txt", "00001.png", "00001.txt"]
    assert all((images / f"{i:05d}.txt").read_text(encoding="utf-8") == "a photo of a girl" for i in range(2))
    assert Image.open(images / "00000.png").size == (64, 64)  # the form's resolution
    assert json.loads((Path(folder) / "reg.json").read_text())["seed"] == 1  # the form's seed is empty
    assert Path(folder).parent == host.work_dir() / "reg-images"
    assert host.rendered == ["a photo of a girl"] * 2
    assert "rendering 2 images" in message and 'data-error="0"' in message

    again, message = panel.on_reg("a photo of a girl", 2, 1, "64", "", "")
    assert again == folder and len(host.rendered) == 2, "the second press renders nothing"
    assert "reusing 2 images rendered before" in message

    other, _ = panel.on_reg("a photo of a girl", 2, 1, "64", "7", folder)
    assert other != folder and json.loads((Path(other) / "reg.json").read_text())["seed"] == 7 and len(host.rendered) == 4

    kept, message = panel.on_reg("  ", 2, 1, "64", "", folder)
    assert kept == folder and 'data-error="1"' in message and "class prompt is empty" in message


def test_reg_button_while_a_run_holds_the_model(tmp_path, tiny_model):
    host, manager, panel = make(tmp_path, tiny_model)
    host.step_gate = threading.Event()
    data = make_dataset(tmp_path / "data", count=2)
    manager.submit(RunRequest(small_run_config(data, "busy", epochs=1), previews=False))
    deadline = time.time() + 60
    while manager.latest().phase != "training" and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert manager.latest().phase == "training"
        kept, message = panel.on_reg("a photo of a girl", 2, 1, "64", "", "/earlier")
        assert kept == "/earlier" and 'data-error="1"' in message
        assert "A training run is using the model right now" in message and message.count("\n") == 0
        assert host.rendered == []
    finally:
        host.step_gate.set()
        assert manager.wait(120)
    host.owner_thread = 1  # the WebUI's sign that a run holds its queue lock
    _, message = panel.on_reg("a photo of a girl", 2, 1, "64", "", "")
    assert "A training run is using the model right now" in message and host.rendered == []


def test_base_style_button_trains_base_and_publishes_distilled(tmp_path, tiny_model):
    host, manager, panel = make(tmp_path, tiny_model)
    data = make_dataset(tmp_path / "data", count=2)
    config = small_run_config(data, "style", epochs=1, save_every_n_epochs=None)
    manager.submit(RunRequest(config, trigger="zkz", previews=False))
    assert manager.wait(120) and manager.latest().phase == "finished"

    def build(values):
        return config, RunRequest(config, trigger="zkz")

    message = panel.on_base(build, 2, PRESETS["GP1"], GP2_EDITED)
    assert 'data-error="0"' in message and "rendering 2 images" in message and "'style_BASE' trains now" in html.unescape(message)
    # the captions without the folder's class token zkz
    assert host.rendered == ["a red circle, white background", "a green square, white background"]
    assert manager.wait(120)
    run = manager.latest()
    assert run.name == "style_BASE" and run.phase == "finished", run.error
    # the message names the run, so the tab's refresh replaces it with how the run ended
    from lora_train.ui.tab import _message_after

    assert f'data-run="{run.id}"' in message and "Finished" in _message_after(message, manager, Translator())

    lora = host.lora_dir()
    assert "the base model rendered itself" in json.loads((lora / "style_BASE.json").read_text(encoding="utf-8"))["notes"]
    distilled = lora / "style-distilled.safetensors"
    card = json.loads(distilled.with_suffix(".json").read_text(encoding="utf-8"))
    assert card["activation text"] == "zkz" and "merged from style:1:GP1,style_BASE:-1:GP2" in card["notes"]
    assert f"block weights GP2: {GP2_EDITED}" in card["notes"]
    assert any(m.startswith(f"wrote {distilled} = style:1:GP1,style_BASE:-1:GP2") for m in run.messages), run.messages
    assert any("style-distilled.safetensors loads onto the model with every module matched" in m for m in run.messages)

    gp1 = dict(zip(ID17, map(float, PRESETS["GP1"].split(","))))
    gp2 = dict(zip(ID17, map(float, GP2_EDITED.split(","))))
    style, base = lora_deltas(lora / "style.safetensors"), lora_deltas(lora / "style_BASE.safetensors")
    assert set(style) == set(base) and all(block_of(n) in ID17 for n in style)
    want = {n: gp1[block_of(n)] * style[n] - gp2[block_of(n)] * base[n] for n in style}
    got = lora_deltas(distilled)
    assert set(got) == set(want)
    # relative to each module's own change: one step of training leaves deltas of ~1e-4
    errors = {n: float((got[n].reshape(w.shape) - w).norm() / w.norm()) for n, w in want.items()}
    assert max(errors.values()) < 1e-4, max(errors.items(), key=lambda e: e[1])

    # pressed again: a new NAME_BASE_2 and a second distilled file, nothing overwritten
    before = distilled.read_bytes()
    panel.on_base(build, 2, PRESETS["GP1"], PRESETS["GP2"])
    assert manager.wait(120) and manager.latest().name == "style_BASE_2" and manager.latest().phase == "finished"
    assert distilled.read_bytes() == before and (lora / "style-distilled_2.safetensors").is_file()
    assert len(host.rendered) == 2, "the same captions: the images rendered before"


def test_base_style_button_without_the_style_lora(tmp_path, tiny_model):
    host, manager, panel = make(tmp_path, tiny_model)
    config = small_run_config(make_dataset(tmp_path / "data", count=2), "style", epochs=1)
    message = panel.on_base(lambda values: (config, RunRequest(config)), None, PRESETS["GP1"], PRESETS["GP2"])
    assert 'data-error="1"' in message and "train 'style' first" in html.unescape(message) and message.count("\n") == 0
    assert host.rendered == [] and manager.latest() is None


def test_base_style_button_refuses_a_wrong_preset_before_rendering(tmp_path, tiny_model):
    host, manager, panel = make(tmp_path, tiny_model)
    config = small_run_config(make_dataset(tmp_path / "data", count=2), "style", epochs=1)
    trained = host.work_dir() / "style" / "style.safetensors"
    trained.parent.mkdir(parents=True)
    trained.write_bytes(b"")  # only its presence is looked at before rendering
    message = panel.on_base(lambda values: (config, RunRequest(config)), None, "1,2,3", PRESETS["GP2"])
    assert 'data-error="1"' in message and "GP1" in message
    assert host.rendered == [] and manager.latest() is None


@pytest.mark.gradio
def test_the_accordions_are_in_the_train_tab(tmp_path):
    from lora_train.host.standalone import StandaloneHost
    from lora_train.ui import compat
    from lora_train.ui.app import create_app

    app = create_app(StandaloneHost("builtin:tiny", tmp_path / "Lora", tmp_path / "runs"))
    by_id = {c["props"].get("elem_id"): c for c in app.config["components"] if c["props"].get("elem_id")}
    assert by_id["lora_train_reg_make"]["props"]["value"] == "Make regularization images"
    assert by_id["lora_train_base_make"]["props"]["value"] == "Train base-style LoRA"
    assert by_id["lora_train_base_gp1"]["props"]["value"] == PRESETS["GP1"]
    assert by_id["lora_train_reg_n"]["props"]["value"] == 200 and by_id["lora_train_reg_repeats"]["props"]["value"] == 1
    reg_dir = by_id["lora_train_reg_data_dir"]["id"]
    events = compat.listeners(app)
    click = next(e for e in events if by_id["lora_train_reg_make"]["id"] in e.targets)
    assert reg_dir in click.outputs
    # then the dataset plan is shown again, with the reg images in it
    assert any(e.after == events.index(click) and by_id["lora_train_plan"]["id"] in e.outputs for e in events)
    base = next(e for e in events if by_id["lora_train_base_make"]["id"] in e.targets)
    # the page's loraTrainReadTxt2img drops one output value and fills the last input, as for Start
    assert len(base.outputs) == 1 and base.js == "loraTrainReadTxt2img"
    assert base.inputs[-1] == by_id["lora_train_txt2img_params"]["id"]


def test_a_requests_after_runs_once_finished_only(tmp_path, tiny_model):
    from lora_train.errors import UserError

    host, manager, _ = make(tmp_path, tiny_model)
    data = make_dataset(tmp_path / "data", count=2)
    calls = []

    def failing(status):
        calls.append((status.name, status.phase))
        raise UserError("merge: no LoRA named 'x'")

    manager.submit(RunRequest(small_run_config(data, "one", epochs=1), previews=False, after=failing))
    assert manager.wait(120)
    run = manager.latest()
    assert calls == [("one", "finished")] and run.phase == "finished"
    assert run.messages[-1] == "merge: no LoRA named 'x'"

    host.step_gate = threading.Event()
    manager.submit(RunRequest(small_run_config(data, "two", epochs=3), previews=False, after=lambda s: calls.append(s.name) or ["no"]))
    deadline = time.time() + 60
    while manager.latest().phase != "training" and time.time() < deadline:
        time.sleep(0.05)
    manager.stop()
    host.step_gate.set()
    assert manager.wait(120)
    assert manager.latest().phase == "cancelled" and calls == [("one", "finished")], "a stopped run has nothing to follow up"
