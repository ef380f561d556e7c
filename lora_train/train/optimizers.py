"""Optimizers by sd-scripts' `optimizer_type` names, with its `optimizer_args` and its per-optimizer rules.

Optional packages (lion-pytorch, prodigyopt, dadaptation, schedulefree, bitsandbytes) are imported only
when their optimizer is asked for, so a missing one costs nothing until then.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from lora_train.errors import UserError, close_match_hint, msg

OptimizerArgs = Union[list[str], str, dict[str, Any], None]

# lower-case name -> (module, class, pip package). Case-insensitive like sd-scripts' get_optimizer.
_NAMED: dict[str, tuple[str, str, str]] = {
    "adamw": ("torch.optim", "AdamW", "torch"),
    "sgdnesterov": ("torch.optim", "SGD", "torch"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "dadaptadam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptadan": ("dadaptation", "DAdaptAdan", "dadaptation"),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    "dadaptlion": ("dadaptation", "DAdaptLion", "dadaptation"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD", "dadaptation"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree", "schedulefree"),
}

# bitsandbytes optimizers: lower-case name -> (bnb class, what to pick without an NVIDIA GPU)
_BNB: dict[str, tuple[str, str]] = {
    "adamw8bit": ("AdamW8bit", "AdamW"),
    "pagedadamw8bit": ("PagedAdamW8bit", "AdamW"),
    "pagedadamw": ("PagedAdamW", "AdamW"),
    "pagedadamw32bit": ("PagedAdamW32bit", "AdamW"),
    "lion8bit": ("Lion8bit", "Lion"),
    "pagedlion8bit": ("PagedLion8bit", "Lion"),
    "sgdnesterov8bit": ("SGD8bit", "SGDNesterov"),
}

# The spelling sd-scripts documents, for messages and suggestions.
KNOWN_NAMES = [
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit", "PagedLion8bit",
    "SGDNesterov", "SGDNesterov8bit", "Adafactor", "Prodigy", "DAdaptation", "DAdaptAdamPreprint", "DAdaptAdaGrad",
    "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "RAdamScheduleFree", "AdamWScheduleFree",
    "SGDScheduleFree",
]


@dataclass
class _Built:
    ss_name: str  # sd-scripts' ss_optimizer string
    adafactor_initial_lr: Optional[float]  # set when Adafactor computes its own LR (relative_step)


# What build_optimizer knew about each optimizer it made; weak so it never keeps one alive.
_BUILT: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _Built]" = weakref.WeakKeyDictionary()


def parse_optimizer_args(args: OptimizerArgs, what: str = "optimizer_args") -> dict[str, Any]:
    """sd-scripts' `key=value` strings, values as Python literals (`betas=(0.9,0.99)`, `decouple=True`)."""
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, str):
        # GUIs write one string; split before each `key=` so `betas=(0.9, 0.99)` stays whole
        args = [a for a in re.split(r"\s+(?=[A-Za-z_]\w*\s*=)", args.strip()) if a]
    out: dict[str, Any] = {}
    for item in args:
        key, sep, raw = str(item).partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key.isidentifier():
            raise UserError(msg("{what}: '{item}' is not key=value", what=what, item=item))
        out[key] = _literal(raw, key, what)
    return out


def _literal(raw: str, key: str, what: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false", "none"):  # TOML and GUIs spell these in lower case
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise UserError(msg("{what}: the value of '{key}' ({raw}) is not a number, True/False, a tuple or a quoted string",
                            what=what, key=key, raw=raw))


def build_optimizer(
    name: str,
    param_groups: list[dict],
    lr: float,
    optimizer_args: OptimizerArgs = None,
    notes: Optional[list[str]] = None,
) -> torch.optim.Optimizer:
    """The optimizer sd-scripts' get_optimizer would build for `optimizer_type=name`.

    `param_groups` are copied, never changed. Advice sd-scripts logs as a warning is appended to `notes`.
    """
    notes = notes if notes is not None else []
    name = (name or "AdamW").strip()
    key = name.lower()
    kwargs = parse_optimizer_args(optimizer_args)
    groups = [dict(g, params=list(g["params"])) if "params" in g else dict(g) for g in param_groups]
    construct: dict[str, Any] = {}  # passed to the class but, like sd-scripts, not shown in ss_optimizer
    initial_lr: Optional[float] = None

    if key in _BNB or key.startswith("bitsandbytes."):
        cls = _bitsandbytes_class(name, key)
    elif key in _NAMED:
        module, attr, package = _NAMED[key]
        cls = _import_class(module, attr, package, name)
    else:
        cls = _any_class(name)

    if key in ("sgdnesterov", "sgdnesterov8bit"):
        kwargs.setdefault("momentum", 0.9)  # nesterov needs momentum; sd-scripts fills in 0.9
        construct["nesterov"] = True
    elif key == "adafactor":
        lr, initial_lr = _adafactor_rules(kwargs, groups, lr, notes)
    elif key.startswith("dadapt") or key == "prodigy":
        _adaptive_lr_notes(groups, lr, notes)

    args = {**kwargs, **construct}
    opt = _fused_on_cpu(cls, groups, lr, args) or _construct(cls, name, groups, lr, args)
    _BUILT[opt] = _Built(_class_path(cls) + (f"({_format_args(kwargs)})" if kwargs else ""), initial_lr)
    optimizer_train_mode(opt)  # schedule-free ones start in eval mode; training expects train mode
    return opt


def _fused_on_cpu(cls: type, groups: list[dict], lr: Optional[float], kwargs: dict) -> Optional[torch.optim.Optimizer]:
    """torch's AdamW / Adam with its one-kernel update (`fused=True`), where the parameters are all on the
    CPU and this torch has that kernel (2.4 and newer; the WebUI's 2.1 has it for CUDA only and refuses it
    here, and then the caller builds the plain one). The result is the same update to float rounding. On
    the CPU the default update runs one small op after another over every tensor: for SDXL's 1,444 LoRA
    tensors that was 4 % of a 256 px step, and fused takes about a quarter of that. A user's own `fused`
    or `foreach` is left alone, and so is any other device (a GPU run keeps torch's own default)."""
    if cls not in (torch.optim.AdamW, torch.optim.Adam) or "fused" in kwargs or "foreach" in kwargs:
        return None
    params = [p for g in groups for p in g["params"]]
    if not params or any(not isinstance(p, torch.Tensor) or p.device.type != "cpu" for p in params):
        return None
    try:
        # copies: torch fills each group with its defaults (fused=True among them) before it refuses, and the
        # caller builds the plain one from the same groups
        return cls([dict(g) for g in groups], lr=lr, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return None


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """`opt.load_state_dict(state)`, keeping how this torch runs the update. torch copies every group's
    `fused` and `foreach` from the state, so a run saved where the plain update ran (torch 2.1) would
    resume without the fused one, and a fused state resumed under torch 2.1 would ask 2.1 for a CPU
    kernel it does not have."""
    kept = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, flags in zip(opt.param_groups, kept):
        group.update(flags)


def _adafactor_rules(kwargs: dict, groups: list[dict], lr: float, notes: list[str]) -> tuple[None | float, None | float]:
    """sd-scripts' Adafactor: relative_step defaults on; then Adafactor sets its own LR and `lr` only labels it."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        notes.append(msg("Adafactor: relative_step set to True because warmup_init is True"))
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            notes.append(msg("Adafactor: clip_threshold=1.0 is recommended"))
        return lr, None
    if lr:
        notes.append(msg("Adafactor with relative_step: the learning rate {lr} is only the initial value the scheduler reports", lr=lr))
    popped = [g.pop("lr", None) for g in groups]  # transformers refuses an explicit lr with relative_step
    if any(p is not None for p in popped):
        notes.append(msg("Adafactor with relative_step: unet_lr and text_encoder_lr are ignored"))
    return None, lr


def _adaptive_lr_notes(groups: list[dict], lr: float, notes: list[str]) -> None:
    """D-Adaptation and Prodigy find the step size themselves; lr is a multiplier that should be about 1."""
    first = groups[0].get("lr", lr) if groups else lr
    if first is not None and first <= 0.1:
        notes.append(msg("D-Adaptation/Prodigy: learning rate {lr} is low; set it around 1.0", lr=first))
    if len({g.get("lr", first) for g in groups}) > 1:
        notes.append(msg("D-Adaptation/Prodigy: with several learning rates only the first one ({lr}) takes effect", lr=first))


def _bitsandbytes_class(name: str, key: str) -> type:
    if not torch.cuda.is_available():
        # bitsandbytes on a machine without CUDA fails at import or at the first step, so stop here
        instead = _BNB.get(key, ("", "AdamW"))[1]
        raise UserError(msg(
            "optimizer_type '{name}' is an 8-bit bitsandbytes optimizer and needs an NVIDIA GPU with CUDA, "
            "which this machine does not have; use optimizer_type = \"{instead}\" instead", name=name, instead=instead))
    if key in _BNB:
        return _import_class("bitsandbytes.optim", _BNB[key][0], "bitsandbytes", name)
    module, _, attr = name.rpartition(".")
    return _import_class(module, attr, "bitsandbytes", name)


def _import_class(module: str, attr: str, package: str, name: str) -> type:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UserError(msg("optimizer_type '{name}' needs the {package} package: pip install {package} ({error})",
                            name=name, package=package, error=e))
    cls = getattr(mod, attr, None)
    if cls is None:
        raise UserError(msg("optimizer_type '{name}': {module} has no {attr} (the installed {package} may be too old)",
                            name=name, module=module, attr=attr, package=package))
    return cls


def _any_class(name: str) -> type:
    """A bare torch.optim class name or a dotted `package.module.Class`, as sd-scripts allows."""
    if "." not in name:
        classes = {n for n in dir(torch.optim) if inspect.isclass(getattr(torch.optim, n))}
        # sd-scripts is case-sensitive here; a case slip has only one sensible meaning, so accept it
        found = next((n for n in sorted(classes) if n.lower() == name.lower()), None)
        if found is None:
            hint = close_match_hint(name, KNOWN_NAMES + sorted(classes))
            raise UserError(msg("unknown optimizer_type '{name}'{hint}; known: {known}, "
                                "any torch.optim class, or a dotted path like pytorch_optimizer.CAME",
                                name=name, hint=hint, known=", ".join(KNOWN_NAMES)))
        return getattr(torch.optim, found)
    module, _, attr = name.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise UserError(msg("optimizer_type '{name}': cannot import {module} ({error}); install the package that provides "
                            "it (often: pip install {top})", name=name, module=module, error=e, top=top))
    cls = getattr(mod, attr, None)
    if not callable(cls):
        public = [n for n in dir(mod) if not n.startswith("_")]
        raise UserError(msg("optimizer_type '{name}': {module} has no class {attr}{hint}",
                            name=name, module=module, attr=attr, hint=close_match_hint(attr, public)))
    return cls


def _construct(cls: type, name: str, groups: list[dict], lr: Optional[float], kwargs: dict) -> torch.optim.Optimizer:
    try:
        return cls(groups, lr=lr, **kwargs)
    except TypeError as e:
        params = _accepted_args(cls)
        unknown = [k for k in kwargs if params is not None and k not in params]
        if unknown:
            hint = close_match_hint(unknown[0], params or [])
            raise UserError(msg("optimizer_args: {cls} has no argument '{arg}'{hint}",
                                cls=_class_path(cls), arg=unknown[0], hint=hint)) from e
        raise UserError(msg("optimizer_type '{name}' ({cls}): {error}", name=name, cls=_class_path(cls), error=e)) from e
    except ValueError as e:  # the classes check their own ranges (lr, betas, eps): all the user's input
        raise UserError(msg("optimizer_type '{name}' ({cls}): {error}", name=name, cls=_class_path(cls), error=e)) from e


def _accepted_args(cls: type) -> Optional[list[str]]:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None  # takes anything: the TypeError came from elsewhere
    return [p.name for p in params if p.name not in ("self", "params")]


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def _format_args(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items())  # sd-scripts' own format: str() of each value


def optimizer_name(opt: torch.optim.Optimizer) -> str:
    """sd-scripts' `ss_optimizer`: `module.Class` plus `(key=value,...)` of optimizer_args when there are any."""
    built = _BUILT.get(opt)
    return built.ss_name if built else _class_path(type(opt))


def adafactor_initial_lr(opt: torch.optim.Optimizer) -> Optional[float]:
    """The LR to report before Adafactor's first step, when it sets its own LR (relative_step); else None."""
    built = _BUILT.get(opt)
    if built and built.adafactor_initial_lr is not None:
        return built.adafactor_initial_lr
    if any(g.get("relative_step") for g in opt.param_groups) and type(opt).__name__ == "Adafactor":
        return 0.0  # built elsewhere: transformers' own default
    return None


def is_schedule_free(opt: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers switch weights between train() and eval() and run without an LR schedule."""
    return callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))


def optimizer_train_mode(opt: torch.optim.Optimizer) -> None:
    """Call before training steps; a no-op for optimizers without modes."""
    if is_schedule_free(opt):
        opt.train()


def optimizer_eval_mode(opt: torch.optim.Optimizer) -> None:
    """Call before sampling or saving, so the weights used are the averaged ones; a no-op without modes."""
    if is_schedule_free(opt):
        opt.eval()
