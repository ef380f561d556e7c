"""Which network a config asks for: sd-scripts' `networks.lora` (LoRA, and LoCon with `conv_dim`) or
LyCORIS' `lycoris.kohya` with `algo=` and its options in network_args, read as LyCORIS' kohya
wrapper reads them (its defaults included: LyCORIS trains the 3x3 convs with `conv_dim` =
`network_dim` unless the preset leaves them out)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from lora_train.errors import UserError, close_match_hint, msg
from lora_train.network.module import NetworkModule

SD_SCRIPTS = ("networks.lora", "lora")
DYLORA = "networks.dylora"  # sd-scripts' DyLoRA
LYCORIS = "lycoris.kohya"
# LyCORIS' module options, by its network_args names (old names are read as these: train/config.py)
OPTION_NAMES = ("use_tucker", "use_scalar", "factor", "decompose_both", "full_matrix", "unbalanced_factorization",
                "constraint", "rescaled", "train_on_input", "rank_dropout_scale", "unit")


@dataclass
class NetworkKind:
    module: str = "networks.lora"
    algo: str = "lora"
    preset: str = "full"
    dora: bool = False
    wd_on_out: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    train_norm: bool = False

    @property
    def is_lycoris(self) -> bool:
        return self.module == LYCORIS

    @property
    def is_default(self) -> bool:
        """sd-scripts' networks.lora: LoRA, and LoCon with conv_dim."""
        return self.module in SD_SCRIPTS

    def classes(self) -> tuple[type[NetworkModule], type[NetworkModule]]:
        """The module classes for Linear / 1x1 targets and for larger convs."""
        from lora_train.network import algorithms

        return algorithms.classes_for(self.algo)

    def options_for(self, cls: type[NetworkModule]) -> dict[str, Any]:
        """The options `cls` reads (LyCORIS passes every option to every algorithm, which ignores the rest)."""
        names = option_names(cls)
        return {k: v for k, v in self.options.items() if k in names}

    def ignored(self) -> list[str]:
        """Options set that the chosen algorithm does not read, for a note."""
        linear, conv = self.classes()
        read = set(self.options_for(linear)) | set(self.options_for(conv))
        return sorted(k for k in self.options if k not in read)

    def network_args(self) -> dict[str, str]:
        """What `ss_network_args` records of the kind (LyCORIS writes its args as strings)."""
        if not self.is_lycoris:
            return {}
        out = {"algo": self.algo, "preset": self.preset}
        if self.dora:
            out["dora_wd"] = "True"
            out["wd_on_output"] = str(self.wd_on_out)
        if self.train_norm:
            out["train_norm"] = "True"
        out.update({("block_size" if k == "unit" else k): str(v) for k, v in self.options.items()})
        return out


def option_names(cls: type[NetworkModule]) -> set[str]:
    """The keyword options a module class takes: those its (and its bases') __init__ names, and the
    `extra_options` of one that reads them from **options."""
    names = set(getattr(cls, "extra_options", ()))
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                      if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names & set(OPTION_NAMES)


def network_kind(network) -> NetworkKind:
    """The kind a `NetworkConfig` asks for; a module or algorithm LoRA Train cannot train is a
    UserError saying what it can."""
    from lora_train.network import algorithms, targets

    module = network.network_module
    if module == DYLORA:
        # sd-scripts' DyLoRA: LoRA's targets and conv_dim, ranks trained in steps of `unit` (default 1)
        return NetworkKind(DYLORA, "dylora", options={"unit": network.unit or 1})
    if module in SD_SCRIPTS:
        lycoris_only = [k for k in ("algo", "preset", "dora_wd", "train_norm") if getattr(network, k, None)]
        if lycoris_only:
            raise UserError(msg("network_args {keys}: LyCORIS' options; set network_module = \"lycoris.kohya\" to use them",
                                keys=", ".join(lycoris_only)))
        return NetworkKind()
    if module != LYCORIS:
        raise UserError(msg("network_module '{value}' is not supported (use networks.lora, networks.dylora or lycoris.kohya){hint}",
                            value=module, hint=close_match_hint(module, SD_SCRIPTS + (DYLORA, LYCORIS))))
    algo = (network.algo or "lora").lower()
    if algo not in algorithms.LYCORIS_ALGOS:
        known = ", ".join(sorted(algorithms.LYCORIS_ALGOS))
        raise UserError(msg("network_args algo '{algo}' is not one LoRA Train trains (it trains {known}){hint}",
                            algo=algo, known=known, hint=close_match_hint(algo, algorithms.LYCORIS_ALGOS)))
    preset = network.preset or "full"
    if preset not in targets.PRESETS:
        raise UserError(msg("network_args preset '{preset}' is not one of {known}{hint}", preset=preset,
                            known=", ".join(targets.PRESETS), hint=close_match_hint(preset, targets.PRESETS)))
    options = {k: getattr(network, k) for k in OPTION_NAMES if getattr(network, k, None) not in (None, False)}
    if options.get("factor") == -1:
        del options["factor"]  # LyCORIS' "not set"
    if algo == "dylora":
        from lora_train.network.dylora import LYCORIS_BLOCK_SIZE

        options.setdefault("unit", LYCORIS_BLOCK_SIZE)
    if network.dora_wd and algo not in algorithms.DORA_ALGOS:
        raise UserError(msg("network_args dora_wd: DoRA goes with algo {algos}, not {algo}", algos=", ".join(algorithms.DORA_ALGOS), algo=algo))
    # A1111 v1.10 reads every dora_scale as taken per input column: files it renders right need that
    wd_on_out = bool(network.wd_on_output) if network.wd_on_output is not None else False
    return NetworkKind(LYCORIS, algo, preset, bool(network.dora_wd), wd_on_out, options, bool(network.train_norm))
