"""The Train tab's form: every engine knob is a field, the form round-trips a config, presets are
valid configs, and the HTML fragments show what the run manager knows."""

from __future__ import annotations

import pytest

from lora_train.errors import UserError
from lora_train.train.config import TrainConfig
from lora_train.ui import chart, form, presets
from lora_train.ui.i18n import Translator
from lora_train.app.runs import RunStatus


def test_every_engine_key_is_a_field_with_its_sd_scripts_name():
    keys = {f.key for f in form.fields()}
    assert keys == set(TrainConfig.key_index()) - form.HIDDEN
    assert set(form.BASIC) <= keys
    assert all(f.key in form.HELP for f in form.fields() if f.basic)


def test_form_round_trips_a_config():
    flds = form.fields()
    c = TrainConfig()
    c.update({"network_dim": 12, "network_alpha": 6.0, "conv_dim": 4, "optimizer_type": "Prodigy", "optimizer_args": ["d_coef=2", "use_bias_correction=True"],
              "lr_scheduler": "cosine", "shuffle_caption": True, "keep_tokens": 2, "resolution": "512,768", "noise_offset": 0.05,
              "train_data_dir": "D:/训练/10_zkz", "max_train_epochs": 7, "seed": 42, "block_dims": ",".join(["4"] * 25),
              "mixed_precision": "bf16", "save_precision": "fp16", "min_snr_gamma": 5.0, "flip_aug": True}, source="test")
    back = form.config_from_values(flds, form.values_from_config(flds, c))
    assert {k: back.get(k) for k in back.key_index() if k not in form.HIDDEN} == {k: c.get(k) for k in c.key_index() if k not in form.HIDDEN}


def test_empty_text_means_the_default_and_bad_values_name_the_field():
    flds = form.fields()
    values = form.values_from_config(flds, TrainConfig())
    i = [f.key for f in flds].index("network_dim")
    values[i] = ""
    assert form.config_from_values(flds, values).network.network_dim is None
    values[i] = "sixteen"
    with pytest.raises(UserError, match="network_dim"):
        form.config_from_values(flds, values)


@pytest.mark.parametrize("subject", presets.SUBJECTS)
@pytest.mark.parametrize("base", presets.BASES)
def test_presets_are_valid_configs(subject, base):
    c = TrainConfig().update(presets.preset(subject, base), source="preset")
    assert c.network.network_dim and c.optimizer.unet_lr
    if base == "SDXL":
        assert c.network.network_train_unet_only and c.training.cache_text_encoder_outputs and c.dataset.resolution == "1024"
    else:
        assert c.dataset.resolution == "512"


def test_presets_differ_by_subject():
    a, b = presets.preset("character", "SD1.5"), presets.preset("style", "SD1.5")
    assert a["keep_tokens"] == 1 and b["keep_tokens"] == 0 and a["max_train_epochs"] != b["max_train_epochs"]


def test_loss_chart_and_status_show_the_run():
    t = Translator()
    assert 'data-points="0"' in chart.loss_chart([], t)
    svg = chart.loss_chart([(1, 0.5), (2, float("nan")), (3, 0.25)], t)
    assert 'data-points="3"' in svg and 'data-last-step="3"' in svg and svg.count("<polyline") == 2
    s = RunStatus(id="run-1", name="zkz <b>", phase="training", step=5, total_steps=20, epoch=1, epochs=4, losses=[(5, 0.123456)],
                  steps_per_second=2.0, eta_seconds=7.5)
    html = chart.status_html(s, t, ["next"], paused=True)
    assert 'data-phase="training"' in html and "5 / 20" in html and "0.1235" in html and "0:08" in html
    assert "zkz &lt;b&gt;" in html and "next (queue paused)" in html
    assert 'width:25.0%' in html


def test_status_tells_the_current_state_only():
    import time

    t = Translator()
    ended = time.mktime((2026, 12, 4, 21, 7, 5, 0, 0, -1))
    base = dict(id="run-1", name="grntri", step=13, total_steps=460, epoch=1, epochs=4, losses=[(13, 0.2)], steps_per_second=2.0)
    stopping = chart.status_html(RunStatus(phase="training", eta_seconds=6.0, stopping=True, **base), t)
    assert "Stopping: saving after the current step" in stopping and "Training in progress" not in stopping
    assert "ETA" not in stopping, "no ETA once Stop was pressed"
    for phase, label in (("cancelled", "Stopped by user"), ("finished", "Training finished"), ("failed", "Training failed")):
        html = chart.status_html(RunStatus(phase=phase, ended_at=ended, **base), t)
        assert label in html and "Ended" in html and "21:07:05" in html, phase
        assert "ETA" not in html and "it/s" not in html and "stopping" not in html.lower(), phase


@pytest.mark.gradio
def test_the_start_message_becomes_how_the_run_ended():
    import time

    from lora_train.ui.tab import _message, _message_after

    class Manager:
        def __init__(self, run):
            self.r = run

        def run(self, run_id):
            if run_id != self.r.id:
                raise KeyError(run_id)
            return self.r

    ended = time.mktime((2026, 12, 4, 21, 7, 5, 0, 0, -1))
    started = _message("Started: grntri", run_id="run-3")
    running = RunStatus(id="run-3", name="grntri", phase="training")
    assert _message_after(started, Manager(running), Translator()) is None, "still running: the message stays"
    assert _message_after(_message("a folder error", True), Manager(running), Translator()) is None, "not about a run"
    for phase, text, zh in (("finished", "Finished: grntri (21:07:05)", "已完成：grntri (21:07:05)"),
                            ("cancelled", "Stopped: grntri (21:07:05)", "已停止：grntri (21:07:05)"),
                            ("failed", "Failed: grntri (21:07:05)", "失败：grntri (21:07:05)")):
        run = RunStatus(id="run-3", name="grntri", phase=phase, ended_at=ended)
        after = _message_after(started, Manager(run), Translator())
        assert text in after and "Started" not in after and 'data-run=""' in after
        assert zh in _message_after(started, Manager(run), Translator("zh_CN"))
        assert ('data-error="1"' in after) == (phase == "failed")


@pytest.mark.gradio
def test_bucket_bounds_follow_a_small_resolution():
    from lora_train.ui.tab import _fit_buckets

    c = TrainConfig().update({**presets.preset("concept", "SD1.5"), "resolution": "64"})
    _fit_buckets(c)
    assert (c.dataset.min_bucket_reso, c.dataset.max_bucket_reso) == (64, 1024)
    c = TrainConfig().update({**presets.preset("concept", "SD1.5"), "resolution": "768,512"})
    _fit_buckets(c)
    assert c.dataset.min_bucket_reso == 256, "left alone where it already fits"


def test_preview_line_from_the_txt2img_tab():
    import json

    from lora_train.sample.prompts import parse_prompt_line
    from lora_train.ui.txt2img import preview_line

    params = {"prompt": "zkz, a circle\non the left", "negative_prompt": "blurry", "steps": "28", "sampler_name": "DPM++ 2M",
              "cfg_scale": "6.5", "seed": "-1", "width": "512", "height": "768"}
    line = preview_line(json.dumps(params))
    p = parse_prompt_line(line)
    assert (p.prompt, p.negative, p.width, p.height, p.steps, p.scale, p.seed) == ("zkz, a circle on the left", "blurry", 512, 768, 28, 6.5, None)
    assert line.endswith("--ss DPM++ 2M")
    assert parse_prompt_line(preview_line(json.dumps({**params, "seed": "42"}))).seed == 42
    assert preview_line("") is None and preview_line(json.dumps({"prompt": " "})) is None and preview_line("{bad") is None


@pytest.mark.gradio
def test_following_the_model_keeps_an_error_the_user_has_not_read():
    from lora_train.ui.tab import _message, model_message

    refused = _message("train_data_dir '/nope' does not exist", True)
    assert model_message(refused, "The WebUI loaded x: resolution set to 64") is None
    started = _message("Started: x", run_id="run-1")
    assert "resolution set to 64" in model_message(started, "The WebUI loaded x: resolution set to 64")


class _LazyHost:
    """A host that loads its checkpoint only when something first uses it, as Forge does; its model
    version counts loads (the WebUI's model-loaded callback, which Forge calls too)."""

    def __init__(self):
        self.family, self.loads = None, 0

    def load(self, family):
        self.family, self.loads = family, self.loads + 1

    def model_version(self):
        return self.loads

    def model_family(self):
        return self.family

    def model_resolution(self):
        return 1024 if self.family == "sdxl" else 512

    def model_label(self):
        return "x.safetensors" if self.family else "no checkpoint loaded"


def test_a_checkpoint_the_run_itself_loads_leaves_the_form_as_started():
    """Forge by hand: the form filled at 64 px before Forge had loaded anything, Start loads the
    checkpoint, and the next refresh set the form back to 512 px ("The WebUI loaded ...: resolution set
    to 512") while the run trained at 64. A model that appears while a run holds it is the run's own."""
    from lora_train.ui.tab import follow_model, initial_config

    flds = form.fields()
    t = Translator()
    host = _LazyHost()
    config = initial_config(host)
    config.set("resolution", "64")
    values = form.values_from_config(flds, config)
    # the page's first refresh: nothing loaded yet, so nothing is seen
    assert follow_model(host, flds, -1, "concept", "SD1.5", values, t) == (-1, None, None, None)
    host.load("sd15")  # Start: the run loads Forge's chosen checkpoint
    version, base, new_values, message = follow_model(host, flds, -1, "concept", "SD1.5", values, t, running=True)
    assert (version, base, new_values, message) == (1, None, None, None)
    # the next refreshes have seen it: the user's 64 px stays after the run too
    assert follow_model(host, flds, version, "concept", "SD1.5", values, t) == (1, None, None, None)
    # without a run the same load is followed as before (a txt2img generation loaded it) ...
    version, base, new_values, message = follow_model(host, flds, -1, "concept", "SD1.5", values, t)
    assert version == 1 and dict(zip([f.key for f in flds], new_values))["resolution"] == "512" and "512" in message
    # ... and so is a later switch of checkpoint, once no run holds the model
    host.load("sdxl")
    version, base, new_values, message = follow_model(host, flds, 1, "concept", "SD1.5", values, t)
    assert version == 2 and base == "SDXL" and dict(zip([f.key for f in flds], new_values))["resolution"] == "1024"


@pytest.mark.gradio
def test_following_the_model_writes_only_the_fields_it_changes():
    """By hand in the WebUI: a dataset folder typed just after the page loaded came back empty, because
    the first refresh's model follow wrote every field back as it had read them (before the typing)."""
    from lora_train.ui.tab import changed_only, follow_model, initial_config

    flds = form.fields()
    host = _LazyHost()
    host.load("sd15")
    config = initial_config(host)
    config.set("resolution", "64")
    read = form.values_from_config(flds, config)  # what the refresh read: train_data_dir still empty
    _, _, new_values, _ = follow_model(host, flds, -1, "concept", "SD1.5", read, Translator())
    updates = dict(zip([f.key for f in flds], changed_only(new_values, read)))
    assert updates["resolution"]["value"] == "512"
    assert "value" not in updates["train_data_dir"]  # what the user typed meanwhile stays
    assert sum("value" in u for u in updates.values()) < len(flds) // 2


@pytest.mark.gradio
def test_the_refresh_sends_the_form_only_when_the_model_moved(tmp_path):
    """By hand in the WebUI (64 px, batch 2, 1080 steps): with the tab open, every 1.5 s refresh sent all
    form fields to the server and back for the model follow, and the run took 0.265 s/step against 0.124
    with the page closed. The refresh now sends a few inputs; the form goes only on the hidden model box's
    change, which the refresh moves only while the form has not followed the model's version."""
    from lora_train.app.runs import RunManager
    from lora_train.host.standalone import StandaloneHost
    from lora_train.ui import compat
    from lora_train.ui.tab import model_token
    from lora_train.ui.tabs import create_tabs

    host = StandaloneHost("builtin:tiny", tmp_path / "models" / "Lora", tmp_path / "runs")
    blocks = create_tabs(RunManager(host), host)
    ids = {block._id: getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    events = compat.listeners(blocks)
    refresh = next(ev for ev in events if ev.targets and ids.get(ev.targets[0]) == "lora_train_refresh")
    assert len(refresh.inputs) <= 3, [ids.get(i) for i in refresh.inputs]
    assert not [ev for ev in events if ev.after == events.index(refresh)], "nothing runs after every refresh"
    assert ids[refresh.outputs[-1]] == "lora_train_model_now"
    follow = next(ev for ev in events if ev.targets and ids.get(ev.targets[0]) == "lora_train_model_now")
    assert follow.event == "change" and len(follow.inputs) > len(form.fields())

    version = host.model_version()
    *_, token = refresh.fn("", "", -1)  # a new page: the form has not followed the model yet
    assert token != str(version) and token != refresh.fn("", "", -1)[-1], "a new value each refresh until it follows"
    assert refresh.fn("", "", version)[-1] == str(version) == model_token(version, version), "then it stays"
