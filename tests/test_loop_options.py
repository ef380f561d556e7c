"""sd-scripts' training-loop options: scale_weight_norms, base_weights, save_n_epoch_ratio,
initial_epoch / initial_step / skip_until_initial_step, lr_scheduler_type / lr_scheduler_args /
lr_decay_steps / lr_scheduler_timescale, save_last_n_epochs_state / save_last_n_steps_state.

Expected values are hand-computed from sd-scripts' documented rules, or come from torch /
transformers schedulers built directly."""

import math
import types

import pytest
import torch
from conftest import assert_same_as, snapshot
from torch import nn
from test_training import Recorder, config_for

from lora_train.app import job
from lora_train.errors import UserError
from lora_train.network.files import load_lora, save_lora
from lora_train.network.locon import LoCon
from lora_train.network.lora import LoRA
from lora_train.train import base_weights, checkpoints, max_norm
from lora_train.train import events as ev
from lora_train.train.config import TrainConfig
from lora_train.train.observers import LossCsv

# --- scale_weight_norms ------------------------------------------------------------------------


def _lora(org, up, down, alpha):
    m = LoRA("m", org, dim=down.shape[0], alpha=alpha)
    with torch.no_grad():
        m.lora_up.weight.copy_(up.reshape(m.lora_up.weight.shape))
        m.lora_down.weight.copy_(down.reshape(m.lora_down.weight.shape))
    return m


def test_max_norm_scales_only_modules_above_the_limit():
    # rank 1, scale = alpha / rank: |up @ down| * scale by hand
    big = _lora(nn.Linear(3, 2), torch.tensor([[3.0], [0.0]]), torch.tensor([[4.0, 0.0, 0.0]]), alpha=1.0)  # norm 12
    small = _lora(nn.Linear(3, 2), torch.tensor([[1.0], [0.0]]), torch.tensor([[4.0, 0.0, 0.0]]), alpha=0.5)  # 4 * 0.5 = 2
    middle = _lora(nn.Linear(3, 2), torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0, 4.0, 0.0]]), alpha=1.0)  # 4
    conv = LoCon("c", nn.Conv2d(1, 1, 3), dim=1, alpha=1.0)  # up 2, down all ones 3x3: norm 2 * 3 = 6
    with torch.no_grad():
        conv.lora_up.weight.fill_(2.0)
        conv.lora_down.weight.fill_(1.0)
    net = types.SimpleNamespace(lora_modules={"big": big, "small": small, "middle": middle, "conv": conv})
    small_before = (small.lora_up.weight.clone(), small.lora_down.weight.clone())

    stats = max_norm.apply(net, 6.0)

    assert float(stats["max_norm/keys_scaled"]) == 1  # the conv is at the limit, not above it
    assert float(stats["norm/avg_key_norm"]) == pytest.approx((6 + 2 + 4 + 6) / 4)
    assert float(stats["max_norm/max_key_norm"]) == pytest.approx(6.0)
    # both factors shrink by sqrt(6 / 12), so their product by half
    assert big.lora_up.weight[0, 0].item() == pytest.approx(3 * math.sqrt(0.5))
    assert big.lora_down.weight[0, 0].item() == pytest.approx(4 * math.sqrt(0.5))
    assert torch.equal(small.lora_up.weight, small_before[0]) and torch.equal(small.lora_down.weight, small_before[1])
    stats = max_norm.apply(net, 3.0)  # now the conv (6) and the middle one (4) are above it
    assert float(stats["max_norm/keys_scaled"]) == 3
    assert conv.weight_delta().norm().item() == pytest.approx(3.0)
    assert float(stats["norm/avg_key_norm"]) == pytest.approx((3 + 2 + 3 + 3) / 4)


def test_scale_weight_norms_caps_every_module_of_a_run_and_logs(tiny_adapter, tmp_path):
    limit = 0.05
    cfg = config_for(tmp_path, max_train_steps=6, learning_rate=3e-2, scale_weight_norms=limit)
    rec = Recorder()
    csv = LossCsv(tmp_path / "loss.csv")
    path = job.build_trainer(cfg, tiny_adapter).run(lambda e: (rec(e), csv(e)))
    steps = rec.of(ev.Step)
    assert all(set(s.norms) == {"max_norm/keys_scaled", "norm/avg_key_norm", "max_norm/max_key_norm"} for s in steps)
    assert max(s.norms["max_norm/keys_scaled"] for s in steps) > 0  # the LR is high enough to push some above it
    assert all(s.norms["max_norm/max_key_norm"] <= limit * (1 + 1e-5) for s in steps)
    tensors, metadata = load_lora(path)
    assert metadata["ss_scale_weight_norms"] == "0.05"  # as sd-scripts records it
    for key in [k for k in tensors if k.endswith("lora_down.weight")]:
        name = key[: -len(".lora_down.weight")]
        down, up = tensors[key].float().flatten(1), tensors[f"{name}.lora_up.weight"].float().flatten(1)
        norm = ((up @ down) * tensors[f"{name}.alpha"].float() / down.shape[0]).norm().item()
        assert norm <= limit * (1 + 1e-4), name
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0].split(",")[5:8] == ["keys_scaled", "average_key_norm", "max_key_norm"]  # the validation columns follow
    assert all(row.split(",")[7] != "" for row in rows[1:])


# --- base_weights --------------------------------------------------------------------------------


def _base_lora(tiny_adapter, tmp_path):
    """A LoRA file with non-zero up weights on the UNet and the text encoder."""
    net = job.build_network(config_for(tmp_path / "base", network_dim=4, network_alpha=2, conv_dim=4), tiny_adapter, seed=5)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in net.lora_modules.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.3)
    path = save_lora(tmp_path / "base.safetensors", net.kohya_state_dict(), {})
    return net, path


def _predict(adapter):
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        cond = adapter.condition(adapter.encode_captions(["a red cube", "a blue ball"]), None)
        return adapter.predict(noisy, torch.tensor([100, 700]), cond)


def _merged_equals_applied(adapter, model, net, path, multiplier):
    """The prediction with the file merged at `multiplier` is the one with the LoRA hooked on at it,
    and the model is bit-identical afterwards. Returns that prediction."""
    before = snapshot(model)
    net.set_multiplier(multiplier)
    with net.applied():
        applied = _predict(adapter)
    with base_weights.merged([str(path)], [str(multiplier)], adapter.file_targets()):
        merged = _predict(adapter)
    torch.testing.assert_close(merged, applied, atol=1e-5, rtol=1e-4)
    assert_same_as(model, before)
    return applied


def test_base_weights_merge_equals_the_lora_applied_and_restore_exactly(tiny_adapter, tiny_model, tmp_path):
    net, path = _base_lora(tiny_adapter, tmp_path)
    before = snapshot(tiny_model)
    plain = _predict(tiny_adapter)
    applied = _merged_equals_applied(tiny_adapter, tiny_model, net, path, 0.7)
    assert not torch.allclose(plain, applied, atol=1e-4)  # the LoRA changes the prediction
    with pytest.raises(RuntimeError):
        with base_weights.merged([str(path)], [], tiny_adapter.file_targets()):
            raise RuntimeError("a run that fails")
    assert_same_as(tiny_model, before)


def test_base_weights_on_sdxl_fused_attention_parts(tmp_path):
    """SDXL's text encoder 2 has fused attention: the merge changes slices of in_proj_weight."""
    from lora_train.model.loading import quiet
    from lora_train.model.sgm import SgmAdapter
    from lora_train.model.tiny_sdxl import build_tiny_sdxl
    from lora_train.network.network import LoRANetwork

    with quiet():
        model = build_tiny_sdxl(0, sgm=False)
    xl = SgmAdapter(model, name="tinyxl")
    net = LoRANetwork(xl.lora_targets(), dim=4, alpha=4)
    assert any(m.part in ("q", "k", "v") for m in net.lora_modules.values())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.lora_modules.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=gen) * 0.2)
    path = save_lora(tmp_path / "xl.safetensors", net.kohya_state_dict(), {})
    _merged_equals_applied(xl, model, net, path, 1.5)


def test_base_weights_multipliers_follow_sd_scripts():
    assert base_weights.multipliers(["a", "b", "c"], [0.5]) == [0.5, 1.0, 1.0]
    with pytest.raises(UserError, match="not a number"):
        base_weights.multipliers(["a"], ["x"])


def test_a_run_with_base_weights_trains_on_top_and_leaves_the_model(tiny_adapter, tiny_model, tmp_path):
    _, path = _base_lora(tiny_adapter, tmp_path)
    before = snapshot(tiny_model)
    runs = {}
    for name, extra in (("plain", {}), ("base", {"base_weights": [str(path)], "base_weights_multiplier": [1.0]})):
        rec = Recorder()
        job.build_trainer(config_for(tmp_path / name, max_train_steps=2, **extra), tiny_adapter).run(rec)
        runs[name] = rec.of(ev.Step)[0].loss
        assert_same_as(tiny_model, before)
    assert runs["plain"] != runs["base"]  # same seed and batch: only the merged LoRA differs
    with pytest.raises(UserError, match="base_weights: '.*missing.safetensors' does not exist"):
        job.build_trainer(config_for(tmp_path / "x", base_weights=[str(tmp_path / "missing.safetensors")]), tiny_adapter).run()


# --- save_n_epoch_ratio / save_last_n_*_state ------------------------------------------------------


def test_save_n_epoch_ratio_spreads_at_least_n_saves():
    # sd-scripts: save_every_n_epochs = floor(epochs / ratio) or 1, and it replaces save_every_n_epochs
    every = checkpoints.every_n_epochs(5, 3, 10)
    assert every == 3 and checkpoints.save_epochs(every, 10) == [3, 6, 9]  # + the final save: 4 files, at least 3
    assert checkpoints.save_epochs(checkpoints.every_n_epochs(None, 4, 10), 10) == [2, 4, 6, 8]
    assert checkpoints.save_epochs(checkpoints.every_n_epochs(None, 20, 10), 10) == list(range(1, 10))
    assert checkpoints.every_n_epochs(5, None, 10) == 5
    with pytest.raises(UserError):
        checkpoints.every_n_epochs(None, -1, 10)


def test_save_n_epoch_ratio_in_a_run(tiny_adapter, tmp_path):
    cfg = config_for(tmp_path, max_train_epochs=4, train_batch_size=8, save_n_epoch_ratio=2, save_every_n_epochs=1)
    job.build_trainer(cfg, tiny_adapter).run()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["t-000002.safetensors", "t.safetensors"]


def test_save_last_n_state_keeps_state_folders_apart_from_the_loras(tiny_adapter, tmp_path):
    cfg = config_for(tmp_path, max_train_epochs=5, train_batch_size=8, save_every_n_epochs=1, save_state=True,
                     save_last_n_epochs_state=2)
    job.build_trainer(cfg, tiny_adapter).run()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("t-0*.safetensors")) == [f"t-00000{e}.safetensors" for e in (1, 2, 3, 4)]
    assert sorted(p.name for p in out.glob("t-0*-state")) == ["t-000003-state", "t-000004-state"]
    # steps: saves at 2, 4, 6 (8 is the last); at 6, the save more than 2 steps old (2) loses its state only
    cfg = config_for(tmp_path / "s", max_train_steps=8, train_batch_size=2, save_every_n_steps=2, save_state=True,
                     save_last_n_steps_state=2)
    job.build_trainer(cfg, tiny_adapter).run()
    out = tmp_path / "s" / "out"
    assert sorted(p.name for p in out.glob("t-step*.safetensors")) == [f"t-step0000000{s}.safetensors" for s in (2, 4, 6)]
    assert sorted(p.name for p in out.glob("t-step*-state")) == ["t-step00000004-state", "t-step00000006-state"]


# --- initial_epoch / initial_step / skip_until_initial_step ---------------------------------------


def _run_recording_batches(cfg, adapter):
    trainer = job.build_trainer(cfg, adapter)
    loaded = []
    load = trainer.data.load
    trainer.data.load = lambda items, *a, **k: (loaded.append([i.path.name for i in items]), load(items, *a, **k))[1]
    rec = Recorder()
    trainer.run(rec)
    return rec, loaded


def test_initial_epoch_starts_the_epoch_count_later(tiny_adapter, tmp_path):
    # 8 images x repeats, batch 4: 2 steps an epoch, 4 epochs = 8 steps; linear LR from 1e-3 to 0 over the 8
    cfg = config_for(tmp_path, max_train_epochs=4, train_batch_size=4, initial_epoch=3, save_every_n_epochs=1,
                     lr_scheduler="linear")
    rec, _ = _run_recording_batches(cfg, tiny_adapter)
    steps = rec.of(ev.Step)
    # sd-scripts: epochs 3 and 4 run (the data from the start), the step count starts at 0, so 4 steps
    assert [(s.step, s.epoch) for s in steps] == [(1, 3), (2, 3), (3, 4), (4, 4)]
    assert rec.of(ev.Started)[0].total_steps == 4
    # "initial_epoch/step doesn't affect the lr scheduler": after the first step, lr = 1e-3 * 7 / 8
    assert steps[0].lr["unet"] == pytest.approx(1e-3 * 7 / 8)
    assert sorted(p.name for p in (tmp_path / "out").glob("t-0*.safetensors")) == ["t-000003.safetensors"]


def test_skip_until_initial_step_skips_the_first_steps_batches(tiny_adapter, tmp_path):
    full, full_batches = _run_recording_batches(config_for(tmp_path / "full", max_train_epochs=4, train_batch_size=4), tiny_adapter)
    cfg = config_for(tmp_path / "skip", max_train_epochs=4, train_batch_size=4, initial_step=3, skip_until_initial_step=True)
    rec, batches = _run_recording_batches(cfg, tiny_adapter)
    # the step count starts at 3 (in epoch 2), the run ends at max_train_steps, on the batches of steps 4..8
    assert [(s.step, s.epoch) for s in rec.of(ev.Step)] == [(s.step, s.epoch) for s in full.of(ev.Step)][3:]
    assert batches == full_batches[3:]


def test_initial_epoch_1_and_initial_step_0_change_nothing(tiny_adapter, tmp_path):
    for options in ({"initial_epoch": 1}, {"initial_epoch": 0}, {"initial_step": 0, "skip_until_initial_step": True}):
        trainer = job.build_trainer(config_for(tmp_path, **options), tiny_adapter)
        assert trainer._start_later() == 10 and (trainer.step, trainer.epoch, trainer.batches_done) == (0, 1, 0)


def test_initial_step_must_be_below_the_total(tiny_adapter, tmp_path):
    with pytest.raises(UserError, match="initial_step 10 must be below the 10 training steps"):
        job.build_trainer(config_for(tmp_path, initial_step=10), tiny_adapter).run()


# --- lr_scheduler_type / lr_scheduler_args / lr_decay_steps / lr_scheduler_timescale ----------------


def _curve(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def _trainer_curve(tmp_path, adapter, steps=30, **options):
    trainer = job.build_trainer(config_for(tmp_path, max_train_steps=40, **options), adapter)
    optimizer, scheduler = trainer._optimizer_and_scheduler()
    return _curve(scheduler, optimizer, steps), [g["initial_lr"] for g in optimizer.param_groups]


def _direct_curve(lrs, build, steps=30):
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs], lr=lrs[0])
    return _curve(build(optimizer), optimizer, steps)


def test_lr_scheduler_type_and_args_from_a_toml(tiny_adapter, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('lr_scheduler_type = "torch.optim.lr_scheduler.CosineAnnealingLR"\nlr_scheduler_args = ["T_max=100"]\n')
    flat = TrainConfig.from_toml(toml).optimizer
    ours, lrs = _trainer_curve(tmp_path, tiny_adapter, lr_scheduler_type=flat.lr_scheduler_type, lr_scheduler_args=flat.lr_scheduler_args)
    expected = _direct_curve(lrs, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100))
    assert ours == expected and ours[10][0] < ours[0][0]


def test_lr_scheduler_timescale_reaches_inverse_sqrt(tiny_adapter, tmp_path):
    from transformers.optimization import get_inverse_sqrt_schedule

    ours, lrs = _trainer_curve(tmp_path, tiny_adapter, lr_scheduler="inverse_sqrt", lr_warmup_steps=4, lr_scheduler_timescale=10)
    assert ours == _direct_curve(lrs, lambda o: get_inverse_sqrt_schedule(o, num_warmup_steps=4, timescale=10))
    default, _ = _trainer_curve(tmp_path, tiny_adapter, lr_scheduler="inverse_sqrt", lr_warmup_steps=4)
    assert default != ours


def test_warmup_stable_decay_with_lr_decay_steps(tiny_adapter, tmp_path):
    # 40 steps: 4 warmup, 40 - 4 - 10 = 26 stable, 10 decay (a quarter of the total); cosine decay to min ratio 0.1
    ours, lrs = _trainer_curve(tmp_path, tiny_adapter, steps=42, lr_scheduler="warmup_stable_decay", lr_warmup_steps=4,
                               lr_decay_steps=0.25, lr_scheduler_min_lr_ratio=0.1, learning_rate=1.0)
    factors = [row[0] / lrs[0] for row in ours]
    assert factors[0] == pytest.approx(0.1)  # warmup starts at the min ratio (transformers 4.54)
    assert factors[2] == pytest.approx(0.1 + 0.9 * 2 / 4)
    assert factors[4] == factors[29] == 1.0
    assert factors[30] == pytest.approx(1.0)  # decay progress 0
    assert factors[35] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert factors[40] == pytest.approx(0.1) and factors[41] == pytest.approx(0.1)
    with pytest.raises(UserError, match="add up to more than the 40 training steps"):
        _trainer_curve(tmp_path, tiny_adapter, lr_scheduler="warmup_stable_decay", lr_warmup_steps=30, lr_decay_steps=20)
