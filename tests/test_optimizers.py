"""Optimizers and LR schedulers by sd-scripts' names: real optimisation runs and hand-computed LR curves."""

import math
import sys

import pytest
import torch

from lora_train.errors import UserError
from lora_train.train.optimizers import (
    adafactor_initial_lr,
    build_optimizer,
    optimizer_eval_mode,
    optimizer_name,
    optimizer_train_mode,
    parse_optimizer_args,
)
from lora_train.train.schedulers import build_scheduler, scheduler_label, warmup_step_count


def lora_problem():
    """A LoRA-like down/up pair fitted to a rank-2 map; loss starts near 1.2."""
    g = torch.Generator().manual_seed(0)
    down = torch.nn.Linear(16, 4, bias=False)
    up = torch.nn.Linear(4, 16, bias=False)
    with torch.no_grad():
        down.weight.copy_(torch.randn(4, 16, generator=g) * 0.25)
        up.weight.copy_(torch.randn(16, 4, generator=g) * 0.25)
    x = torch.randn(64, 16, generator=g)
    target = x @ (torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g)) * 0.15

    def loss():
        return torch.nn.functional.mse_loss(up(down(x)), target)

    return down, up, loss


def groups(down, up, lr_down, lr_up=None):
    return [
        {"params": list(down.parameters()), "lr": lr_down, "name": "textencoder"},
        {"params": list(up.parameters()), "lr": lr_up if lr_up is not None else lr_down, "name": "unet"},
    ]


def train(opt, sched, loss, steps=20):
    """The loop order sd-scripts uses: step, scheduler step, zero_grad. Returns the loss before and after."""
    with torch.no_grad():
        before = loss().item()
    optimizer_train_mode(opt)
    for _ in range(steps):
        loss().backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    optimizer_eval_mode(opt)  # schedule-free: judge the averaged weights, as a saved LoRA would hold
    with torch.no_grad():
        return before, loss().item()


# name, lr, optimizer_args: settings at which each one makes clear progress on the problem in 20 steps
CPU_OPTIMIZERS = [
    ("AdamW", 1e-2, None),
    ("adamw", 1e-2, ["weight_decay=0.01", "betas=(0.9,0.99)"]),
    ("Lion", 1e-2, None),
    ("SGDNesterov", 0.05, None),
    ("Adafactor", 1e-3, None),  # relative_step: finds its own LR
    ("Adafactor", 1e-2, ["relative_step=False", "scale_parameter=False"]),
    ("Prodigy", 1.0, ["d_coef=0.5", "weight_decay=0.01"]),
    ("DAdaptation", 1.0, ["d0=1e-3", "growth_rate=1.5"]),
    ("DAdaptAdam", 1.0, ["d0=1e-3", "growth_rate=1.5"]),
    ("DAdaptAdaGrad", 1.0, ["d0=1e-2"]),
    ("DAdaptAdan", 0.3, ["d0=1e-3"]),
    ("DAdaptAdanIP", 0.3, ["d0=1e-3"]),
    ("DAdaptLion", 1.0, ["d0=1e-3"]),
    ("DAdaptSGD", 1.0, ["d0=1e-2"]),
    ("AdamWScheduleFree", 0.03, None),
    ("RAdamScheduleFree", 0.1, None),
    ("SGDScheduleFree", 0.2, None),
    ("RAdam", 0.1, None),  # any torch.optim class by its bare name
    ("torch.optim.Adagrad", 0.05, None),  # any class by dotted path
]


@pytest.mark.parametrize("name,lr,args", CPU_OPTIMIZERS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CPU_OPTIMIZERS)])
def test_optimizer_lowers_the_loss(name, lr, args):
    down, up, loss = lora_problem()
    opt = build_optimizer(name, groups(down, up, lr), lr, args)
    sched = build_scheduler("constant", opt, 20)
    before, after = train(opt, sched, loss)
    assert after < 0.85 * before, (name, before, after)
    assert all(math.isfinite(p.item()) for p in down.weight.flatten())


SCHEDULERS = [
    ("constant", 0, {}),
    ("constant_with_warmup", 2, {}),
    ("linear", 2, {}),
    ("cosine", 0.1, {}),
    ("cosine_with_restarts", 2, {"num_cycles": 2}),
    ("polynomial", 2, {"power": 2.0}),
    ("inverse_sqrt", 2, {}),
    ("cosine_with_min_lr", 2, {"min_lr_ratio": 0.1}),
]


@pytest.mark.parametrize("name,warmup,extra", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_scheduler_drives_a_real_run(name, warmup, extra):
    down, up, loss = lora_problem()
    opt = build_optimizer("AdamW", groups(down, up, 2e-2), 2e-2, None)
    sched = build_scheduler(name, opt, 20, warmup_steps=warmup, **extra)
    before, after = train(opt, sched, loss)
    assert after < 0.85 * before


# --- LR curves, by hand ---------------------------------------------------------------------------


def curve(name, total=100, lr=1.0, steps=None, **kw):
    """The LR of the first group before each step 0..steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": lr}], lr=lr)
    sched = build_scheduler(name, opt, total, **kw)
    out = []
    for _ in range((steps if steps is not None else total) + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_is_flat():
    assert curve("constant", total=10) == [1.0] * 11


def test_constant_with_warmup_in_steps():
    lr = curve("constant_with_warmup", warmup_steps=10)
    assert lr[0] == 0.0 and lr[5] == pytest.approx(0.5) and lr[10] == 1.0 and lr[80] == 1.0


def test_warmup_as_ratio_of_total_steps():
    # 0.1 of 100 steps is 10 warmup steps, the same curve as warmup_steps=10
    assert curve("constant_with_warmup", warmup_steps=0.1) == curve("constant_with_warmup", warmup_steps=10)
    assert curve("linear", warmup_steps="10%") == curve("linear", warmup_steps=10)
    assert warmup_step_count(0.25, 10) == 2  # int(2.5): sd-scripts truncates
    assert warmup_step_count(5, 10) == 5 and warmup_step_count("5", 10) == 5 and warmup_step_count(None, 10) == 0
    for bad in (-1, "abc", 2.5, "150%"):
        with pytest.raises(UserError, match="lr_warmup_steps"):
            warmup_step_count(bad, 10)


def test_linear_with_warmup():
    lr = curve("linear", warmup_steps=10)
    assert lr[5] == pytest.approx(0.5)
    assert lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(45 / 90)  # (100 - 55) / (100 - 10)
    assert lr[100] == 0.0


def test_cosine_midpoint_and_quarter():
    lr = curve("cosine")
    assert lr[50] == pytest.approx(0.5)
    assert lr[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr[100] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_restarts_cycles():
    lr = curve("cosine_with_restarts", num_cycles=2)
    assert lr[25] == pytest.approx(0.5)
    assert lr[49] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.98)))
    assert lr[50] == pytest.approx(1.0)  # the restart
    assert lr[75] == pytest.approx(0.5)


def test_polynomial_power_two():
    lr = curve("polynomial", power=2.0)
    end = 1e-7  # transformers' lr_end default
    assert lr[50] == pytest.approx((1 - end) * 0.25 + end)
    assert lr[90] == pytest.approx((1 - end) * 0.01 + end)
    assert lr[100] == pytest.approx(end)
    linear_end = curve("polynomial", lr=2.0, scheduler_args=["lr_end=0.5"])  # lr_scheduler_args reach the function
    assert linear_end[50] == pytest.approx(1.25) and linear_end[100] == pytest.approx(0.5)


def test_cosine_with_min_lr_floor():
    lr = curve("cosine_with_min_lr", min_lr_ratio=0.1, steps=100)
    assert lr[50] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr[100] == pytest.approx(0.1)
    assert min(lr) == pytest.approx(0.1)
    # sd-scripts halves num_cycles: 2 cycles fall to the floor at the midpoint and climb back
    two = curve("cosine_with_min_lr", min_lr_ratio=0.1, num_cycles=2)
    assert two[50] == pytest.approx(0.1) and two[100] == pytest.approx(1.0)
    # min_lr in lr_scheduler_args is absolute, relative to the optimizer's base lr (transformers' rule)
    absolute = curve("cosine_with_min_lr", lr=2.0, scheduler_args={"min_lr": 0.5})
    assert absolute[100] == pytest.approx(0.5)
    with pytest.raises(UserError, match="lr_scheduler_min_lr_ratio"):
        curve("cosine_with_min_lr")


def test_inverse_sqrt():
    lr = curve("inverse_sqrt", warmup_steps=4, total=20)
    assert lr[2] == pytest.approx(0.5)
    assert lr[16] == pytest.approx(1 / math.sqrt(16 / 4))  # timescale defaults to the warmup steps


def test_each_group_keeps_its_own_lr_under_the_schedule():
    down, up, _ = lora_problem()
    opt = build_optimizer("AdamW", groups(down, up, 1.0, 0.5), 1.0, None)
    sched = build_scheduler("cosine", opt, 100)
    for _ in range(50):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.25])


def test_lr_scheduler_type_any_class():
    assert curve("constant", total=20, scheduler_type="StepLR", scheduler_args=["step_size=10", "gamma=0.5"])[10] == 0.5
    lr = curve("constant", total=5, scheduler_type="torch.optim.lr_scheduler.ExponentialLR", scheduler_args=["gamma=0.9"])
    assert lr[2] == pytest.approx(0.81)
    with pytest.raises(UserError, match="lr_warmup_steps"):
        curve("constant", scheduler_type="StepLR", scheduler_args=["step_size=10"], warmup_steps=5)
    with pytest.raises(UserError, match="did you mean 'StepLR'"):
        curve("constant", scheduler_type="StepLr")


def test_scheduler_name_errors():
    with pytest.raises(UserError, match="did you mean 'cosine_with_restarts'"):
        curve("cosine_with_restart")
    with pytest.raises(UserError, match="not supported yet"):
        curve("piecewise_constant")
    with pytest.raises(UserError, match="constant_with_warmup"):  # sd-scripts refuses warmup on constant
        curve("constant", warmup_steps=10)
    with pytest.raises(UserError, match="lr_scheduler 'cosine'"):
        curve("cosine", scheduler_args=["no_such_arg=1"])
    with pytest.raises(UserError, match="only with optimizer_type Adafactor"):
        curve("adafactor")


# --- Adafactor, as sd-scripts sets it up ---------------------------------------------------------


def test_adafactor_relative_step_by_default_and_own_schedule():
    down, up, loss = lora_problem()
    caller_groups = groups(down, up, 1e-4, 5e-5)
    notes = []
    opt = build_optimizer("AdaFactor", caller_groups, 1e-3, None, notes)
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    assert all(g["lr"] is None for g in opt.param_groups)  # the per-group LRs are dropped
    assert caller_groups[0]["lr"] == 1e-4  # ...from our copies, not the caller's dicts
    assert any("unet_lr and text_encoder_lr are ignored" in n for n in notes)
    assert adafactor_initial_lr(opt) == 1e-3
    assert optimizer_name(opt) == "transformers.optimization.Adafactor(relative_step=True)"

    sched = build_scheduler("cosine", opt, 20, notes=notes)  # whatever was asked, it is replaced
    assert type(sched).__name__ == "AdafactorSchedule"
    assert any("replaced by adafactor" in n for n in notes)
    assert scheduler_label("cosine", opt) == "adafactor:0.001"
    assert sched.get_last_lr() == [1e-3, 1e-3]  # before the first step: the learning rate as given

    rms = down.weight.detach().pow(2).mean().sqrt().item()
    loss().backward()
    opt.step()
    sched.step()  # before zero_grad: the proxy reads Adafactor's LR from the groups with gradients
    # step 1: relative step min(1e-2, 1/sqrt(1)) scaled by the parameter's RMS (scale_parameter)
    assert sched.get_last_lr()[0] == pytest.approx(1e-2 * rms)

    with pytest.raises(UserError, match="lr_warmup_steps"):
        build_scheduler("adafactor", opt, 20, warmup_steps=2)


def test_adafactor_warmup_init_forces_relative_step():
    down, up, _ = lora_problem()
    notes = []
    opt = build_optimizer("Adafactor", groups(down, up, 1e-3), 1e-3, ["relative_step=False", "warmup_init=True"], notes)
    assert opt.defaults["relative_step"] is True and opt.defaults["warmup_init"] is True
    assert any("warmup_init" in n for n in notes)
    assert optimizer_name(opt) == "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"


def test_adafactor_without_relative_step_uses_the_lr_and_any_scheduler():
    down, up, _ = lora_problem()
    opt = build_optimizer("Adafactor", groups(down, up, 1e-3, 5e-4), 1e-3, ["relative_step=False", "scale_parameter=False"])
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]
    assert adafactor_initial_lr(opt) is None
    assert type(build_scheduler("cosine", opt, 10)).__name__ == "LambdaLR"
    with pytest.raises(UserError, match="relative_step=True"):
        build_scheduler("adafactor", opt, 10)


# --- the rest of the optimizer rules --------------------------------------------------------------


def test_sgd_nesterov_defaults_momentum_like_sd_scripts():
    down, up, _ = lora_problem()
    opt = build_optimizer("SGDNesterov", groups(down, up, 0.1), 0.1, None)
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9
    assert optimizer_name(opt) == "torch.optim.sgd.SGD(momentum=0.9)"
    opt = build_optimizer("sgdnesterov", groups(down, up, 0.1), 0.1, ["momentum=0.5"])
    assert opt.defaults["momentum"] == 0.5


def test_optimizer_args_reach_the_class():
    down, up, _ = lora_problem()
    opt = build_optimizer("AdamW", groups(down, up, 1e-3), 1e-3, ["weight_decay=0.1", "betas=(0.9,0.99)", "eps=1e-6"])
    assert opt.defaults["weight_decay"] == 0.1 and opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-6
    assert [g["name"] for g in opt.param_groups] == ["textencoder", "unet"]  # extra group keys survive


def test_parse_optimizer_args():
    assert parse_optimizer_args(["weight_decay=0.01", "betas=(0.9,0.99)", "decouple=True", "d0=1e-6", "use_bias_correction=false"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True, "d0": 1e-6, "use_bias_correction": False,
    }
    assert parse_optimizer_args(" weight_decay=0.1  betas=(0.9, 0.99) name='x y' ") == {
        "weight_decay": 0.1, "betas": (0.9, 0.99), "name": "x y",
    }
    assert parse_optimizer_args({"d_coef": 2}) == {"d_coef": 2}
    assert parse_optimizer_args(None) == {} and parse_optimizer_args([]) == {}
    with pytest.raises(UserError, match="'decouple' is not key=value"):
        parse_optimizer_args(["decouple"])
    with pytest.raises(UserError, match="value of 'mode'"):
        parse_optimizer_args(["mode=fast"])


def test_optimizer_names_like_sd_scripts():
    down, up, _ = lora_problem()

    def name(n, lr=1e-3, args=None):
        return optimizer_name(build_optimizer(n, groups(down, up, lr), lr, args))

    assert name("AdamW") == "torch.optim.adamw.AdamW"
    assert name("AdamW", args=["weight_decay=0.1", "betas=(0.9,0.99)"]) == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"
    assert name("Lion") == "lion_pytorch.lion_pytorch.Lion"
    assert name("Prodigy", 1.0, ["d_coef=2", "decouple=True"]) == "prodigyopt.prodigy.Prodigy(d_coef=2,decouple=True)"
    assert name("DAdaptation", 1.0) == "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint"
    assert name("DAdaptAdam", 1.0) == "dadaptation.dadapt_adam.DAdaptAdam"
    assert name("AdamWScheduleFree") == "schedulefree.adamw_schedulefree.AdamWScheduleFree"
    assert name("radam") == "torch.optim.radam.RAdam"
    assert name("torch.optim.Adagrad") == "torch.optim.adagrad.Adagrad"
    assert optimizer_name(torch.optim.Adam(down.parameters())) == "torch.optim.adam.Adam"  # built elsewhere


def test_adaptive_optimizers_note_a_low_or_split_lr():
    down, up, _ = lora_problem()
    notes = []
    build_optimizer("Prodigy", groups(down, up, 1e-4, 5e-5), 1e-4, None, notes)
    assert any("around 1.0" in n for n in notes) and any("only the first one" in n for n in notes)
    notes = []
    build_optimizer("DAdaptAdam", groups(down, up, 1.0), 1.0, None, notes)
    assert notes == []


def test_schedule_free_modes():
    down, up, loss = lora_problem()
    opt = build_optimizer("AdamWScheduleFree", groups(down, up, 0.03), 0.03, None)
    assert all(g["train_mode"] for g in opt.param_groups)  # ready to train, as sd-scripts leaves it
    notes = []
    sched = build_scheduler("cosine", opt, 10, warmup_steps=2, notes=notes)
    assert any("ignored" in n for n in notes)
    train(opt, sched, loss, steps=5)
    assert [g["lr"] for g in opt.param_groups] == [0.03, 0.03]  # no schedule applied on top
    eval_weight = down.weight.detach().clone()  # train() left it in eval mode
    optimizer_train_mode(opt)
    assert not torch.equal(down.weight, eval_weight)  # the train point differs from the averaged weights
    optimizer_eval_mode(opt)
    assert torch.allclose(down.weight, eval_weight, atol=1e-6)

    plain = build_optimizer("AdamW", groups(down, up, 0.01), 0.01, None)
    before = down.weight.detach().clone()
    optimizer_eval_mode(plain)
    optimizer_train_mode(plain)
    assert torch.equal(down.weight, before)


EIGHT_BIT = [
    ("AdamW8bit", "AdamW"),
    ("adamw8bit", "AdamW"),
    ("PagedAdamW8bit", "AdamW"),
    ("PagedAdamW", "AdamW"),
    ("PagedAdamW32bit", "AdamW"),
    ("Lion8bit", "Lion"),
    ("PagedLion8bit", "Lion"),
    ("SGDNesterov8bit", "SGDNesterov"),
    ("bitsandbytes.optim.AdEMAMix8bit", "AdamW"),
]


@pytest.mark.parametrize("name,instead", EIGHT_BIT)
def test_8bit_optimizers_need_an_nvidia_gpu(monkeypatch, name, instead):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # an import attempt would raise ImportError and turn into the pip message, failing the match below
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    down, up, _ = lora_problem()
    with pytest.raises(UserError, match=f"NVIDIA GPU.*use optimizer_type = \"{instead}\""):
        build_optimizer(name, groups(down, up, 1e-3), 1e-3, None)


def test_8bit_on_cuda_without_bitsandbytes_says_pip_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    down, up, _ = lora_problem()
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        build_optimizer("AdamW8bit", groups(down, up, 1e-3), 1e-3, None)


@pytest.mark.parametrize("name,module,package", [
    ("Lion", "lion_pytorch", "lion-pytorch"),
    ("Prodigy", "prodigyopt", "prodigyopt"),
    ("DAdaptAdam", "dadaptation", "dadaptation"),
    ("AdamWScheduleFree", "schedulefree", "schedulefree"),
])
def test_missing_package_says_pip_install(monkeypatch, name, module, package):
    monkeypatch.setitem(sys.modules, module, None)
    down, up, _ = lora_problem()
    with pytest.raises(UserError, match=f"pip install {package}"):
        build_optimizer(name, groups(down, up, 1.0), 1.0, None)


def test_unknown_names_suggest_a_close_one():
    down, up, _ = lora_problem()

    def build(name, args=None):
        return build_optimizer(name, groups(down, up, 1e-3), 1e-3, args)

    with pytest.raises(UserError, match="unknown optimizer_type 'Prodigi'.*did you mean 'Prodigy'"):
        build("Prodigi")
    with pytest.raises(UserError, match="did you mean 'AdamW'"):
        build("torch.optim.AdamWW")
    with pytest.raises(UserError, match="pip install nosuchpackage"):
        build("nosuchpackage.optim.Fast")
    with pytest.raises(UserError, match="has no argument 'weight_decy'.*did you mean 'weight_decay'"):
        build("AdamW", ["weight_decy=0.1"])
    with pytest.raises(UserError, match="Invalid learning rate"):
        build_optimizer("AdamW", [{"params": list(down.parameters())}], -1.0, None)



def _steps(opt, loss, steps=15):
    for _ in range(steps):
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_adamw_on_the_cpu_takes_torchs_fused_update_with_the_same_result(name):
    down, up, loss = lora_problem()
    opt = build_optimizer(name, groups(down, up, 1e-2, 3e-3), 1e-2, ["weight_decay=0.05"])
    # torch 2.14 (this environment) has the CPU kernel; the WebUI's 2.1 refuses it (next test)
    assert opt.defaults["fused"] is True
    assert optimizer_name(opt) == f"torch.optim.{name.lower()}.{name}(weight_decay=0.05)"  # as sd-scripts writes it: no fused
    _steps(opt, loss)
    # the same steps with torch's one-tensor-at-a-time update, which sd-scripts gets on the CPU
    down2, up2, loss2 = lora_problem()
    cls = getattr(torch.optim, name)
    plain = cls(groups(down2, up2, 1e-2, 3e-3), lr=1e-2, weight_decay=0.05, foreach=False)
    _steps(plain, loss2)
    for a, b in ((down.weight, down2.weight), (up.weight, up2.weight)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), float((a - b).abs().max())
    assert not torch.equal(down.weight, lora_problem()[0].weight)  # it did move


def test_a_torch_that_refuses_fused_on_the_cpu_gets_the_plain_update(monkeypatch):
    original = torch.optim.AdamW.__init__
    asked = []

    def refusing(self, params, *args, fused=None, **kwargs):
        asked.append(fused)
        if fused:  # torch 2.1: the groups take the defaults (fused among them) first, then the check refuses
            torch.optim.Optimizer.__init__(self, params, dict(lr=kwargs.get("lr", 1e-3), fused=True))
            raise RuntimeError("`fused=True` requires all the params to be CUDA, floating point Tensor")
        original(self, params, *args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", refusing)
    down, up, loss = lora_problem()
    opt = build_optimizer("AdamW", groups(down, up, 1e-2), 1e-2)
    assert asked == [True, None] and not opt.defaults["fused"]
    assert not any(g["fused"] for g in opt.param_groups)  # the refused attempt left nothing in the groups
    before = loss().item()
    _steps(opt, loss)
    assert loss().item() < before * 0.8


@pytest.mark.parametrize("args,fused,foreach", [(["fused=False"], False, None), (["foreach=True"], None, True)])
def test_the_users_own_fused_or_foreach_is_kept(args, fused, foreach):
    down, up, _ = lora_problem()
    opt = build_optimizer("AdamW", groups(down, up, 1e-2), 1e-2, args)
    assert opt.defaults["fused"] == fused and opt.defaults["foreach"] == foreach


def test_parameters_off_the_cpu_keep_torchs_default():
    from lora_train.train import optimizers

    # a GPU run is left to torch's own default; a meta tensor stands in for a CUDA one (this machine has no GPU)
    off = [{"params": [torch.nn.Parameter(torch.empty(4, 4, device="meta"))], "lr": 1e-2}]
    assert optimizers._fused_on_cpu(torch.optim.AdamW, off, 1e-2, {}) is None
    down, up, _ = lora_problem()
    assert optimizers._fused_on_cpu(torch.optim.AdamW, groups(down, up, 1e-2), 1e-2, {}).defaults["fused"] is True


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_resumed_state_keeps_this_torchs_update_and_the_runs_numbers(saved_fused):
    """A state saved by the plain update (the WebUI's torch 2.1) resumes fused here, and a fused state
    resumes under a torch that refuses the CPU kernel (2.1) with the plain update; the numbers carry on."""
    import copy

    from lora_train.train.optimizers import load_optimizer_state

    down, up, loss = lora_problem()
    first = torch.optim.AdamW(groups(down, up, 1e-2), lr=1e-2, **({"fused": True} if saved_fused else {"foreach": False}))
    _steps(first, loss, 5)
    state = copy.deepcopy(first.state_dict())  # as read back from the state file, not the live tensors
    down2, up2, loss2 = lora_problem()
    with torch.no_grad():
        down2.weight.copy_(down.weight)
        up2.weight.copy_(up.weight)
    resumed = torch.optim.AdamW(groups(down2, up2, 1e-2), lr=1e-2, foreach=False) if saved_fused else \
        build_optimizer("AdamW", groups(down2, up2, 1e-2), 1e-2)
    load_optimizer_state(resumed, state)
    assert [g["fused"] for g in resumed.param_groups] == [None if saved_fused else True] * 2
    _steps(first, loss, 5)
    _steps(resumed, loss2, 5)
    for a, b in ((down.weight, down2.weight), (up.weight, up2.weight)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), float((a - b).abs().max())
    assert resumed.state[down2.weight]["step"] == 10
