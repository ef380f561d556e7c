"""A LoRA / LoCon network over a model's target modules, in kohya's key names."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from lora_train.errors import msg
from lora_train.network import algorithms, blocks
from lora_train.network.algorithms import NoFitError
from lora_train.network.blocks import LrWeights
from lora_train.network.locon import LoCon
from lora_train.network.lora import LoRA
from lora_train.network.module import NetworkModule
from lora_train.network.norm import Norm
from lora_train.network.kind import NetworkKind
from lora_train.network.targets import IA3_ON_INPUT, Target

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)


class LoRANetwork(nn.Module):
    """LoRA on Linear and 1x1 conv (`dim`/`alpha`), LoCon on larger convs (`conv_dim`/`conv_alpha`), or
    the LyCORIS algorithm a `kind` names (LoHa, LoKr, ... with its options, DoRA on top).

    Modules are registered under their kohya names, so `state_dict()` is the file's key set. Block-wise
    ranks and LR weights follow the block layout of the targets' names (SD1/SD2 or SDXL).
    A network rebuilt from a file (`from_state_dict`) holds whichever algorithm each module's keys
    belong to (`network/algorithms.py`).
    """

    def __init__(
        self,
        targets: Iterable[Target],
        dim: int = 4,
        alpha: float | None = 1.0,
        conv_dim: int | None = None,
        conv_alpha: float | None = None,
        seed: int = 0,
        *,
        block_dims: str | None = None,
        block_alphas: str | None = None,
        conv_block_dims: str | None = None,
        conv_block_alphas: str | None = None,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        lr_weights: LrWeights | None = None,
        kind: NetworkKind | None = None,
    ):
        super().__init__()
        if dim < 1:
            raise ValueError("network_dim must be at least 1")
        self.dim, self.alpha = dim, alpha
        self.conv_dim, self.conv_alpha = conv_dim, conv_alpha
        self.lr_weights = lr_weights
        generator = torch.Generator().manual_seed(seed)
        self.dropout_generator = torch.Generator().manual_seed(seed + 1)
        targets = list(targets)
        self.layout = blocks.layout_of(t.name for t in targets)
        dims, alphas, conv_dims, conv_alphas = blocks.dims_and_alphas(
            block_dims, block_alphas, alpha, conv_block_dims, conv_block_alphas, conv_dim, conv_alpha, layout=self.layout
        )
        if lr_weights is not None:
            lr_weights.bind(self.layout)  # SDXL has 9 blocks a side: a count for SD1/SD2 is an error here
        self._targets: dict[str, nn.Module] = {}
        self.kind = kind
        linear_class, conv_class = kind.classes() if kind else (LoRA, LoCon)
        for t in targets:
            idx = self.layout.index(t.name) if t.name.startswith("lora_unet_") else -1
            if t.is_conv3x3:
                rank, a = (conv_dims[idx], conv_alphas[idx]) if (idx >= 0 and conv_dims) else (conv_dim, conv_alpha)
            elif idx >= 0 and dims is not None:
                rank, a = dims[idx], alphas[idx]
            else:
                rank, a = dim, alpha
            if not rank:
                continue  # no conv_dim, or a block given rank 0
            if isinstance(t.module, NORM_LAYERS):  # LyCORIS' train_norm: whatever the algorithm, a norm gets Norm
                self.add_module(t.name, Norm(t.name, t.module, 1, None, part=t.part))
                self._targets[t.name] = t.module
                continue
            algorithm = conv_class if t.is_conv3x3 else linear_class
            options = kind.options_for(algorithm) if kind else {}
            if kind and kind.preset == "ia3" and t.name.endswith(IA3_ON_INPUT):
                options["train_on_input"] = True  # LyCORIS' ia3 preset: the MLP's output layer scales its input
            module = algorithm(t.name, t.module, rank, a, generator, part=t.part, **options)
            if kind and kind.dora:
                module.enable_dora(kind.wd_on_out)
            self.add_module(t.name, module)
            self._targets[t.name] = t.module
        self.set_dropout(dropout, rank_dropout, module_dropout)

    @property
    def lora_modules(self) -> dict[str, NetworkModule]:
        return dict(self.named_children())

    @property
    def is_locon(self) -> bool:
        return any(isinstance(m, LoCon) for m in self.children())

    # -- hooking -----------------------------------------------------------------------------
    def apply(self, targets: dict[str, nn.Module] | None = None) -> None:
        """Hook every LoRA module onto its target (the modules it was built for by default)."""
        targets = self._targets if targets is None else targets
        missing = [name for name in self.lora_modules if name not in targets]
        if missing:
            raise NoFitError(msg("{count} LoRA modules have no target in this model (first: {name})", count=len(missing), name=missing[0]))
        attached = []
        try:
            for name, module in self.lora_modules.items():
                module.attach(targets[name])
                attached.append(module)
        except BaseException:
            for module in attached:
                module.detach()
            raise

    def remove(self) -> None:
        """Unhook everything; the model is then exactly as before `apply`."""
        for module in self.children():
            module.detach()

    @contextlib.contextmanager
    def applied(self, targets: dict[str, nn.Module] | None = None):
        self.apply(targets)
        try:
            yield self
        finally:
            self.remove()

    def set_dropout(self, dropout: float | None, rank_dropout: float | None, module_dropout: float | None) -> None:
        """sd-scripts' three dropouts, drawn from this network's own generator."""
        for module in self.children():
            module.dropout, module.rank_dropout, module.module_dropout = dropout, rank_dropout, module_dropout
            module.dropout_generator = self.dropout_generator

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.children():
            module.multiplier = multiplier

    # -- training ----------------------------------------------------------------------------
    def param_groups(self, unet_lr: float, te_lr: float | None, train_unet: bool = True, train_te: bool = True) -> list[dict]:
        """One group for the text encoder, and for the UNet one per learning-rate weight (block-wise
        LR); groups whose LR is 0 are left out, so their modules stay as initialised."""
        groups = []
        te = [p for n, m in self.lora_modules.items() if not n.startswith("lora_unet_") for p in m.parameters()]
        if train_te and te and te_lr:
            groups.append({"params": te, "lr": te_lr, "name": "textencoder"})
        if train_unet:
            by_weight: dict[float, list] = {}
            for n, m in self.lora_modules.items():
                if n.startswith("lora_unet_"):
                    w = self.lr_weights.weight(n) if self.lr_weights else 1.0
                    by_weight.setdefault(w, []).extend(m.parameters())
            for w, params in by_weight.items():
                if unet_lr * w:
                    groups.append({"params": params, "lr": unet_lr * w, "name": "unet" if w == 1.0 else f"unet_x{w:g}"})
        return _magnitudes_apart(groups, {id(m.dora_scale) for m in self.children() if m.dora_scale is not None})

    # -- file format ---------------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        return state

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy weights in. Not strict (sd-scripts' network_weights): keys on one side only are
        skipped, but a key on both sides must have the same shape, and a key of an algorithm LoRA
        Train cannot load is an error (skipping it would train on something else than the file)."""
        algorithms.check_keys(state)
        own = self.state_dict()
        unknown = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        if strict and (unknown or missing):
            raise NoFitError(msg("LoRA keys do not match this network: {missing} missing (e.g. {missing_example}), {unknown} unknown (e.g. {unknown_example})",
                                 missing=len(missing), missing_example=missing[:1], unknown=len(unknown), unknown_example=unknown[:1]))
        here = self.lora_modules
        mixed = [k for k in unknown if algorithms.split_key(k)[0] in here]
        if mixed:  # a module both sides have, of another algorithm (or with DoRA on one side only): not skippable
            name = algorithms.split_key(mixed[0])[0]
            raise NoFitError(msg("{key}: the file's {name} is not {algorithm} as here (its keys: {keys})", key=mixed[0], name=name,
                                 algorithm=_described(here[name]), keys=", ".join(sorted(algorithms.split_key(k)[1] for k in state if k.startswith(name + ".")))))
        state = {k: v.reshape(own[k].shape) if k in own and _same_but_1x1(v.shape, own[k].shape) else v for k, v in state.items()}
        wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
        if wrong:
            raise NoFitError(msg("{count} LoRA weights have another shape here (first: {key} {shape} vs {own}); set network_dim/conv_dim to the file's ranks or use dim_from_weights",
                                 count=len(wrong), key=wrong[0], shape=tuple(state[wrong[0]].shape), own=tuple(own[wrong[0]].shape)))
        # through load_state_dict, so a module's own load hooks run (use_scalar folds its scalar into a saved key)
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        for m in self.children():
            m.refresh()

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], targets: Iterable[Target]) -> "LoRANetwork":
        """Rebuild a network from a kohya state dict: each module's algorithm comes from its keys, its
        rank and alpha from the file. A key no algorithm here loads is an error naming it and the
        algorithm it belongs to (DoRA, LoHa, ...), never dropped."""
        algorithms.check_keys(state)
        by_name = {t.name: t for t in targets}
        modules = algorithms.group(state)
        unmatched = [n for n in modules if n not in by_name]
        if unmatched:
            raise NoFitError(msg("{count} modules in the file have no target in this model (first: {name})", count=len(unmatched), name=unmatched[0]))
        net = cls([], dim=1)
        for name, suffixes in modules.items():
            target = by_name[name]
            weights = {suffix: state[f"{name}.{suffix}"] for suffix in suffixes}
            algorithm = algorithms.module_class(name, suffixes, target.module, target.part, weights)
            module = algorithm.from_weights(name, target.module, weights, part=target.part)
            if "dora_scale" in weights:
                _enable_dora_from(module, weights["dora_scale"])
            net.add_module(name, module)
            net._targets[name] = target.module
        net.load_kohya_state_dict(dict(state) | _missing_alphas(net, state))
        return net


def _magnitudes_apart(groups: list[dict], magnitudes: set[int]) -> list[dict]:
    """DoRA's magnitudes in groups of their own without weight decay: they start at the base weight's
    norm, and decaying them towards 0 would shrink the base model under every prompt, not train the
    LoRA (AdamW's default decay is 0.01). Same learning rate and name as the group they came from."""
    if not magnitudes:
        return groups
    out = []
    for g in groups:
        own = [p for p in g["params"] if id(p) not in magnitudes]
        apart = [p for p in g["params"] if id(p) in magnitudes]
        out += [dict(g, params=own)] if own else []
        out += [dict(g, params=apart, weight_decay=0.0)] if apart else []
    return out


def _same_but_1x1(a: torch.Size, b: torch.Size) -> bool:
    """LyCORIS writes some conv factors 2-D ((out, rank)) where sd-scripts writes (out, rank, 1, 1)."""
    return a != b and (tuple(a) + (1, 1) == tuple(b) or tuple(b) + (1, 1) == tuple(a))


def _described(module: NetworkModule) -> str:
    return f"DoRA/{module.algorithm}" if module.dora_scale is not None else module.algorithm


def _missing_alphas(net: LoRANetwork, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # only algorithms that write an alpha (IA3 and full have none)
    return {f"{n}.alpha": m.alpha.clone() for n, m in net.lora_modules.items() if f"{n}.alpha" not in state and "alpha" in m.suffixes}


def _enable_dora_from(module: NetworkModule, dora_scale: torch.Tensor) -> None:
    """DoRA on a module rebuilt from a file: the direction of its norm comes from dora_scale's shape."""
    from lora_train.network import dora

    try:
        module.enable_dora(dora.on_out(dora_scale, module.target_shape))
    except TypeError as e:
        raise NoFitError(msg("{name}.dora_scale: {algorithm} has no DoRA", name=module.lora_name, algorithm=module.algorithm)) from e
    if module.dora_scale.shape != dora_scale.shape:
        raise NoFitError(msg("{name}.dora_scale: shape {shape} does not fit a weight of shape {weight}", name=module.lora_name,
                                        shape=tuple(dora_scale.shape), weight=tuple(module.target_shape)))


def network_from_file(path, targets: Iterable[Target]) -> "LoRANetwork":
    """A network rebuilt from a LoRA file (ranks and alphas from the file) over `targets`; a file
    that does not fit this model, or holds an algorithm LoRA Train cannot load, names itself."""
    from lora_train.errors import UserError
    from lora_train.network.files import load_lora

    tensors, _ = load_lora(path)
    try:
        return LoRANetwork.from_state_dict(tensors, targets)
    except KeyError as e:
        raise UserError(msg("'{path}' does not fit this model: {reason}", path=path, reason=e.args[0] if e.args else e)) from e

