"""Which algorithm a file's module belongs to, read from its key suffixes.

A LoRA file holds `<module name>.<suffix>` keys. Each algorithm LoRA Train can load (a
`NetworkModule` subclass, one file each) lists the suffixes it owns; a module is built by the first
algorithm in `ALGORITHMS` whose required keys are there and that trains that target. A key no
listed algorithm owns is an error naming the key and, when it is known, the algorithm it belongs to:
dropping it would render a DoRA, LoHa, ... file as something else, silently.

Adding an algorithm is one file (its `NetworkModule` subclass) and one entry in `ALGORITHMS`; its
suffixes then stop being reported by `NOT_YET`.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from lora_train.errors import UserError, msg
from lora_train.network.full import Full
from lora_train.network.glora import GLoRA
from lora_train.network.ia3 import IA3
from lora_train.network.locon import LoCon
from lora_train.network.loha import LoHa
from lora_train.network.lokr import LoKr
from lora_train.network.lora import LoRA
from lora_train.network.module import NetworkModule
from lora_train.network.dylora import DyLoRA
from lora_train.network.norm import Norm
from lora_train.network.oft import BOFT, DiagOFT

# The first algorithm that claims a module's keys (`claims`) and trains its target (`accepts`) builds it: LoRA and LoCon
# share their keys and split the targets (LoCon: convs with a kernel larger than 1x1); Diag-OFT and BOFT share
# theirs and split by the shape of oft_blocks (`fits`).
ALGORITHMS: tuple[type[NetworkModule], ...] = (LoRA, LoCon, LoHa, LoKr, IA3, Full, GLoRA, DiagOFT, BOFT, Norm)
# Keys any algorithm's module may carry besides its own: DoRA's magnitude (`NetworkModule.enable_dora`)
SHARED_SUFFIXES = ("dora_scale",)

# LyCORIS' `algo=` names -> the module classes for Linear / 1x1 targets and for larger convs
LYCORIS_ALGOS: dict[str, tuple[type[NetworkModule], type[NetworkModule]]] = {
    "lora": (LoRA, LoCon), "locon": (LoRA, LoCon), "loha": (LoHa, LoHa), "lokr": (LoKr, LoKr), "ia3": (IA3, IA3),
    "full": (Full, Full), "glora": (GLoRA, GLoRA), "diag-oft": (DiagOFT, DiagOFT), "boft": (BOFT, BOFT),
    "dylora": (DyLoRA, DyLoRA),  # trains like this, saves as LoRA / LoCon (its files load as those)
}
# the algorithms DoRA goes with (LyCORIS ignores dora_wd for the rest)
DORA_ALGOS = ("lora", "locon", "loha", "lokr")


def classes_for(algo: str) -> tuple[type[NetworkModule], type[NetworkModule]]:
    return LYCORIS_ALGOS[algo]

# Suffixes of algorithms LoRA Train cannot load yet (LyCORIS' module classes, kohya's OFT, and what
# the WebUI's network_*.py loaders claim), with what they belong to.
NOT_YET: dict[str, str] = {
    "lokr_t1": "LoKr",  # LyCORIS lists it but never writes it
    "oft_diag": "OFT",  # older LyCORIS OFT
    "bm.weight": "GLoRA",  # LyCORIS' GLoRA with Tucker, which its own 4.x never builds
    "lora_mid.weight": msg("LoCon with Tucker/CP decomposition"),
    **dict.fromkeys(("lora_A.weight", "lora_B.weight"), msg("LoRA in PEFT/diffusers key names (lora_A/lora_B)")),
    "scale": msg("a per-module scale that overrides alpha/rank"),
    "bias": msg("a bias difference"),
}
UNKNOWN = msg("no network algorithm LoRA Train knows")
BUNDLED_EMBEDDING = "bundle_emb."  # the WebUI's textual-inversion embeddings bundled in a LoRA file


class UnsupportedKeyError(UserError, KeyError):
    """A file key LoRA Train cannot load. A KeyError (what loaders of a file that does not fit catch)
    and a UserError (what the CLI and UI print without a traceback)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class NoFitError(KeyError):
    """A file (or network) whose modules or shapes do not fit the model; its str() is the message
    itself, unquoted, so it can be shown and translated as it is."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def split_key(key: str) -> tuple[str, str]:
    """(module name, suffix) of a file key: `lora_unet_x.lora_down.weight` -> (`lora_unet_x`, `lora_down.weight`)."""
    name, _, suffix = key.partition(".")
    return name, suffix


def owner(suffix: str) -> type[NetworkModule] | None:
    return next((cls for cls in ALGORITHMS if suffix in cls.suffixes or suffix in SHARED_SUFFIXES), None)


def what_owns(key: str) -> str | None:
    """What a key belongs to when no algorithm LoRA Train loads owns it (None when one does)."""
    if key.startswith(BUNDLED_EMBEDDING):
        return msg("a bundled textual-inversion embedding")
    name, suffix = split_key(key)
    if name and owner(suffix) is not None:
        return None
    return NOT_YET.get(suffix, UNKNOWN)


def unsupported(key: str, kind: str, others: int = 0) -> UnsupportedKeyError:
    more = (" " + (msg("({count} more key like it)", count=others) if others == 1 else msg("({count} more keys like it)", count=others))
            if others else "")
    known = ", ".join(cls.algorithm for cls in ALGORITHMS)
    if kind == UNKNOWN:
        return UnsupportedKeyError(msg("key '{key}' belongs to {kind} (it loads {known}){more}", key=key, kind=kind, known=known, more=more))
    return UnsupportedKeyError(msg("key '{key}' belongs to {kind}, which LoRA Train cannot load yet (it loads {known}){more}",
                                   key=key, kind=kind, known=known, more=more))


def check_keys(keys: Iterable[str]) -> None:
    """Raise for the first key no loadable algorithm owns, naming it and what it belongs to."""
    bad = [(k, kind) for k in keys if (kind := what_owns(k)) is not None]
    if bad:
        # name a known algorithm rather than an unknown key when a file has both
        key, kind = min(bad, key=lambda b: b[1] == UNKNOWN)
        raise unsupported(key, kind, len(bad) - 1)


def group(state: Iterable[str]) -> dict[str, set[str]]:
    """The suffixes of each module in a file's keys."""
    modules: dict[str, set[str]] = {}
    for key in state:
        name, suffix = split_key(key)
        modules.setdefault(name, set()).add(suffix)
    return modules


def module_class(name: str, suffixes: set[str], org: nn.Module, part: str | None = None,
                 weights: dict | None = None) -> type[NetworkModule]:
    """The algorithm that builds module `name` from its file keys `suffixes` (and, where two share
    their keys, the `weights`' shapes), on target `org`."""
    own = suffixes - set(SHARED_SUFFIXES)
    for cls in ALGORITHMS:
        if cls.claims(own) and cls.accepts(org, part) and (weights is None or not hasattr(cls, "fits") or cls.fits(weights)):
            extra = sorted(own - set(cls.suffixes))
            check_keys(f"{name}.{s}" for s in extra)
            if extra:  # keys of another algorithm LoRA Train loads
                raise UnsupportedKeyError(msg("key '{key}' belongs to {other}, but {name} also has keys of {algorithm}: one module holds one algorithm",
                                              key=f"{name}.{extra[0]}", other=owner(extra[0]).algorithm, name=name, algorithm=cls.algorithm))
            return cls
    check_keys(f"{name}.{s}" for s in sorted(suffixes))
    # the algorithm most of the module's own keys belong to (alpha is everyone's)
    overlap = {cls: len((own - {"alpha"}) & set(cls.suffixes)) for cls in ALGORITHMS if cls.accepts(org, part)}
    partial = max(overlap, key=overlap.get) if overlap and max(overlap.values()) else None
    if partial is not None:
        needs = [s for s in partial.suffixes if s not in partial.optional]
        missing = [s for s in needs if s not in suffixes]
        raise NoFitError(msg("{name}: {missing} missing ({algorithm} needs {needs})", name=name, missing=" and ".join(missing),
                             algorithm=partial.algorithm, needs=" and ".join(needs)))
    raise NoFitError(msg("{name}: no algorithm LoRA Train loads trains a {type} ({known})", name=name, type=type(org).__name__,
                         known=", ".join(cls.algorithm for cls in ALGORITHMS)))
