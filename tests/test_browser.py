"""The Train tab in a real browser: the standalone server (`python -m lora_train ui`) driven by
Playwright over Debian's chromium. Plan, start, live status/loss via the page's own polling, stop,
resume, the published files, Expert mode and the zh_CN labels.

The tests of the English server run in file order and share one page: each stage continues the run
the previous one left. Full-page screenshots of every stage go to `test-artifacts/browser/`
(`test-artifacts/browser-gradio4/` when `make test` runs them again under gradio 4).
Playwright never downloads a browser here: it launches /usr/bin/chromium (`make test` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import make_dataset

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ZH_CN = REPO / "localizations" / "zh_CN.json"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (`make test` installs Debian's chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing (requirements-dev.txt)")
pytestmark = pytest.mark.gradio  # `make test` runs these under gradio 4.40 (Forge) too

from lora_train.ui import compat  # noqa: E402

ARTIFACTS = REPO / "test-artifacts" / ("browser-gradio4" if compat.GRADIO_4 else "browser")

# The run: 20 images x 1 repeat at batch 2 = 10 steps per epoch, 150 steps: long enough to watch it and stop it
# (about 3 steps/s here, with a preview and a save every epoch), short enough to let the resumed run finish.
IMAGES, REPEATS, BATCH, EPOCHS = 20, 1, 2, 15
NAME, TRIGGER = "browser_lora", "zkz"


class Server:
    def __init__(self, tmp: Path, lang: str | None = None):
        self.tmp = tmp
        self.lora_dir, self.work_dir = tmp / "Lora", tmp / "runs"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = tmp / "server.log"
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "LORA_TRAIN_CACHE": str(tmp / "cache"),
               "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "lora_train", "ui", "--model", "builtin:tiny", "--port", str(self.port),
               "--lora-dir", str(self.lora_dir), "--work-dir", str(self.work_dir)]
        if lang:
            cmd += ["--lang", lang]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self, tail: int = 6000) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    def wait_up(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"the server did not answer {self.url} in {timeout:.0f} s:\n{self.log()}")

    def close(self, name: str) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.log_path, ARTIFACTS / f"{name}.log")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path_factory, request, lang: str | None, name: str):
    server = Server(tmp_path_factory.mktemp(name), lang)
    failed = request.session.testsfailed
    try:
        server.wait_up()
        yield server
    finally:
        server.close(name)
        if request.session.testsfailed > failed:  # the log also goes to the artifacts folder
            sys.__stderr__.write(f"\n---- {name} log ({ARTIFACTS / (name + '.log')}) ----\n{server.log()}\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    yield from _serve(tmp_path_factory, request, None, "server")


@pytest.fixture(scope="module")
def zh_server(tmp_path_factory, request):
    yield from _serve(tmp_path_factory, request, "zh_CN", "server-zh_CN")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    pg.server = server
    pg.goto(server.url)
    pg.wait_for_selector("#lora_train_start")
    yield pg
    ctx.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("browser-data"), count=IMAGES, repeats=REPEATS, size=64)


# -- helpers ---------------------------------------------------------------------------------------
def shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def field(pg, key: str):
    return pg.locator(f"#lora_train_{key} input, #lora_train_{key} textarea").first


def set_field(pg, key: str, value) -> None:
    box = field(pg, key)
    box.fill(str(value))
    box.press("Tab")  # blur: the dataset fields and epochs re-plan on it


def state(pg) -> dict:
    el = pg.locator("#lora_train_state").first
    return {"phase": el.get_attribute("data-phase"), "step": int(el.get_attribute("data-step") or 0),
            "total": int(el.get_attribute("data-total") or 0)}


def points(pg) -> int:
    return int(pg.locator("#lora_train_chart_svg").first.get_attribute("data-points") or 0)


def published(pg) -> list[str]:
    return pg.locator("#lora_train_published li").all_inner_texts()


def wait_for(pg, what: str, cond, timeout: float = 60.0, every: float = 0.25):
    """Poll `cond()` until truthy; the page's own JS does the refreshing (never clicks Refresh)."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            last = cond()
        except Exception as e:  # element replaced mid-read
            last = e
        if last and not isinstance(last, Exception):
            return last
        pg.wait_for_timeout(every * 1000)
    shot(pg, "timeout-" + re.sub(r"\W+", "_", what)[:40])
    message = pg.locator("#lora_train_message").first.inner_text()
    status = pg.locator("#lora_train_status").first.inner_text()
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})\n"
                         f"message: {message}\nstatus: {status}\n---- server log ----\n{pg.server.log()}")


# -- the English server, one run through the stages --------------------------------------------------
def test_a_plan_matches_the_dataset(page, dataset):
    shot(page, "a0-loaded")
    assert page.locator("#lora_train_start").first.inner_text().strip() == "Start"
    assert page.locator("#lora_train_plan_info").count() == 0, "no plan before a dataset is set"
    set_field(page, "train_data_dir", dataset)
    set_field(page, "train_batch_size", BATCH)
    set_field(page, "max_train_epochs", EPOCHS)
    assert field(page, "resolution").input_value() == "64", "the tiny model's size is the default resolution"
    page.locator("#lora_train_check").first.click()
    per_epoch = -(-IMAGES * REPEATS // BATCH)
    info = page.locator("#lora_train_plan_info").first

    def planned():
        return (info.count() and info.get_attribute("data-total-steps") == str(per_epoch * EPOCHS)
                and info.get_attribute("data-steps-per-epoch") == str(per_epoch))

    # the page's first check also imports the dataset code: on a loaded 2-core machine that took over 30 s
    wait_for(page, "the plan", planned, 120)
    text = page.locator("#lora_train_plan").first.inner_text()
    assert "Steps per epoch" in text and "Total steps" in text
    shot(page, "a1-plan")


def test_a2_the_page_follows_the_model_without_sending_the_form_each_refresh(page):
    """The hidden model box (style.css keeps it on the page, out of sight): a refresh moves it while the
    form has not followed the model, and its change event runs the follow, which catches the form up,
    so the box settles on the version alone (tests/test_ui_form.py checks the wiring)."""
    box = page.locator("#lora_train_model_now textarea, #lora_train_model_now input").first
    assert not page.locator("#lora_train_model_now").first.is_visible()
    wait_for(page, "the model box to settle on the version", lambda: re.fullmatch(r"\d+", box.input_value()), 30)


def test_b_start_updates_status_and_loss_live(page):
    set_field(page, "trigger", TRIGGER)
    set_field(page, "output_name", NAME)
    page.locator("#lora_train_start").first.click()
    wait_for(page, "the Started message", lambda: NAME in page.locator("#lora_train_message").first.inner_text(), 30)
    shot(page, "b0-started")
    s0 = wait_for(page, "phase training with steps", lambda: (s := state(page))["phase"] == "training" and s["step"] > 0 and s,
                  90)
    p0 = wait_for(page, "loss points", lambda: points(page), 30)
    assert s0["total"] == 10 * EPOCHS
    shot(page, "b1-training")
    wait_for(page, "more loss points", lambda: points(page) > p0 and state(page)["step"] > s0["step"], 30)
    assert state(page)["phase"] == "training"
    shot(page, "b2-training-later")


def test_c_stop_publishes_interrupted(page, server):
    assert state(page)["phase"] == "training", "the run ended before Stop: make it longer (EPOCHS)"
    page.locator("#lora_train_stop").first.click()
    wait_for(page, "phase cancelled", lambda: state(page)["phase"] == "cancelled", 60)
    name = f"{NAME}-interrupted.safetensors"
    wait_for(page, "the interrupted file in the list", lambda: any(p.endswith(name) for p in published(page)), 30)
    assert (server.lora_dir / name).is_file()
    assert (server.lora_dir / f"{NAME}-interrupted.json").is_file()
    assert int(page.locator("#lora_train_published").first.get_attribute("data-count")) == len(published(page))
    shot(page, "c-stopped")


def test_d_resume_trains_to_the_end_and_publishes_the_card(page, server):
    stopped_at = state(page)["step"]
    page.locator("#lora_train_resume").first.click()
    wait_for(page, "the Resuming message", lambda: NAME in page.locator("#lora_train_message").first.inner_text(), 30)
    wait_for(page, "phase training after resume", lambda: (s := state(page))["phase"] == "training" and s["step"] > stopped_at, 90)
    shot(page, "d0-resumed")
    wait_for(page, "phase finished", lambda: state(page)["phase"] == "finished", 300, every=1)
    s = state(page)
    assert s["step"] == s["total"] == 10 * EPOCHS
    final = server.lora_dir / f"{NAME}.safetensors"
    wait_for(page, "the final file in the list", lambda: any(p.endswith(final.name) for p in published(page)), 30)
    assert final.is_file()
    card = json.loads((server.lora_dir / f"{NAME}.json").read_text(encoding="utf-8"))
    assert card["activation text"] == TRIGGER
    assert (server.lora_dir / f"{NAME}.preview.png").is_file(), "previews are on (Preview every epoch) by default"
    wait_for(page, "a preview in the gallery", lambda: page.locator("#lora_train_previews img").count() > 0, 30)
    # the finished run replaced its interrupted save, and the message says how the run ended
    assert not (server.lora_dir / f"{NAME}-interrupted.safetensors").exists()
    wait_for(page, "the interrupted file gone from the list", lambda: not any("-interrupted" in p for p in published(page)), 30)
    wait_for(page, "the Finished message", lambda: page.locator("#lora_train_message").first.inner_text().startswith(f"Finished: {NAME}"), 30)
    assert "ETA" not in page.locator("#lora_train_status").first.inner_text()
    shot(page, "d1-finished")


def test_e0_a_checkbox_comes_before_its_help(page):
    box = page.locator("#lora_train_use_txt2img label").first.bounding_box()
    help_text = page.locator("#lora_train_use_txt2img").first.get_by_text("In the WebUI: prompt").bounding_box()
    assert box["y"] + box["height"] <= help_text["y"] + 1, (box, help_text)


def test_e_expert_mode_shows_every_knob(page):
    expert = page.locator("#lora_train_expert").first
    assert not expert.is_visible()
    page.locator("#lora_train_mode label", has_text="Expert").click()
    expert.wait_for(state="visible")
    page.locator("#lora_train_expert").first.get_by_text("Optimizer and learning rate").click()
    dropdown = page.locator("#lora_train_optimizer_type").first
    dropdown.wait_for(state="visible")
    assert field(page, "optimizer_type").input_value() == "AdamW"
    shot(page, "e-expert")
    page.locator("#lora_train_mode label", has_text="Basic").click()
    expert.wait_for(state="hidden")


def test_e1_network_type_sets_the_guides_defaults(page):
    """Choosing LoHa fills the SDXL tutorial's 8/4/4/1 and LyCORIS' module and algo; LoRA puts 32/1/-/- back."""
    page.locator("#lora_train_network_type label", has_text="LoHa").click()
    wait_for(page, "LoHa's dims", lambda: field(page, "network_dim").input_value() == "8", 30)
    assert [float(field(page, k).input_value()) for k in ("network_alpha", "conv_dim", "conv_alpha")] == [4, 4, 1]
    assert field(page, "algo").input_value() == "loha" and field(page, "network_module").input_value() == "lycoris.kohya"
    assert "Network type LoHa" in page.locator("#lora_train_message").first.inner_text()
    shot(page, "e1-loha")
    page.locator("#lora_train_network_type label", has_text="LoRA").first.click()
    wait_for(page, "LoRA's dims", lambda: field(page, "network_dim").input_value() == "32", 30)
    assert field(page, "conv_dim").input_value() == "" and field(page, "network_module").input_value() == "networks.lora"


def test_e2_apply_preset_keeps_the_models_size(page):
    set_field(page, "resolution", "128")
    page.locator("#lora_train_apply_preset").first.click()
    wait_for(page, "the preset message", lambda: "Preset applied" in page.locator("#lora_train_message").first.inner_text(), 30)
    assert field(page, "resolution").input_value() == "64", "the concept / SD1.5 preset at the loaded 64 px model's size"
    assert "resolution set to 64" in page.locator("#lora_train_message").first.inner_text()


# -- the zh_CN server ------------------------------------------------------------------------------
def test_f_zh_cn_labels(browser, zh_server, dataset):
    table = json.loads(ZH_CN.read_text(encoding="utf-8"))
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, locale="zh-CN")
    try:
        pg = ctx.new_page()
        pg.goto(zh_server.url)
        pg.wait_for_selector("#lora_train_start")
        for key, eid in (("Start", "start"), ("Stop", "stop"), ("Resume", "resume"), ("Check dataset", "check")):
            text = pg.locator(f"#lora_train_{eid}").first.inner_text().strip()
            assert text == table[key] and text != key, (eid, text)
        pg.server = zh_server
        set_field(pg, "train_data_dir", dataset)
        wait_for(pg, "the plan", lambda: pg.locator("#lora_train_plan_info").count(), 30)
        plan = pg.locator("#lora_train_plan").first.inner_text()
        assert table["Total steps"] in plan and "Total steps" not in plan, plan
        assert "一般建议 1000-2000" in plan and "the usual guideline" not in plan, plan  # a message with numbers
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / "f-zh_CN.png"), full_page=True)
    finally:
        ctx.close()


# -- the Dataset tab, on the same page ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tag_data(tmp_path_factory) -> Path:
    """10_zkz/: four red and four blue images captioned "1girl, <colour> dress", and two without captions."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tag-data")
    folder = root / "10_zkz"
    folder.mkdir()
    for i in range(10):
        colour = ("red", "blue")[i % 2]
        Image.new("RGB", (96, 64), colour).save(folder / f"{i:02d}.png")
        if i < 8:
            (folder / f"{i:02d}.txt").write_text(f"1girl, {colour} dress", encoding="utf-8")
    return root


def _captions(root: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((root / "10_zkz").glob("*.txt"))}


def _dataset_message(pg) -> str:
    return pg.locator("#lora_dataset_message").first.inner_text()


def _count(pg, attr: str) -> int:
    el = pg.locator("#lora_dataset_count")
    return int(el.first.get_attribute(attr)) if el.count() else -1


def _tag_count(pg, tag: str) -> int:
    el = pg.locator(f'#lora_dataset_tags [data-tag="{tag}"]')
    return int(el.first.get_attribute("data-n")) if el.count() else 0


def test_g_dataset_tab_filter_add_trigger_undo_save(page, tag_data):
    before = _captions(tag_data)
    page.locator("#lora_train_tabs button", has_text="Dataset").first.click()
    page.locator("#lora_dataset_folder textarea, #lora_dataset_folder input").first.fill(str(tag_data))
    page.locator("#lora_dataset_load").first.click()
    wait_for(page, "10 images loaded", lambda: _count(page, "data-total") == 10, 30)
    wait_for(page, "10 thumbnails", lambda: page.locator("#lora_dataset_gallery img").count() == 10, 30)
    shot(page, "g0-dataset-loaded")
    assert _tag_count(page, "1girl") == 8 and _tag_count(page, "blue dress") == 4

    box = page.locator("#lora_dataset_all_of input").first
    box.click()
    box.fill("blue dress")
    box.press("Enter")
    wait_for(page, "the filter to show the 4 blue images", lambda: _count(page, "data-visible") == 4, 30)

    page.locator("#lora_dataset_arg_a textarea, #lora_dataset_arg_a input").first.fill("zkz")
    page.locator("#lora_dataset_preview").first.click()
    wait_for(page, "a preview of 4 changes", lambda: page.locator("#lora_dataset_diff").count()
             and page.locator("#lora_dataset_diff").first.get_attribute("data-count") == "4", 30)
    shot(page, "g1-preview")
    assert _captions(tag_data) == before and _tag_count(page, "zkz") == 0  # a preview changes nothing

    page.locator("#lora_dataset_apply").first.click()
    wait_for(page, "zkz on the 4 filtered images", lambda: _tag_count(page, "zkz") == 4, 30)
    assert "4 caption(s) changed" in _dataset_message(page)
    page.locator("#lora_dataset_undo").first.click()
    wait_for(page, "the undo", lambda: "undone" in _dataset_message(page) and _tag_count(page, "zkz") == 0, 30)
    page.locator("#lora_dataset_apply").first.click()
    wait_for(page, "zkz again", lambda: _tag_count(page, "zkz") == 4, 30)
    assert _captions(tag_data) == before  # nothing on disk before Save
    page.locator("#lora_dataset_save").first.click()
    wait_for(page, "the save", lambda: "saved 4 image(s)" in _dataset_message(page), 30)
    shot(page, "g2-saved")
    after = _captions(tag_data)
    assert sorted(k for k in after if after[k] != before[k]) == ["01.txt", "03.txt", "05.txt", "07.txt"]
    assert all(after[k] == "zkz, 1girl, blue dress" for k in ("01.txt", "03.txt", "05.txt", "07.txt"))


def test_h_dataset_keys_caption_editor_and_send_to_train(page, tag_data):
    box = page.locator("#lora_dataset_all_of input").first
    page.locator("#lora_dataset_all_of .token-remove, #lora_dataset_all_of .remove-all").first.click()
    wait_for(page, "the filter cleared", lambda: _count(page, "data-visible") == 10, 30)
    page.locator("#lora_dataset_gallery .thumbnail-item").nth(0).click()
    wait_for(page, "image 00 selected", lambda: "00.png" in page.locator("#lora_dataset_selected").first.inner_text(), 30)
    page.evaluate("document.activeElement && document.activeElement.blur()")  # no text field has the focus
    page.keyboard.press("ArrowRight")
    wait_for(page, "→ selects image 01", lambda: "01.png" in page.locator("#lora_dataset_selected").first.inner_text(), 30)
    caption = page.locator("#lora_dataset_caption textarea").first
    assert caption.input_value() == "zkz, 1girl, blue dress"
    caption.fill("zkz, 1girl, blue dress, hat")
    page.locator("#lora_dataset_apply_caption").first.click()
    wait_for(page, "the hat tag", lambda: _tag_count(page, "hat") == 1, 30)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press("Control+z")
    wait_for(page, "Ctrl+Z undoes the edit", lambda: _tag_count(page, "hat") == 0, 30)
    page.keyboard.press("Control+y")
    wait_for(page, "Ctrl+Y redoes it", lambda: _tag_count(page, "hat") == 1, 30)
    page.keyboard.press("Control+s")
    wait_for(page, "Ctrl+S saves", lambda: (tag_data / "10_zkz" / "01.txt").read_text(encoding="utf-8") == "zkz, 1girl, blue dress, hat", 30)
    shot(page, "h0-caption-edited")
    assert box.is_visible()

    page.locator("#lora_dataset_send").first.click()
    wait_for(page, "the Train tab with the folder filled in", lambda: field(page, "train_data_dir").is_visible()
             and field(page, "train_data_dir").input_value() == str(tag_data.resolve()), 30)
    shot(page, "h1-sent-to-train")
    page.locator("#lora_train_check").first.click()
    wait_for(page, "the plan of the sent folder", lambda: page.locator("#lora_train_plan_info").count()
             and "10" in page.locator("#lora_train_plan").first.inner_text(), 30)


def test_i_dataset_autotag_with_the_tiny_tagger(page, tag_data, tmp_path_factory):
    import tiny_tagger

    model = tiny_tagger.build(tmp_path_factory.mktemp("tagger") / "tiny")
    page.locator("#lora_train_tabs button", has_text="Dataset").first.click()
    page.locator("#lora_dataset_main").first.get_by_text("Auto-tag (the filtered images)").click()
    tagger = page.locator("#lora_dataset_tagger input").first
    tagger.fill(str(model))
    tagger.press("Enter")
    threshold = page.locator("#lora_dataset_general input[type=number]").first
    assert float(threshold.input_value()) == 0.3771  # the default model's own (moat v2)
    threshold.fill("0.35")
    threshold.press("Enter")
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.locator("#lora_dataset_autotag").first.click()
    wait_for(page, "the two uncaptioned images tagged", lambda: "Tagged: 2 caption(s) changed" in _dataset_message(page), 60)
    assert _tag_count(page, "hatsune miku") == 2 and _tag_count(page, "red theme") == 1 and _tag_count(page, "blue theme") == 1
    shot(page, "i0-tagged")
    page.locator("#lora_dataset_save").first.click()
    wait_for(page, "the tags saved", lambda: (tag_data / "10_zkz" / "09.txt").exists(), 30)
    assert (tag_data / "10_zkz" / "08.txt").read_text(encoding="utf-8") == "hatsune miku, red theme, long hair, ^_^"
    assert (tag_data / "10_zkz" / "09.txt").read_text(encoding="utf-8") == "hatsune miku, blue theme, long hair, ^_^"
    assert (tag_data / "10_zkz" / "00.txt").read_text(encoding="utf-8") == "1girl, red dress"  # prefill: captioned ones untouched


def test_j_tools_tab_merges_the_guides_formula_into_the_lora_folder(page, server):
    """Tools > Merge with the pre-filled GP1/GP2: the file and its card land in the LoRA folder, the message says so."""
    from test_tools_tab import GP1, GP2, BLOCK, deltas, write_lora

    a = write_lora(server.lora_dir / "tools_a.safetensors", rank=4, alpha=2, seed=1)
    base = write_lora(server.lora_dir / "tools_a_BASE.safetensors", rank=2, alpha=1, seed=2)
    page.locator("#lora_train_tabs button", has_text="Tools").first.click()
    # opening the tab lists the LoRAs written since the page loaded
    page.get_by_text("Block weights (lora-block-weight)").first.click()
    page.locator("#lora_tools_lbw_source input").first.click()
    wait_for(page, "tools_a in the block-weight source list",
             lambda: page.locator("#lora_tools_lbw_source ul.options li", has_text="tools_a").count() > 0, 30)
    page.keyboard.press("Escape")
    # a block-weight preset fills in its values, which the user then sees
    page.locator("#lora_tools_lbw_preset input").first.click()
    page.locator("#lora_tools_lbw_preset ul.options li", has_text="OUTS").first.click()
    weights = page.locator("#lora_tools_lbw_weights textarea, #lora_tools_lbw_weights input").first
    wait_for(page, "OUTS's values in the weights box", lambda: weights.input_value() == "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1", 30)
    presets = page.locator("#lora_tools_presets textarea").first.input_value()
    assert presets.startswith("GP1:1.0,0.6,0.9") and "\nGP2:0.3,0.1" in presets, "the guide's presets are pre-filled"
    page.locator("#lora_tools_formula textarea, #lora_tools_formula input").first.fill("tools_a:1:GP1,tools_a_BASE:-1:GP2")
    page.locator("#lora_tools_merge_output textarea, #lora_tools_merge_output input").first.fill("tools_a-distilled")
    page.locator("#lora_tools_merge").first.click()
    out = server.lora_dir / "tools_a-distilled.safetensors"
    shown = page.locator("#lora_tools_merge_message [data-error]")
    message = wait_for(page, "the merge message", lambda: shown.count() and shown.first.inner_text().strip(), 60)
    shot(page, "j-tools-merge")
    assert f"wrote {out}" in message, message
    merged, da, db = deltas(out), deltas(a), deltas(base)
    name, block = next(iter(BLOCK.items()))
    assert (merged[name] - (GP1[block] * da[name] - GP2[block] * db[name])).abs().max() < 1e-4
    assert out.with_suffix(".json").is_file()
