"""The WebUI host (`lora_train/host/a1111/`) with the WebUI mocked at its boundary: a fake `modules`
package (queue lock, shared.state, progress, processing ...) and a fake built-in Lora extension
(`networks`) in `sys.modules`, but the real tiny ldm model, so runs through `RunManager` really train.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_same_as, make_dataset, small_run_config, snapshot
from webui_names import webui_names, webui_unmapped
from lora_train.errors import UserError
from lora_train.model.loading import quiet
from lora_train.train import events as ev
from lora_train.train.config import TrainConfig
from lora_train.app.runs import RunManager, RunRequest


# -- the fake WebUI ----------------------------------------------------------------------------------
class QueueLock:
    """call_queue.queue_lock: a plain non-reentrant lock that knows its owner and refuses re-entry
    (the real FIFOLock would deadlock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.owner = None
        self.acquisitions = 0

    def acquire(self, blocking=True):
        assert self.owner != threading.get_ident(), "queue_lock re-entered: this deadlocks in the WebUI"
        ok = self._lock.acquire(blocking)
        if ok:
            self.owner = threading.get_ident()
            self.acquisitions += 1
        return ok

    def release(self):
        self.owner = None
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()

    def is_free(self) -> bool:
        if self._lock.acquire(False):
            self._lock.release()
            return True
        return False


class State:
    def __init__(self):
        self.calls = []
        self.interrupted = self.skipped = False
        self.job, self.job_no, self.job_count = "", 0, 0
        self.sampling_step = self.sampling_steps = 0
        self.textinfo = None
        self.current_image = None
        self.processing_has_refined_job_count = False

    def begin(self, job="(unknown)"):
        self.calls.append(("begin", job))
        self.job, self.job_no, self.job_count, self.interrupted, self.textinfo = job, 0, -1, False, None

    def end(self):
        self.calls.append(("end", self.job))
        self.job, self.job_count = "", 0

    def assign_current_image(self, image):
        self.current_image = image


class Opts:
    def __init__(self, **data):
        object.__setattr__(self, "data", dict(data))

    def __getattr__(self, item):
        try:
            return self.data[item]
        except KeyError:
            raise AttributeError(item) from None


class Processing:
    """modules.processing: records every p and renders a noise image from the global RNG after
    seeding it, as the WebUI does."""

    def __init__(self, webui):
        self.webui = webui
        self.ps = []

        class Processing:  # the WebUI keeps the last conditioning in class attributes
            cached_c = [None, None]
            cached_uc = [None, None]

        class Txt2Img(Processing):
            cached_hr_c = [None, None]
            cached_hr_uc = [None, None]

            def __init__(p, **kwargs):
                p.__dict__.update(kwargs)
                p.disable_extra_networks = False
                p.closed = False
                p.cached_c, p.cached_uc = Processing.cached_c, Processing.cached_uc

            def close(p):
                p.closed = True

        self.StableDiffusionProcessing = Processing
        self.StableDiffusionProcessingTxt2Img = Txt2Img

    def process_images(self, p):
        w = self.webui
        p.lock_held = w.call_queue.queue_lock.owner == threading.get_ident()
        p.checkpoint_setting = w.shared.opts.data.get("sd_model_checkpoint")
        self.ps.append(p)
        w.shared.state.job_count, w.shared.state.job_no, w.shared.state.sampling_steps = 1, 0, p.steps
        if hasattr(p.sd_model, "cond_stage_model"):
            # get_conds_with_caching: reuse the cached negative-prompt conditioning when prompt and
            # steps match, else encode with the model as it is now and cache that, in place
            key = ((p.negative_prompt,), p.steps)
            if p.cached_uc[0] == key:
                p.uc = p.cached_uc[1]
            else:
                from lora_train.model.ldm import LdmAdapter

                with torch.no_grad():
                    p.uc = LdmAdapter(p.sd_model).encode_captions([p.negative_prompt])
                p.cached_uc[0], p.cached_uc[1] = key, p.uc
        if w.shared.state.interrupted:  # the WebUI's samplers stop at once
            return SimpleNamespace(images=[], infotexts=[])
        torch.manual_seed(p.seed)
        pixels = (torch.rand(p.height, p.width, 3) * 255).to(torch.uint8).numpy()
        return SimpleNamespace(images=[Image.fromarray(pixels)], infotexts=[f"{p.prompt}\nSteps: {p.steps}, Seed: {p.seed}"])


class FakeNetworks(types.ModuleType):
    """The built-in Lora extension's `networks`: in-place merge bookkeeping and a loader that logs
    "didn't match keys" like the real one, and places only the names the real loader mapped on the
    loaded model (builtin:tiny, or the tiny SDXL)."""

    def __init__(self):
        super().__init__("networks")
        self.logging = logging
        self.loaded_networks = []
        self.available_networks = {}
        self.available_network_aliases = {}
        self.known_modules = None  # None: the names the real WebUI mapped on the loaded model
        self.load_error = None
        self.log_failures = True
        self.refreshes = 0
        self.loads = []

    def network_restore_weights_from_backup(self, m):
        # as in the WebUI: plain copy_ into the parameters (which require grad there), no no_grad here
        m.weight.copy_(m.network_weights_backup)
        if m.network_bias_backup is not None:
            m.bias.copy_(m.network_bias_backup)

    def list_available_networks(self):
        # as in the WebUI: both dicts cleared in place, then models/Lora scanned again
        self.refreshes += 1
        self.available_networks.clear()
        self.available_network_aliases.clear()
        folder = Path(self.lora_dir)
        for f in folder.glob("*.safetensors") if folder.is_dir() else []:
            self.available_networks[f.stem] = SimpleNamespace(name=f.stem, filename=str(f))
        self.available_network_aliases.update(self.available_networks)

    def load_networks(self, names):
        """The real one's lookup: when any name is unknown it calls the module's (global)
        `list_available_networks()` and looks them all up again."""
        if any(self.available_network_aliases.get(n) is None for n in names):
            self.list_available_networks()
        return [self.available_network_aliases.get(n) for n in names]

    def load_network(self, name, on_disk):
        self.loads.append((name, on_disk.filename))
        if self.load_error:
            raise self.load_error
        failed, placed = {}, {}
        known = self.known_modules
        if known is None:
            model = sys.modules["modules.sd_models"].model_data.sd_model
            known = webui_names("sdxl" if getattr(model, "is_sdxl", False) else "tiny")
        with safe_open(on_disk.filename, "pt") as f:
            for key in f.keys():
                module = key.partition(".")[0]
                if module not in known:
                    failed[key] = module.replace("lora_unet", "diffusion_model")
                elif module not in placed:
                    placed[module] = SimpleNamespace(network_key=key)
        if failed and self.log_failures:
            self.logging.debug(f"Network {on_disk.filename} didn't match keys: {failed}")
        return SimpleNamespace(name=name, modules=placed)


@pytest.fixture
def webui(tmp_path, tiny_model, monkeypatch):
    """The fake WebUI with the tiny model loaded; every module is removed from sys.modules afterwards."""
    w = SimpleNamespace()
    pkg = types.ModuleType("modules")
    pkg.__path__ = []

    def add(name, **attrs):
        mod = types.ModuleType(f"modules.{name}")
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
        setattr(pkg, name, mod)
        setattr(w, name, mod)
        return mod

    monkeypatch.setitem(sys.modules, "modules", pkg)
    add("shared", state=State(), opts=Opts(CLIP_stop_at_last_layers=1, fp8_storage="Disable",
                                           sd_model_checkpoint="tiny.safetensors [0123abcd]"),
        cmd_opts=SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=False, lora_dir=str(tmp_path / "Lora")),
        sd_model=tiny_model, loaded_hypernetworks=["some hypernetwork"])
    add("call_queue", queue_lock=QueueLock())
    progress = add("progress", current_task=None, calls=[])

    def start_task(t):
        progress.calls.append(("start", t))
        progress.current_task = t

    def finish_task(t):
        progress.calls.append(("finish", t))
        progress.current_task = None

    progress.start_task, progress.finish_task = start_task, finish_task
    progress.add_task_to_queue = lambda t: progress.calls.append(("queue", t))
    add("sd_models", model_data=SimpleNamespace(sd_model=tiny_model))
    add("sd_unet", current_unet=None)
    add("devices", device=torch.device("cpu"))
    add("lowvram", module_in_gpu=None, send_everything_to_cpu=lambda: setattr(w.lowvram, "module_in_gpu", None))
    add("paths", data_path=str(tmp_path / "webui"), models_path=str(tmp_path / "webui" / "models"))
    add("sd_samplers", samplers_map={"euler a": "Euler a", "k_euler_a": "Euler a", "euler": "Euler", "ddim": "DDIM", "dpm++ 2m": "DPM++ 2M"})
    w.processing_impl = Processing(w)
    add("processing", StableDiffusionProcessing=w.processing_impl.StableDiffusionProcessing,
        StableDiffusionProcessingTxt2Img=w.processing_impl.StableDiffusionProcessingTxt2Img,
        process_images=w.processing_impl.process_images)

    def image_grid(imgs, batch_size=1, rows=None):
        cols = (len(imgs) + rows - 1) // rows
        g = Image.new("RGB", (cols * imgs[0].width, rows * imgs[0].height))
        for i, im in enumerate(imgs):
            g.paste(im, ((i % cols) * im.width, (i // cols) * im.height))
        return g

    def draw_grid_annotations(im, width, height, hor_texts, ver_texts, margin=0):
        w.annotations = ([t[0].text for t in hor_texts], [t[0].text for t in ver_texts])
        return im

    add("images", image_grid=image_grid, draw_grid_annotations=draw_grid_annotations,
        GridAnnotation=lambda text="", is_active=True: SimpleNamespace(text=text))
    add("scripts", scripts_data=[])
    w.networks = FakeNetworks()
    w.networks.lora_dir = tmp_path / "Lora"
    monkeypatch.setitem(sys.modules, "networks", w.networks)
    network = types.ModuleType("network")
    network.NetworkOnDisk = lambda name, filename: SimpleNamespace(name=name, filename=filename)
    monkeypatch.setitem(sys.modules, "network", network)
    ckpt = tmp_path / "tiny.safetensors"
    ckpt.write_bytes(bytes(range(256)) * 8192)  # stands for the checkpoint file the WebUI loaded
    monkeypatch.setattr(tiny_model, "sd_checkpoint_info", SimpleNamespace(title="tiny.safetensors [0123abcd]", filename=str(ckpt)), raising=False)
    return w


def make_host():
    from lora_train.host.a1111 import A1111Host

    class TestHost(A1111Host):
        """Checks on every event, from the run's own thread."""

        def __init__(self, webui):
            super().__init__()
            self.webui = webui
            self.events = []
            self.lock_owned_at_steps = []
            self.task_at_steps = []
            self.fail_at_step = None
            self.pause_at_step = None
            self.paused = threading.Event()
            self.go_on = threading.Event()
            self.on_step = None

        def on_event(self, e):
            super().on_event(e)
            self.events.append(e)
            if isinstance(e, ev.Step):
                self.lock_owned_at_steps.append(self.webui.call_queue.queue_lock.owner == threading.get_ident())
                self.task_at_steps.append(self.webui.progress.current_task)
                if self.on_step:
                    self.on_step(e)
                if e.step == self.fail_at_step:
                    raise RuntimeError(f"boom at step {e.step}")
                if e.step == self.pause_at_step:
                    self.paused.set()
                    assert self.go_on.wait(60)

    return TestHost


@pytest.fixture
def host(webui):
    return make_host()(webui)


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data", count=4, repeats=1)


def config_for(data: Path, name: str = "weblora", epochs: int = 2, **extra) -> TrainConfig:
    return small_run_config(data, name, epochs, **extra)


def merge_someone_elses_lora(model, networks) -> list[torch.nn.Module]:
    """What the built-in Lora extension leaves after a `<lora:x:1>` generation: deltas merged into
    the weights in place, the originals in `network_weights_backup`."""
    unet_linears = [m for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    te_linears = [m for m in model.cond_stage_model.transformer.modules() if isinstance(m, torch.nn.Linear)]
    layers = unet_linears[:3] + te_linears[:1]
    with torch.no_grad():
        for m in layers:
            m.network_weights_backup = m.weight.detach().to("cpu", copy=True)
            m.network_bias_backup = None if m.bias is None else m.bias.detach().to("cpu", copy=True)
            m.weight.add_(0.25)
            if m.bias is not None:
                m.bias.add_(0.25)
            m.network_current_names = (("someone_else", 1.0, 1.0, 1.0),)
    networks.loaded_networks.append(SimpleNamespace(name="someone_else"))
    return layers


def forget_merge(layers):
    for m in layers:
        for attr in ("network_weights_backup", "network_bias_backup", "network_current_names"):
            m.__dict__.pop(attr, None)


# -- runs --------------------------------------------------------------------------------------------
def test_run_holds_the_lock_trains_on_restored_base_weights_and_ignores_interrupt(webui, host, data, tiny_model):
    base = snapshot(tiny_model)
    layers = merge_someone_elses_lora(tiny_model, webui.networks)
    state = webui.shared.state
    restored_when_training = []

    def on_step(e):
        if e.step == 1:
            restored_when_training.append(all(m.network_current_names == () for m in layers))
            state.interrupt_seen = True
            state.interrupted = True  # the txt2img Interrupt button, pressed while training
    host.on_step = on_step
    try:
        manager = RunManager(host)
        s = manager.submit(RunRequest(config_for(data), trigger="zkz",
                                      preview_prompts=["zkz, a photo --n ugly --w 64 --h 64 --d 5 --s 2 --l 3.5"]))
        assert manager.wait(120)
        run = manager.run(s.id)
        assert run.phase == "finished", run.error
        assert run.step == run.total_steps == 4, "Interrupt did not stop training"

        # (a) the queue lock for the whole run, in the run's thread; released afterwards
        task = "task(lora-train-%s)" % s.id
        assert host.lock_owned_at_steps == [True] * 4
        assert host.task_at_steps == [task] * 4
        assert webui.call_queue.queue_lock.is_free() and webui.call_queue.queue_lock.acquisitions == 1
        assert ("begin", task) in state.calls and state.calls[-1] == ("end", task)
        assert webui.progress.calls[:2] == [("queue", task), ("start", task)] and webui.progress.calls[-1] == ("finish", task)
        assert state.job_count == 0 and "finished" in state.textinfo
        assert state.current_image is not None, "previews reach the live preview"

        # (b) the built-in Lora's merge was undone before training, and the model is untouched after
        assert restored_when_training == [True]
        assert webui.networks.loaded_networks == [] and webui.shared.loaded_hypernetworks == []
        assert_same_as(tiny_model, base)

        # previews through the WebUI's txt2img, with our options, not cut short by the Interrupt
        ps = webui.processing_impl.ps
        assert len(ps) == 2 and len(run.previews) == 2
        p = ps[0]
        assert (p.prompt, p.negative_prompt, p.width, p.height, p.seed, p.steps, p.cfg_scale, p.sampler_name) == \
               ("zkz, a photo", "ugly", 64, 64, 5, 2, 3.5, "Euler a")
        assert p.disable_extra_networks and p.do_not_save_samples and p.do_not_save_grid and p.do_not_reload_embeddings
        assert p.closed and p.lock_held and p.sd_model is tiny_model
        with Image.open(run.previews[0]) as im:
            assert "LoRA Train: weblora" in im.text["parameters"]

        # every publish refreshed the WebUI's list and loaded there
        assert sorted(Path(f).name for f in run.published) == ["weblora-000001.safetensors", "weblora.safetensors"]
        assert sorted(run.checks) == sorted(run.published)
        assert all("every module matched" in m for m in run.checks.values()), run.checks
        assert {name for name, _ in webui.networks.loads} == {"weblora-000001", "weblora"}
        assert Path(run.work_dir).parent == Path(webui.paths.data_path) / "lora_train" / "runs"

        # the metadata names the checkpoint the WebUI loaded, with sd-scripts' hash of that file
        with safe_open(run.published[-1], "pt") as f:
            meta = f.metadata()
        ckpt = Path(tiny_model.sd_checkpoint_info.filename)
        assert meta["ss_sd_model_name"] == ckpt.name
        assert meta["ss_new_sd_model_hash"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    finally:
        forget_merge(layers)


def test_failure_and_stop_release_the_lock_and_keep_the_model(webui, host, data, tiny_model):
    base = snapshot(tiny_model)
    lock = webui.call_queue.queue_lock
    manager = RunManager(host)

    host.fail_at_step = 2
    s = manager.submit(RunRequest(config_for(data, epochs=3), previews=False))
    assert manager.wait(120)
    run = manager.run(s.id)
    assert run.phase == "failed" and "boom at step 2" in run.error
    assert lock.is_free() and webui.shared.state.calls[-1][0] == "end" and webui.progress.current_task is None
    assert_same_as(tiny_model, base)

    host.fail_at_step, host.pause_at_step = None, 1
    s = manager.submit(RunRequest(config_for(data, name="stopped", epochs=3), previews=False))
    assert host.paused.wait(60)
    assert lock.owner is not None and not lock.is_free()
    assert manager.stop()
    host.go_on.set()
    assert manager.wait(120)
    run = manager.run(s.id)
    assert run.phase == "cancelled" and run.step == 1
    assert "stopped-interrupted.safetensors" in [Path(p).name for p in run.published]
    assert lock.is_free() and webui.shared.state.calls[-1][0] == "end" and webui.progress.current_task is None
    assert_same_as(tiny_model, base)


def test_ui_reload_shutdown_stops_the_run_and_leaves_a_valid_save(webui, host, data, tiny_model):
    base = snapshot(tiny_model)
    host.pause_at_step = 2
    manager = RunManager(host)
    s = manager.submit(RunRequest(config_for(data, epochs=4), previews=False))
    queued = manager.submit(RunRequest(config_for(data, name="next", epochs=1), previews=False))
    assert host.paused.wait(60)
    reload = threading.Thread(target=manager.shutdown)  # what on_before_reload / on_script_unloaded call
    reload.start()
    host.go_on.set()
    reload.join(60)
    assert not reload.is_alive()
    run = manager.run(s.id)
    assert run.phase == "cancelled" and run.step == 2
    saved = [p for p in run.published if p.endswith("-interrupted.safetensors")]
    assert saved, run.published
    with safe_open(saved[0], "pt") as f:
        assert len(list(f.keys())) > 0 and f.metadata()["ss_output_name"] == run.name
    assert manager.run(queued.id).phase == "cancelled"
    assert webui.call_queue.queue_lock.is_free()
    assert_same_as(tiny_model, base)

    # the WebUI is usable again: a generation can take the lock, and the (same) manager trains again
    with webui.call_queue.queue_lock:
        pass
    host.pause_at_step = None
    again = manager.submit(RunRequest(config_for(data, name="after", epochs=1), previews=False))
    assert manager.wait(120) and manager.run(again.id).phase == "finished"


# -- refusals ----------------------------------------------------------------------------------------
def fake_model(**flags):
    model = SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn", diffusion_model=SimpleNamespace()),
                            cond_stage_model=object(), sd_checkpoint_info=SimpleNamespace(title="x.safetensors"))
    for k, v in flags.items():
        setattr(model, k, v)
    return model


def test_preflight_refusals_say_what_to_change(webui, host):
    config = TrainConfig()
    assert host.preflight(config) == []
    shared, models = webui.shared, webui.sd_models.model_data

    models.sd_model = None
    (msg,) = host.preflight(config)
    assert "No checkpoint is loaded" in msg

    def refusal(model=None, cmd=None, fp8="Disable", unet=None) -> str:
        models.sd_model = model or fake_model()
        shared.cmd_opts = SimpleNamespace(**{"lowvram": False, "medvram": False, "medvram_sdxl": False, "lora_dir": "L", **(cmd or {})})
        shared.opts.data["fp8_storage"] = fp8
        webui.sd_unet.current_unet = unet
        problems = host.preflight(config)
        assert len(problems) == 1, problems
        return problems[0]

    assert "--lowvram" in refusal(cmd={"lowvram": True}) and "Restart the WebUI without --lowvram" in refusal(cmd={"lowvram": True})
    assert "FP8 weight is 'Enable'" in refusal(fp8="Enable")
    assert "replacement UNet is active (TensorRT" in refusal(unet=SimpleNamespace(option=SimpleNamespace(label="TensorRT")))
    inpaint = fake_model()
    inpaint.model.conditioning_key = "hybrid"
    assert "inpainting" in refusal(model=inpaint)
    models.sd_model = fake_model(is_sdxl=True, conditioner=object())
    assert host.preflight(config) == [], "an SDXL model is trainable"
    assert "has no sgm UNet" in refusal(model=SimpleNamespace(is_sdxl=True, conditioner=object(), model=SimpleNamespace(conditioning_key="crossattn")))
    assert "FP8 weight is 'Enable for SDXL'" in refusal(model=fake_model(is_sdxl=True, conditioner=object()), fp8="Enable for SDXL")
    assert "SD3" in refusal(model=fake_model(is_sd3=True))

    models.sd_model, shared.opts.data["fp8_storage"], webui.sd_unet.current_unet = fake_model(), "Enable for SDXL", None
    shared.cmd_opts = SimpleNamespace(lowvram=False, medvram=False)
    assert host.preflight(config) == [], "FP8 for SDXL only leaves an SD1 model trainable"


def test_medvram_caches_first_then_keeps_the_unet_on_the_gpu(webui, host, data, tiny_model):
    """--medvram: the WebUI's hooks swap UNet, text encoder and VAE onto the GPU one at a time. The
    run must do all VAE and text-encoder work first, then only the UNet runs, so it never moves."""
    webui.shared.cmd_opts.medvram = True
    low = webui.lowvram
    swaps = []

    def send_me_to_gpu(module, *_):  # lowvram.setup_for_low_vram's hook, recording instead of moving
        if low.module_in_gpu is not module:
            swaps.append((low.module_in_gpu, module))
            low.module_in_gpu = module

    unet, te, vae = tiny_model.model, tiny_model.cond_stage_model.transformer, tiny_model.first_stage_model
    handles = [unet.register_forward_pre_hook(send_me_to_gpu), te.register_forward_pre_hook(send_me_to_gpu)]
    real_encode = vae.encode
    vae.encode = lambda x: send_me_to_gpu(vae) or real_encode(x)
    steps_seen = []
    host.on_step = lambda e: steps_seen.append(list(swaps))
    try:
        config = config_for(data, epochs=2, shuffle_caption=False)
        manager = RunManager(host)
        s = manager.submit(RunRequest(config, previews=False))
        assert manager.wait(120)
        run = manager.run(s.id)
    finally:
        for h in handles:
            h.remove()
        del vae.encode
    assert run.phase == "finished", run.error
    notes = " ".join(run.messages)
    assert "training the UNet only" in notes and "latents are cached" in notes and "text-encoder outputs are cached" in notes
    names = {Path(p).name for p in run.published}
    assert names == {"weblora-000001.safetensors", "weblora.safetensors"}
    from lora_train.network.files import load_lora
    assert all(k.startswith("lora_unet_") for k in load_lora(run.published[-1])[0])
    # pinned first, then VAE and text encoder once each while caching, then the UNet for good
    assert [(a is unet, b is vae) for a, b in swaps[:1]] == [(True, True)], "the UNet was pinned before caching"
    assert len(swaps) == 3 and swaps[1][1] is te and swaps[2][1] is unet
    assert len(steps_seen) == 4 and all(len(seen) == 3 for seen in steps_seen), "something moved the UNet off the GPU between steps"
    assert low.module_in_gpu is unet


def load_tiny_sdxl(webui):
    """The tiny SDXL as the WebUI's loaded checkpoint."""
    from lora_train.model.tiny_sdxl import build_tiny_sdxl

    with quiet():
        model = build_tiny_sdxl(0, sgm=False)
    model.is_sdxl = True
    model.sd_checkpoint_info = SimpleNamespace(title="tinyxl.safetensors", filename="/models/tinyxl.safetensors")
    webui.sd_models.model_data.sd_model = model
    return model


def test_session_on_an_sdxl_model_gives_the_sgm_adapter(webui, host):
    from lora_train.model.sgm import SgmAdapter

    model = load_tiny_sdxl(webui)
    assert host.model_family() == "sdxl" and host.model_resolution() == 1024
    with host.session(TrainConfig(), "run-xl") as adapter:
        assert isinstance(adapter, SgmAdapter) and adapter.model is model
        assert adapter.info.name == "tinyxl.safetensors" and adapter.info.base_model_version == "sdxl_base_v1-0"
    assert webui.call_queue.queue_lock.is_free()


def test_session_rechecks_under_the_lock_and_always_releases_it(webui, host):
    webui.shared.cmd_opts.lowvram = True  # e.g. the model changed while the run waited for the lock
    with pytest.raises(UserError, match="--lowvram"):
        with host.session(TrainConfig(), "run-9"):
            pass
    assert webui.call_queue.queue_lock.is_free()
    assert webui.shared.state.calls == [("begin", "task(lora-train-run-9)"), ("end", "task(lora-train-run-9)")]
    assert webui.progress.current_task is None

    webui.shared.cmd_opts.lowvram = False
    with pytest.raises(KeyError):
        with host.session(TrainConfig(), "run-10") as adapter:
            assert adapter.model is webui.sd_models.model_data.sd_model
            assert webui.call_queue.queue_lock.owner == threading.get_ident()
            raise KeyError("anything")
    assert webui.call_queue.queue_lock.is_free()


# -- previews, self-test, grid, XYZ ------------------------------------------------------------------
def test_previews_keep_rng_progress_and_checkpoint_setting(webui, host, tmp_path, tiny_adapter):
    opts, state = webui.shared.opts, webui.shared.state
    opts.data["sd_model_checkpoint"] = "other.safetensors"  # chosen in the UI while training: must not load mid-run
    state.job_count, state.job_no, state.textinfo = 10, 3, "LoRA Train: step 3/10"
    config = config_for(tmp_path)
    sample = host.sample_fn(config, tiny_adapter, ["zkz", "zkz two --ss ddim --s 7"], tmp_path / "samples")
    rng = torch.get_rng_state()
    paths = sample(2, 20)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [Path(p).name for p in paths] == ["weblora_e000002_s000020_00.png", "weblora_e000002_s000020_01.png"]
    ps = webui.processing_impl.ps
    assert [p.checkpoint_setting for p in ps] == ["tiny.safetensors [0123abcd]"] * 2
    assert opts.data["sd_model_checkpoint"] == "other.safetensors"
    assert (ps[0].width, ps[0].height, ps[0].steps, ps[0].seed, ps[0].sampler_name) == (64, 64, 20, 3, "Euler a")
    assert (ps[1].steps, ps[1].sampler_name) == (7, "DDIM")
    assert (state.job_count, state.job_no, state.textinfo) == (10, 3, "LoRA Train: step 3/10")


def test_previews_neither_reuse_nor_leave_the_webuis_cached_conditioning(webui, host, tmp_path, tiny_adapter):
    """The WebUI caches the negative prompt's conditioning without knowing our LoRA is on the text
    encoder: a preview must compute its own, and the cache must hold the clean one afterwards."""
    from lora_train.network.network import LoRANetwork

    proc = webui.processing_impl
    clean = proc.StableDiffusionProcessingTxt2Img(sd_model=tiny_adapter.model, prompt="x", negative_prompt="", steps=20,
                                                 width=64, height=64, seed=1)
    proc.process_images(clean)  # a txt2img before training fills the cache
    cache_before = proc.StableDiffusionProcessing.cached_uc
    clean_uc = cache_before[1].clone()

    net = LoRANetwork([t for t in tiny_adapter.lora_targets() if t.name.startswith("lora_te_")], 4, 4.0, seed=1)
    for name, param in net.named_parameters():
        if "lora_up" in name:
            torch.nn.init.normal_(param, std=0.5)  # a trained text-encoder LoRA
    sample = host.sample_fn(config_for(tmp_path), tiny_adapter, ["zkz"], tmp_path / "samples")
    with net.applied({t.name: t.module for t in tiny_adapter.lora_targets()}):
        sample(1, 10)
        preview = proc.ps[-1]
        assert not torch.allclose(preview.uc, clean_uc), "the preview reused the clean cached conditioning"

    after = proc.StableDiffusionProcessingTxt2Img(sd_model=tiny_adapter.model, prompt="x", negative_prompt="", steps=20,
                                                 width=64, height=64, seed=1)
    proc.process_images(after)
    assert proc.StableDiffusionProcessing.cached_uc is cache_before
    assert torch.equal(after.uc, clean_uc), "txt2img after training used conditioning made with the LoRA"


def test_self_test_reports_unmatched_keys_and_never_raises(webui, host, tmp_path, monkeypatch):
    lora_dir = host.lora_dir()
    lora_dir.mkdir(parents=True)
    path = lora_dir / "probe.safetensors"
    good = "lora_unet_down_blocks_0_attentions_0_proj_in"  # mapped by the real WebUI on the tiny model
    gone = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_query"  # not mapped there
    assert good in webui_names("tiny") and gone in webui_unmapped("tiny")
    save_file({f"{good}.lora_down.weight": torch.zeros(2, 2), f"{good}.lora_up.weight": torch.zeros(2, 2),
               f"{good}.alpha": torch.tensor(1.0)}, str(path))
    nets = webui.networks

    (msg,) = host.after_publish(path)
    assert "every module matched" in msg and nets.refreshes == 1 and nets.loads == [("probe", str(path))]
    assert webui.call_queue.queue_lock.acquisitions == 1 and webui.call_queue.queue_lock.is_free()

    save_file({f"{m}.{part}": torch.zeros(2, 2) for m in (good, gone) for part in ("lora_down.weight", "lora_up.weight")}, str(path))
    (msg,) = host.after_publish(path)
    assert msg.startswith("self-test FAILED") and "1 module(s)" in msg and gone in msg
    assert nets.logging is logging, "the loader's logging is put back"
    nets.log_failures = False  # a WebUI whose log line differs: the placed modules still tell
    (msg,) = host.after_publish(path)
    assert msg.startswith("self-test FAILED") and gone in msg

    from lora_train.host.a1111 import xyz

    assert xyz.xyz_lora_name() == "probe", "the XYZ axes follow the last published LoRA"

    nets.load_error = AssertionError("Could not find a module type")
    (msg,) = host.after_publish(path)
    assert "self-test FAILED: the Lora loader of the WebUI fails on probe.safetensors" in msg and "Could not find a module type" in msg

    monkeypatch.setitem(sys.modules, "networks", None)  # built-in Lora extension disabled
    (msg,) = host.after_publish(path)
    assert "skipped" in msg


def test_a_published_name_the_real_webui_does_not_map_fails_the_self_test(webui, host, data, monkeypatch):
    """One module misnamed in training (`..._to_query`, which the real WebUI left unmapped on this
    model) makes the run's self-test fail naming it; the same file with the right name all matches."""
    from lora_train.model.ldm import LdmAdapter
    from lora_train.network.files import load_lora, save_lora

    slip = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_query"
    right = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert slip in webui_unmapped("tiny") and right in webui_names("tiny")
    real_targets = LdmAdapter.lora_targets

    def misnamed(self, conv=False):
        return [dataclasses.replace(t, name=slip) if t.name == right else t for t in real_targets(self, conv)]

    monkeypatch.setattr(LdmAdapter, "lora_targets", misnamed)
    manager = RunManager(host)
    s = manager.submit(RunRequest(config_for(data, name="slip", epochs=1), previews=False))
    assert manager.wait(120)
    run = manager.run(s.id)
    assert run.phase == "finished", run.error
    (published,) = run.published
    check = run.checks[published]
    assert check.startswith("self-test FAILED") and "1 module(s)" in check and slip in check, check

    tensors, metadata = load_lora(published)
    assert any(k.startswith(slip + ".") for k in tensors)
    fixed = host.lora_dir() / "slip-fixed.safetensors"
    save_lora(fixed, {k.replace(slip + ".", right + "."): v for k, v in tensors.items()}, metadata)
    (msg,) = host.after_publish(fixed)
    assert "every module matched" in msg, msg


def test_sdxl_self_test_matches_every_module_we_train_and_names_an_sd1_text_encoder_key(webui, host):
    from lora_train.model.sgm import SgmAdapter
    from lora_train.network.files import save_lora
    from lora_train.network.network import LoRANetwork

    model = load_tiny_sdxl(webui)
    net = LoRANetwork(SgmAdapter(model).lora_targets(conv=True), 4, 1.0, conv_dim=4, conv_alpha=1.0)
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    host.lora_dir().mkdir(parents=True)
    path = host.lora_dir() / "xl.safetensors"
    save_lora(path, tensors, {})
    (msg,) = host.after_publish(path)
    assert "every module matched" in msg, msg

    right = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    slip = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # SD1's prefix: the real WebUI left it unmapped on SDXL
    assert slip in webui_unmapped("sdxl")
    save_lora(path, {k.replace(right + ".", slip + "."): v for k, v in tensors.items()}, {})
    (msg,) = host.after_publish(path)
    assert msg.startswith("self-test FAILED") and "1 module(s)" in msg and slip in msg, msg


def test_grid_uses_txt2img_with_lora_tags_and_waits_for_no_run(webui, host, tmp_path):
    files = [tmp_path / "a-000001.safetensors", tmp_path / "a.safetensors"]
    out = host.xyz_grid(files, [0.0, 1.0], "zkz", 7, tmp_path / "grid" / "g.png")
    prompts = [p.prompt for p in webui.processing_impl.ps]
    assert prompts == ["zkz <lora:a-000001:0>", "zkz <lora:a-000001:1>", "zkz <lora:a:0>", "zkz <lora:a:1>"]
    assert all(p.seed == 7 and not p.disable_extra_networks and p.lock_held for p in webui.processing_impl.ps)
    assert Image.open(out).size == (128, 128)
    assert webui.annotations == (["weight 0", "weight 1"], ["a-000001", "a"])
    assert webui.call_queue.queue_lock.is_free()

    host.owner_thread = 12345  # a run holds the model
    with pytest.raises(UserError, match="training run"):
        host.xyz_grid(files, [1.0], "zkz", 7, tmp_path / "g2.png")


def fake_xyz_script(webui):
    """The X/Y/Z plot script's module (scripts/xyz_grid.py) as `install_xyz_axes` finds it."""
    xyz = types.ModuleType("xyz_grid.py")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices
            self.format_value = format_value

    xyz.AxisOption, xyz.axis_options = AxisOption, [AxisOption("Seed", int, None)]
    xyz.format_value_add_label = xyz.format_value = lambda p, opt, x: x
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    webui.scripts.scripts_data.append(SimpleNamespace(script_class=script_class, module=xyz))
    return xyz


def test_xyz_axes_register_once_and_edit_the_lora_tag(webui, tmp_path, monkeypatch):
    from lora_train.host.a1111 import xyz as axes

    xyz = fake_xyz_script(webui)
    assert axes.install_xyz_axes() is True
    assert axes.install_xyz_axes() is False  # UI reload: not twice
    labels = [o.label for o in xyz.axis_options]
    assert labels == ["Seed", "[LoRA Train] LoRA weight", "[LoRA Train] LoRA checkpoint", "[LoRA Train] block weights"]
    weight, checkpoint = xyz.axis_options[1], xyz.axis_options[2]

    lora_dir = Path(webui.shared.cmd_opts.lora_dir)
    lora_dir.mkdir(parents=True)
    for stem in ("mine-000001", "mine", "Other"):
        (lora_dir / f"{stem}.safetensors").write_bytes(b"x")
    assert checkpoint.choices() == ["mine", "mine-000001", "Other"]
    checkpoint.confirm(None, ["mine"])
    with pytest.raises(RuntimeError, match="nope"):
        checkpoint.confirm(None, ["nope"])

    webui.shared.opts.data["lora_train_xyz_lora"] = "mine"
    p = SimpleNamespace(prompt="a cat, <lora:Other:0.5>")
    weight.apply(p, 0.8, [0.8])
    assert p.prompt == "a cat, <lora:Other:0.5> <lora:mine:0.8>", "appended: the prompt had another LoRA only"
    p = SimpleNamespace(prompt="a cat <lora:mine-000001:1:0.5>")
    weight.apply(p, 0.25, [0.25])
    assert p.prompt == "a cat <lora:mine-000001:0.25:0.5>", "an epoch file of the chosen LoRA is ours"

    # both axes on one cell, in either order, edit the same tag
    p = SimpleNamespace(prompt="a cat")
    checkpoint.apply(p, "mine-000001", ["mine-000001", "mine"])
    weight.apply(p, 0.5, [0.5])
    assert p.prompt == "a cat <lora:mine-000001:0.5>"
    p = SimpleNamespace(prompt="a cat")
    weight.apply(p, 0.5, [0.5])
    checkpoint.apply(p, "mine-000001", ["mine-000001", "mine"])
    assert p.prompt == "a cat <lora:mine-000001:0.5>"

    webui.shared.opts.data["lora_train_xyz_lora"] = ""
    monkeypatch.setattr(axes, "_last_published", None)
    p = SimpleNamespace(prompt="a dog <lora:Other:1>")
    weight.apply(p, 0.3, [0.3])
    assert p.prompt == "a dog <lora:Other:0.3>", "no LoRA chosen: the prompt's only tag"
    with pytest.raises(RuntimeError, match="no <lora:...>"):
        weight.apply(SimpleNamespace(prompt="a dog"), 0.3, [0.3])


# kohya names -> lora-block-weight block, by hand (down_blocks_i attentions_j is input_blocks_(3i+j+1),
# up_blocks_i attentions_j is output_blocks_(3i+j)); OUTS is 1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1 over
# BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11: BASE and OUT07-OUT11 on, the rest off
LBW_BLOCKS = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("BASE", 1.0),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ("IN01", 0.0),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v": ("M00", 0.0),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2": ("OUT05", 0.0),
    "lora_unet_up_blocks_3_attentions_0_proj_in": ("OUT09", 1.0),
}


def write_sd1_lora(path: Path, seed: int, extra: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in LBW_BLOCKS:
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, 8, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(8, 2, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({**tensors, **(extra or {})}, str(path), {"ss_base_model_version": "sd_v1", "ss_output_name": path.stem})
    return path


def lora_deltas(path) -> dict[str, torch.Tensor]:
    """up @ down * alpha / rank of every module, by hand."""
    with safe_open(str(path), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    return {n: t[f"{n}.lora_up.weight"] @ t[f"{n}.lora_down.weight"] * float(t[f"{n}.alpha"]) / 2 for n in LBW_BLOCKS}


def test_xyz_block_weights_axis_bakes_registers_and_reuses_a_copy(webui, tmp_path, monkeypatch):
    import csv
    import io

    from lora_train.host.a1111 import xyz as axes

    xyz = fake_xyz_script(webui)
    assert axes.install_xyz_axes() is True
    blocks = xyz.axis_options[3]
    assert blocks.label == "[LoRA Train] block weights"
    assert {"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"} <= set(blocks.choices())
    lora_dir = Path(webui.shared.cmd_opts.lora_dir)
    src = write_sd1_lora(lora_dir / "mine.safetensors", seed=1)
    write_sd1_lora(lora_dir / "mine-000001.safetensors", seed=2)
    webui.networks.list_available_networks()
    webui.shared.opts.data["lora_train_xyz_lora"] = "mine"

    # what the lead types in the X/Y/Z values box: the WebUI splits it with csv (csv_string_to_list_strip)
    typed = 'OUTS, "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1", ALL0.5'
    xs = [v.strip() for row in csv.reader(io.StringIO(typed), skipinitialspace=True) for v in row]
    assert xs == ["OUTS", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1", "ALL0.5"]
    assert [blocks.format_value(None, blocks, x) for x in xs] == xs, "the grid labels: the preset name or the value list"
    blocks.confirm(SimpleNamespace(prompt="a cat <lora:mine:0.8>"), xs)

    p = SimpleNamespace(prompt="a cat, <lora:Other:0.5> <lora:mine:0.8>")
    blocks.apply(p, "OUTS", xs)
    m = re.search(r"<lora:(mine_lbw_[0-9a-f]{8}):0\.8>", p.prompt)
    assert m and p.prompt.startswith("a cat, <lora:Other:0.5> "), p.prompt
    alias = m.group(1)
    entry = webui.networks.available_network_aliases[alias]
    baked = Path(entry.filename)
    cache = tmp_path / "webui" / "lora_train" / "lbw-cache"
    assert baked.parent == cache and baked.is_file(), "outside models/Lora"
    assert alias not in webui.networks.available_networks, "not among the Lora cards"
    want, got = lora_deltas(src), lora_deltas(baked)
    for name, (block, value) in LBW_BLOCKS.items():
        assert torch.allclose(got[name], value * want[name], atol=1e-6), (name, block)
    assert got["lora_unet_up_blocks_3_attentions_0_proj_in"].abs().max() > 0

    # reused: the same copy for the preset and its value list, not written again
    stamp = baked.stat().st_mtime_ns
    q = SimpleNamespace(prompt="a dog <lora:mine:1>")
    blocks.apply(q, xs[1], xs)
    assert q.prompt == f"a dog <lora:{alias}:1>" and baked.stat().st_mtime_ns == stamp
    assert len(list(cache.glob("*.safetensors"))) == 2, "OUTS (= its list) and ALL0.5, baked in confirm"

    # the built-in extension rescans (a missing name in the prompt clears its dicts): still there
    assert webui.networks.load_networks(["typo", alias]) == [None, entry]
    webui.networks.list_available_networks()
    assert webui.networks.available_network_aliases[alias] is entry

    # with the weight and checkpoint axes, in any order, one tag: the chosen file's copy at the weight
    r = SimpleNamespace(prompt="a cat")
    blocks.apply(r, "OUTS", xs)
    xyz.axis_options[2].apply(r, "mine-000001", ["mine", "mine-000001"])
    xyz.axis_options[1].apply(r, 0.5, [0.5])
    m = re.fullmatch(r"a cat <lora:(mine-000001_lbw_[0-9a-f]{8}):0\.5>", r.prompt)
    assert m, r.prompt
    epoch = Path(webui.networks.available_network_aliases[m.group(1)].filename)
    assert torch.allclose(lora_deltas(epoch)["lora_unet_up_blocks_3_attentions_0_proj_in"],
                          lora_deltas(lora_dir / "mine-000001.safetensors")["lora_unet_up_blocks_3_attentions_0_proj_in"])


def test_xyz_block_weights_that_do_not_fit_the_file_fail_in_confirm(webui, tmp_path, monkeypatch):
    from lora_train.host.a1111 import xyz as axes

    monkeypatch.setattr(axes, "_last_published", None)  # no LoRA chosen: the axis takes the prompt's tag
    xyz = fake_xyz_script(webui)
    axes.install_xyz_axes()
    blocks = xyz.axis_options[3]
    lora_dir = Path(webui.shared.cmd_opts.lora_dir)
    src = write_sd1_lora(lora_dir / "mine.safetensors", seed=1)
    p = SimpleNamespace(prompt="a cat <lora:mine:1>")
    with pytest.raises(RuntimeError, match=r"block weights.*mine\.safetensors.*has 12 values; SD1/SD2 block weights take 17 or 26") as e:
        blocks.confirm(p, ["OUTS", ",".join(["1"] * 12)])  # SDXL's 12-value layout on an SD1 file
    assert "\n" not in str(e.value)
    blocks.confirm(p, [",".join(["0.5"] * 26)])  # lora-block-weight's 26 values fit a plain LoRA too
    with pytest.raises(RuntimeError, match="neither a preset"):
        blocks.confirm(p, ["OUTZ"])
    with pytest.raises(RuntimeError, match="neither a preset"):
        blocks.confirm(SimpleNamespace(prompt="a cat"), ["OUTZ"])  # no LoRA to tell yet: checked against both families
    name = next(iter(LBW_BLOCKS))
    write_sd1_lora(lora_dir / "dora.safetensors", seed=3, extra={f"{name}.dora_scale": torch.ones(1, 8)})
    with pytest.raises(RuntimeError, match=r"dora\.safetensors.*DoRA changes the weight non-linearly"):
        blocks.confirm(SimpleNamespace(prompt="a cat <lora:dora:1>"), ["NONE"])
    blocks.confirm(SimpleNamespace(prompt="a cat <lora:dora:1>"), ["OUTD"])  # BASE (the DoRA module) stays 1
    with pytest.raises(RuntimeError, match="no LoRA named nope"):
        blocks.confirm(SimpleNamespace(prompt="a cat <lora:nope:1>"), ["ALL"])
    assert src.is_file() and sorted(p.name for p in lora_dir.iterdir()) == ["dora.safetensors", "mine.safetensors"], "nothing added to models/Lora"
    monkeypatch.setitem(sys.modules, "network", None)  # built-in Lora extension disabled
    with pytest.raises(RuntimeError, match="Lora extension is disabled"):
        blocks.confirm(p, ["INS"])


def test_parses_the_webui_didnt_match_log_line():
    from lora_train.host.a1111.selftest import parse_didnt_match

    # logged by the real v1.10.1 loader for a file with one bogus module
    line = ("Network /work/a1111/webui/models/Lora/bogus.safetensors didn't match keys: "
            "{'lora_unet_no_such_block.alpha': 'diffusion_model_no_such_block', "
            "'lora_unet_no_such_block.lora_down.weight': 'diffusion_model_no_such_block', "
            "'lora_unet_no_such_block.lora_up.weight': 'diffusion_model_no_such_block'}")
    assert parse_didnt_match(line) == {"lora_unet_no_such_block"}
    assert parse_didnt_match("Network x loaded") == set()


def test_the_tab_follows_the_checkpoint_the_webui_loads(webui, host, tiny_model):
    """The WebUI builds the tab before its checkpoint has loaded, and users switch checkpoints: the
    model-loaded callback moves the host's model version, and the tab's refresh fits the form to it."""
    from lora_train.host import a1111
    from lora_train.model.tiny_sdxl import build_tiny_sdxl
    from lora_train.ui import form
    from lora_train.ui.i18n import Translator
    from lora_train.ui.tab import follow_model, initial_config

    flds = form.fields()
    t = Translator("zh_CN")
    loaded = webui.sd_models.model_data.sd_model
    webui.sd_models.model_data.sd_model = None  # start-up: the tab is built first
    seen = host.model_version()
    values = form.values_from_config(flds, initial_config(host))
    assert host.model_label().endswith("(not loaded yet)") and dict(zip([f.key for f in flds], values))["resolution"] == "512"

    # the checkpoint finishes loading: the 64 px base
    webui.sd_models.model_data.sd_model = loaded
    a1111.on_model_loaded(loaded)
    version, base, new_values, message = follow_model(host, flds, seen, "concept", "SD1.5", values, t)
    assert version == seen + 1 and base == "SD1.5"
    assert dict(zip([f.key for f in flds], new_values))["resolution"] == "64"
    assert "WebUI 已加载 tiny.safetensors [0123abcd]" in message and "分辨率设为 64" in message
    assert follow_model(host, flds, version, "concept", "SD1.5", new_values, t) == (version, None, None, None), "once"

    # the user switches to an SDXL checkpoint: the SDXL preset and its size
    with quiet():
        xl = build_tiny_sdxl(0, sgm=False)
    xl.is_sdxl = True
    xl.sd_checkpoint_info = SimpleNamespace(title="tinyxl.safetensors", filename="/models/tinyxl.safetensors")
    webui.sd_models.model_data.sd_model = xl
    a1111.on_model_loaded(xl)
    v2, base, xl_values, message = follow_model(host, flds, version, "concept", "SD1.5", new_values, t)
    fields = dict(zip([f.key for f in flds], xl_values))
    assert v2 == version + 1 and base == "SDXL"
    assert fields["resolution"] == "1024" and fields["network_train_unet_only"] is True and fields["cache_text_encoder_outputs"] is True
    assert "已套用预设 概念 / SDXL" in message and "分辨率设为 1024" in message and "tinyxl.safetensors" in message

    # a page (re)loaded with the model already there: the WebUI restores the fields it stored before
    # any model had loaded (ui-config.json), and the first refresh fits them without a load event
    stale = form.values_from_config(flds, initial_config(host))
    stale[[f.key for f in flds].index("resolution")] = "512"
    first, base, fitted, message = follow_model(host, flds, -1, "concept", "SD1.5", stale, t)
    assert first == v2 and base == "SDXL" and dict(zip([f.key for f in flds], fitted))["resolution"] == "1024", message

    # a run started while no checkpoint is loaded is refused with the reason
    webui.sd_models.model_data.sd_model = None
    (reason,) = host.preflight(TrainConfig())
    assert "No checkpoint is loaded" in reason


# -- the WebUI's cross-attention optimisations ---------------------------------------------------------
def _sliced_attention(calls, grad_through=True):
    """A stand-in for the WebUI's replaced `CrossAttention.forward` (Settings > Optimizations), built
    the way its split / sub-quadratic kernels are: the projections called as modules, attention
    computed in query slices written in place into a preallocated buffer, the softmax under
    activation checkpointing. `grad_through=False` breaks the gradient path (a negative control)."""
    from torch.utils.checkpoint import checkpoint

    def forward(self, x, context=None, mask=None, **kwargs):
        calls.append(1)
        h = self.heads
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, inner = q.shape
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2).reshape(b * h, t.shape[1], -1) for t in (q, k, v))
        if not grad_through:
            q, k, v = q.detach(), k.detach(), v.detach()
        out = torch.zeros(b * h, n, v.shape[-1], dtype=q.dtype, device=q.device)
        for i in range(0, n, 5):  # uneven last slice on purpose
            s = torch.einsum("bid,bjd->bij", q[:, i:i + 5], k)
            s *= self.scale
            out[:, i:i + 5] = checkpoint(lambda s_, v_: s_.softmax(dim=-1) @ v_, s, v, use_reentrant=False)
        return self.to_out(out.reshape(b, h, n, -1).transpose(1, 2).reshape(b, n, inner))
    return forward


def _train_under(forward, data, name, monkeypatch, webui, host):
    import ldm.modules.attention as attention

    if forward is not None:
        monkeypatch.setattr(attention.CrossAttention, "forward", forward)
    installed = attention.CrossAttention.forward
    host.events = []
    # outside the WebUI a run swaps SDPA in per module (model/attention.py); here the WebUI's own stays,
    # its stock ldm forward included (the one a swap would take)
    swapped = []
    model = webui.shared.sd_model
    host.on_step = lambda e: swapped.append(sum("forward" in m.__dict__ for m in model.modules()))
    manager = RunManager(host)
    # SGD: the trained weights are a fixed linear mix of the gradients, so they compare gradients
    s = manager.submit(RunRequest(config_for(data, name, epochs=1, optimizer_type="SGDNesterov", learning_rate=0.5,
                                             save_every_n_epochs=None), trigger="zkz"))
    assert manager.wait(120)
    run = manager.run(s.id)
    assert run.phase == "finished", run.error
    assert attention.CrossAttention.forward is installed, "the run must leave the WebUI's chosen forward in place"
    assert swapped and not any(swapped), "a run in the WebUI must not swap its attention"
    host.on_step = None
    losses = [e.loss for e in host.events if isinstance(e, ev.Step)]
    from safetensors.torch import load_file

    return losses, load_file(run.published[-1])


def _up_difference(a: dict, b: dict) -> float:
    """Relative L2 difference of the lora_up tensors (they start at zero: all of them is training)."""
    ups = [k for k in a if "lora_up" in k and k.startswith("lora_unet")]
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in ups)
    return (num / sum(float((b[k].double() ** 2).sum()) for k in ups)) ** 0.5


def test_training_under_the_webuis_replaced_attention_forward_matches_the_stock_one(webui, host, data, tiny_model, monkeypatch):
    """The WebUI swaps `CrossAttention.forward` for its chosen optimisation. Our LoRA hooks the
    projections, so a run under a sliced, in-place, checkpointed forward must train as under ldm's
    own forward (float tolerance), and a forward that cuts the gradient path must show."""
    base = snapshot(tiny_model)
    stock_losses, stock = _train_under(None, data, "stock", monkeypatch, webui, host)
    calls = []
    sliced_losses, sliced = _train_under(_sliced_attention(calls), data, "sliced", monkeypatch, webui, host)
    assert calls, "the replaced forward was not used"
    assert len(sliced_losses) == len(stock_losses) == 2
    assert sliced_losses == pytest.approx(stock_losses, rel=1e-5, abs=1e-7)
    assert _up_difference(sliced, stock) < 1e-4
    assert_same_as(tiny_model, base)

    # the comparison can fail: no gradient through attention changes what trains
    _, cut = _train_under(_sliced_attention([], grad_through=False), data, "cut", monkeypatch, webui, host)
    assert _up_difference(cut, stock) > 1e-2
