"""The training engine's promises: exact resume, nothing lost on any exit, NaN stops cleanly,
every optimizer / scheduler / network option runs on the real model."""

import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import assert_same_as, make_dataset, snapshot
from lora_train.app import job
from lora_train.errors import UserError
from lora_train.network.files import load_lora
from lora_train.train import events as ev
from lora_train.train.config import TrainConfig
from lora_train.train.loop import TrainingDiverged
from lora_train.train.state import load_state


def cfg(tmp_path, data=None, **values):
    data = data or make_dataset(tmp_path / "data", count=3, repeats=2)
    base = {"train_data_dir": str(data), "output_dir": str(tmp_path / "out"), "output_name": "run", "resolution": "64",
            "network_dim": 4, "network_alpha": 4, "learning_rate": 1e-3, "train_batch_size": 2, "seed": 11}
    base.update(values)
    return TrainConfig().update(base)


def tensors(path):
    return load_lora(path)[0]


def assert_same_lora(a, b, tol=1e-6):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    assert worst <= tol, worst


def no_temp_files(folder):
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]


def test_resume_gives_the_same_lora(tiny_adapter, tmp_path):
    data = make_dataset(tmp_path / "data", count=3, repeats=2)
    extra = {"shuffle_caption": True, "flip_aug": True, "network_dropout": 0.1, "noise_offset": 0.05}
    full = job.build_trainer(cfg(tmp_path / "a", data, max_train_epochs=2, **extra), tiny_adapter).run()
    first = job.build_trainer(cfg(tmp_path / "b", data, max_train_epochs=1, save_state=True, **extra), tiny_adapter).run()
    state = first.with_name("run-state")
    assert load_state(state)["step"] == 3  # 3 images x 2 repeats / batch 2
    after_one = tensors(first)
    resumed = job.build_trainer(cfg(tmp_path / "b", data, max_train_epochs=2, resume=str(state), output_name="resumed", **extra),
                                tiny_adapter).run()
    assert_same_lora(full, resumed)
    key = "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"
    assert not torch.equal(after_one[key], tensors(resumed)[key])  # the second epoch really trained


def test_resume_mid_epoch_after_cancel(tiny_adapter, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", count=4, repeats=2)
    full = job.build_trainer(cfg(tmp_path / "a", data, max_train_epochs=2, gradient_accumulation_steps=2), tiny_adapter).run()
    cancel = threading.Event()
    path = job.build_trainer(cfg(tmp_path / "b", data, max_train_epochs=2, gradient_accumulation_steps=2), tiny_adapter).run(
        lambda e: cancel.set() if isinstance(e, ev.Step) and e.step == 1 else None, cancel)
    assert path.name == "run-interrupted.safetensors"
    assert not no_temp_files(path.parent)
    state = path.with_name("run-interrupted-state")
    assert sorted(p.name for p in state.iterdir()) == ["state-tree.json", "state.json", "state.safetensors"], "no pickle"

    def refused(*args, **kwargs):  # the WebUI's safe unpickler refuses newer torch's zip layout
        raise RuntimeError("The file may be malicious, so the program is not going to read it.")

    monkeypatch.setattr(torch, "load", refused)
    resumed = job.build_trainer(cfg(tmp_path / "b", data, max_train_epochs=2, gradient_accumulation_steps=2, resume=str(state),
                                    output_name="resumed"), tiny_adapter).run()
    assert_same_lora(full, resumed)


def test_exception_keeps_interrupted_lora_and_state(tiny_adapter, tiny_model, tmp_path, monkeypatch):
    before = snapshot(tiny_model)
    trainer = job.build_trainer(cfg(tmp_path, max_train_steps=6), tiny_adapter)
    real, calls = tiny_adapter.predict, {"n": 0}

    def failing(*a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected")
        return real(*a)

    monkeypatch.setattr(tiny_adapter, "predict", failing)
    with pytest.raises(RuntimeError, match="injected"):
        trainer.run()
    assert_same_as(tiny_model, before)
    out = tmp_path / "out"
    assert load_lora(out / "run-interrupted.safetensors")[1]["ss_steps"] == "3"
    assert load_state(out / "run-interrupted-state")["step"] == 3
    assert not no_temp_files(out)
    monkeypatch.setattr(tiny_adapter, "predict", real)
    done = job.build_trainer(cfg(tmp_path, max_train_steps=6, resume=str(out / "run-interrupted-state")), tiny_adapter).run()
    assert load_lora(done)[1]["ss_steps"] == "6"


def test_nan_stops_and_keeps_the_last_good_save(tiny_adapter, tmp_path, monkeypatch):
    trainer = job.build_trainer(cfg(tmp_path, max_train_steps=8, save_every_n_steps=2), tiny_adapter)
    real, calls = tiny_adapter.predict, {"n": 0}

    def poisoned(*a):
        calls["n"] += 1
        out = real(*a)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(tiny_adapter, "predict", poisoned)
    good = None
    with pytest.raises(TrainingDiverged) as e:
        trainer.run(lambda ev_: None)
    out = tmp_path / "out"
    good = out / "run-step00000004.safetensors"
    msg = str(e.value)
    assert "nan at step 5" in msg and str(good) in msg and "learning rate" in msg
    t, md = load_lora(good)
    assert md["ss_steps"] == "4" and all(torch.isfinite(v).all() for v in t.values())
    assert not (out / "run-interrupted.safetensors").exists()  # NaN weights are not saved
    assert not no_temp_files(out)


def test_cli_sigint_saves_interrupted_and_state(tmp_path):
    data = make_dataset(tmp_path / "data", count=4, repeats=4)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "lora_train", "train", "--set", "pretrained_model_name_or_path=builtin:tiny", "--set", f"train_data_dir={data}", "--set", f"output_dir={out}",
                             "--set", "resolution=64", "--set", "max_train_steps=100000", "--set", "output_name=sig", "--set", "seed=1"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "sig-loss.csv").exists() and len((out / "sig-loss.csv").read_text().splitlines()) > 3):
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "cancelled at step" in err and "Traceback" not in err
    md = load_lora(out / "sig-interrupted.safetensors")[1]
    steps = int(md["ss_steps"])
    assert steps >= 3
    assert load_state(out / "sig-interrupted-state")["step"] == steps
    assert not no_temp_files(out)
    r = subprocess.run([sys.executable, "-m", "lora_train", "train", "--set", "pretrained_model_name_or_path=builtin:tiny", "--set", f"train_data_dir={data}", "--set", f"output_dir={out}",
                        "--set", "resolution=64", "--set", f"max_train_steps={steps + 2}", "--set", "output_name=sig", "--set", "seed=1",
                        "--set", f"resume={out / 'sig-interrupted-state'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_lora(out / "sig.safetensors")[1]["ss_steps"] == str(steps + 2)


@pytest.mark.parametrize("name,args", [
    ("AdamW", []), ("Lion", []), ("SGDNesterov", ["momentum=0.9"]), ("Adafactor", ["relative_step=False", "scale_parameter=False"]),
    ("Adafactor", []),  # sd-scripts' default: relative_step, with its own schedule
    ("Prodigy", []), ("DAdaptAdam", []), ("AdamWScheduleFree", []), ("RAdam", []),
])
def test_optimizers_train_on_the_tiny_model(tiny_adapter, tmp_path, name, args):
    lr = 1.0 if name in ("Prodigy", "DAdaptAdam") else 1e-3
    path = job.build_trainer(cfg(tmp_path, max_train_steps=2, optimizer_type=name, optimizer_args=args, learning_rate=lr), tiny_adapter).run()
    t, md = load_lora(path)
    assert any(v.abs().sum() > 0 for k, v in t.items() if k.endswith("lora_up.weight"))
    assert name.lower() in md["ss_optimizer"].lower() or name == "SGDNesterov"


def test_8bit_optimizer_says_what_to_use_on_cpu(tiny_adapter, tmp_path):
    with pytest.raises(UserError, match="AdamW"):
        job.build_trainer(cfg(tmp_path, max_train_steps=1, optimizer_type="AdamW8bit"), tiny_adapter).run()


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup",
                                       "cosine_with_min_lr"])
def test_schedulers_drive_the_lr(tiny_adapter, tmp_path, scheduler):
    lrs = []
    extra = {"lr_scheduler_min_lr_ratio": 0.1} if scheduler == "cosine_with_min_lr" else {}
    job.build_trainer(cfg(tmp_path, max_train_steps=4, lr_scheduler=scheduler, lr_warmup_steps=0.5 if "warmup" in scheduler else 0,
                          **extra), tiny_adapter).run(lambda e: lrs.append(e.lr["unet"]) if isinstance(e, ev.Step) else None)
    assert len(set(lrs)) > 1, lrs
    if scheduler == "cosine_with_min_lr":
        assert min(lrs) >= 0.1 * 1e-3 - 1e-12


def test_fp16_on_cpu_is_a_clear_error_and_bf16_runs(tiny_adapter, tmp_path):
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        job.build_trainer(cfg(tmp_path / "a", max_train_steps=1, mixed_precision="fp16"), tiny_adapter).run()
    path = job.build_trainer(cfg(tmp_path / "b", max_train_steps=2, mixed_precision="bf16"), tiny_adapter).run()
    assert all(v.dtype == torch.float32 for v in tensors(path).values())  # LoRA params stay fp32


def test_loss_options_run(tiny_adapter, tmp_path):
    path = job.build_trainer(cfg(tmp_path, max_train_steps=2, min_snr_gamma=5, loss_type="huber", noise_offset=0.1,
                                 multires_noise_iterations=4, ip_noise_gamma=0.1, zero_terminal_snr=True, min_timestep=100,
                                 max_timestep=900), tiny_adapter).run()
    md = load_lora(path)[1]
    assert (md["ss_min_snr_gamma"], md["ss_loss_type"], md["ss_zero_terminal_snr"]) == ("5.0", "huber", "True")


def test_gradient_checkpointing_reaches_lora_even_with_ldm_flags(tiny_adapter, tiny_model, tmp_path):
    """ldm's own checkpointing (use_checkpoint) would give LoRA no gradient; we switch it off."""
    blocks = [m for m in tiny_model.modules() if "checkpoint" in m.__dict__ or "use_checkpoint" in m.__dict__]
    for m in blocks:
        m.__dict__.update({k: True for k in ("checkpoint", "use_checkpoint") if k in m.__dict__})
    try:
        before = snapshot(tiny_model)
        # 128 px: at 64 px the middle block sees one token, where self-attention's q and k get no gradient
        path = job.build_trainer(cfg(tmp_path, max_train_steps=2, gradient_checkpointing=True, network_dropout=0.2, resolution="128"),
                                 tiny_adapter).run()
        assert_same_as(tiny_model, before)
        assert all(m.__dict__.get("checkpoint", True) and m.__dict__.get("use_checkpoint", True) for m in blocks)
        assert "forward" not in tiny_model.model.diffusion_model.input_blocks[1].__dict__
        ups = [v for k, v in tensors(path).items() if k.endswith("lora_up.weight") and "lora_unet_" in k]
        assert all(v.abs().sum() > 0 for v in ups)
    finally:
        for m in blocks:
            m.__dict__.update({k: False for k in ("checkpoint", "use_checkpoint") if k in m.__dict__})


def test_checkpointing_gives_the_same_gradients(tiny_adapter, tmp_path):
    a = job.build_trainer(cfg(tmp_path / "a", max_train_steps=2, network_dropout=0.3, rank_dropout=0.2), tiny_adapter).run()
    b = job.build_trainer(cfg(tmp_path / "b", max_train_steps=2, network_dropout=0.3, rank_dropout=0.2, gradient_checkpointing=True),
                          tiny_adapter).run()
    assert_same_lora(a, b, tol=1e-5)


def test_block_dims_and_lr_weights(tiny_adapter, tmp_path):
    dims = ",".join(["0"] * 12 + ["8"] + ["2"] * 12)  # IN blocks off, MID rank 8, OUT rank 2
    path = job.build_trainer(cfg(tmp_path, max_train_steps=2, block_dims=dims, up_lr_weight="zeros", mid_lr_weight=1.0), tiny_adapter).run()
    t, md = load_lora(path)
    assert not any("down_blocks" in k for k in t)
    assert t["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 8
    up = [v for k, v in t.items() if "up_blocks" in k and k.endswith("lora_up.weight")]
    assert up and all(v.shape[1] == 2 and v.abs().sum() == 0 for v in up)  # LR weight 0: never trained
    assert "block_dims" in md["ss_network_args"]


def test_network_weights_continue_from_a_file(tiny_adapter, tmp_path):
    first = job.build_trainer(cfg(tmp_path / "a", max_train_steps=2), tiny_adapter).run()
    zero_lr = job.build_trainer(cfg(tmp_path / "b", max_train_steps=1, network_weights=str(first), learning_rate=0.0, unet_lr=0.0,
                                    text_encoder_lr=0.0, optimizer_type="SGDNesterov"), tiny_adapter)
    assert_same_state = zero_lr.network.kohya_state_dict()
    ref = tensors(first)
    assert all(torch.equal(assert_same_state[k], ref[k]) for k in ref)


def test_text_encoder_output_cache(tiny_adapter, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = tiny_adapter.encode_captions
    monkeypatch.setattr(tiny_adapter, "encode_captions", lambda caps, *o: calls.__setitem__("n", calls["n"] + 1) or real(caps, *o))
    plain = job.build_trainer(cfg(tmp_path / "a", max_train_steps=6, network_train_unet_only=True), tiny_adapter).run()
    uncached_calls, calls["n"] = calls["n"], 0
    order = []
    monkeypatch.setattr(tiny_adapter, "encode_captions", lambda caps, *o: order.append(("encode", len(caps))) or real(caps, *o))
    cached = job.build_trainer(cfg(tmp_path / "b", max_train_steps=6, network_train_unet_only=True, cache_text_encoder_outputs=True),
                               tiny_adapter).run(lambda e: order.append("step") if isinstance(e, ev.Step) else None)
    # all 3 distinct captions in one call before the first step: the text encoder is then never
    # needed again (what lets the WebUI's --medvram keep the UNet on the GPU)
    assert uncached_calls == 6 and order == [("encode", 3)] + ["step"] * 6
    assert_same_lora(plain, cached, tol=1e-6)
    with pytest.raises(UserError, match="network_train_unet_only"):
        job.build_trainer(cfg(tmp_path / "c", max_train_steps=1, cache_text_encoder_outputs=True), tiny_adapter).run()


def test_save_every_n_steps_keeps_last_n(tiny_adapter, tmp_path):
    job.build_trainer(cfg(tmp_path, max_train_steps=9, save_every_n_steps=2, save_last_n_steps=3, save_state=True), tiny_adapter).run()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "run-step00000008.safetensors" in names and "run-step00000006.safetensors" in names
    assert "run-step00000002.safetensors" not in names and "run-step00000002-state" not in names
    assert "run.safetensors" in names and "run-state" in names


def test_tensorboard_and_samples_from_cli(tmp_path):
    data = make_dataset(tmp_path / "data", count=2, repeats=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# preview\nzkz, a red circle --w 64 --h 64 --d 7 --s 3 --l 5\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "lora_train", "train", "--set", "pretrained_model_name_or_path=builtin:tiny", "--set", f"train_data_dir={data}", "--set", f"output_dir={tmp_path / 'o'}",
                        "--set", "resolution=64", "--set", "max_train_epochs=2", "--set", f"logging_dir={tmp_path / 'logs'}",
                        "--set", f"sample_prompts={prompts}", "--set", "sample_every_n_epochs=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    samples = sorted((tmp_path / "o" / "sample").glob("*.png"))
    assert len(samples) == 2
    from PIL import Image
    assert "Seed: 7" in Image.open(samples[0]).info["parameters"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = next((tmp_path / "logs").iterdir())
    acc = EventAccumulator(str(run / "network_train"))  # sd-scripts' (accelerate's) folder: <dated>/<log_tracker_name>
    acc.Reload()
    assert {"loss/current", "loss/average", "loss/epoch", "lr/unet", "lr/textencoder"} <= set(acc.Tags()["scalars"])


def test_sample_and_config_from_lora_commands(tmp_path):
    from conftest import make_dataset as md_
    data = md_(tmp_path / "data", count=2)
    r = subprocess.run([sys.executable, "-m", "lora_train", "train", "--set", "pretrained_model_name_or_path=builtin:tiny", "--set", f"train_data_dir={data}", "--set", f"output_dir={tmp_path}",
                        "--set", "resolution=64", "--set", "max_train_steps=2", "--set", "network_dim=2", "--set", "output_name=cfl",
                        "--set", "min_snr_gamma=5", "--set", "optimizer_args=weight_decay=0.05"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "lora_train", "config-from-lora", str(tmp_path / "cfl.safetensors"), "--output",
                        str(tmp_path / "back.toml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    back = TrainConfig.from_toml(tmp_path / "back.toml")
    assert (back.network.network_dim, back.training.min_snr_gamma, back.optimizer.optimizer_type) == (2, 5.0, "AdamW")
    assert back.optimizer.optimizer_args == ["weight_decay=0.05"] and back.dataset.resolution == "64,64"
    r = subprocess.run([sys.executable, "-m", "lora_train", "sample", "--model", "builtin:tiny", "--lora", f"{tmp_path / 'cfl.safetensors'}:0.8",
                        "--prompt", "zkz", "--n", "2", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64",
                        "--output", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s").glob("*.png"))) == 2
