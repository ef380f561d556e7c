"""Which folders the UI may read and change, decided the way the WebUI decides for extensions.

A WebUI reachable from other machines (--listen, --share, --server-name) without
--enable-insecure-extension-access is one where a stranger may type a path. There, folders must
sit under allowed roots (the WebUI's data dir, its train folder, roots from our settings), and
moving files and downloading models are refused. --hide-ui-dir-config asks for the same path
limits locally. Paths are compared after resolving `..` and symlinks, so neither leads out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lora_train.errors import UserError, msg

HOW_TO_ALLOW = ("start the WebUI with --enable-insecure-extension-access to allow it, "
                "or move the folder under one of the allowed folders")
REMOTE = "the WebUI is reachable from other machines (--listen, --share or --server-name)"
HIDDEN = "the WebUI runs with --hide-ui-dir-config"


@dataclass(frozen=True)
class AccessPolicy:
    roots: tuple[Path, ...] = ()
    remote: bool = False  # reachable from other machines
    insecure_allowed: bool = False  # --enable-insecure-extension-access
    hide_dirs: bool = False  # --hide-ui-dir-config

    @classmethod
    def build(cls, roots: Iterable[str | os.PathLike], **flags) -> "AccessPolicy":
        return cls(tuple(dict.fromkeys(Path(r).expanduser().resolve() for r in roots if str(r).strip())), **flags)

    @property
    def restricted(self) -> bool:
        """Moves, deletes and downloads are refused."""
        return self.remote and not self.insecure_allowed

    @property
    def roots_only(self) -> bool:
        """Folders outside the roots are refused."""
        return self.restricted or self.hide_dirs

    def why(self) -> str:
        """Why paths are limited here (the reason in messages)."""
        return msg(REMOTE) if self.restricted else msg(HIDDEN)

    def folder(self, text: str | os.PathLike, *, must_exist: bool = True) -> Path:
        """The real folder `text` names, or UserError saying why it may not be used."""
        real, raw = self.path(text)
        if must_exist and not real.is_dir():
            raise UserError(msg("{path}: no such folder (it resolves to {real})", path=raw, real=real) if str(real) != raw
                            else msg("{path}: no such folder", path=raw))
        return real

    def file(self, text: str | os.PathLike, *, must_exist: bool = True) -> Path:
        """The real file `text` names, or UserError saying why it may not be used."""
        real, raw = self.path(text)
        if must_exist and not real.is_file():
            raise UserError(msg("{path}: no such file (it resolves to {real})", path=raw, real=real) if str(real) != raw
                            else msg("{path}: no such file", path=raw))
        return real

    def path(self, text: str | os.PathLike) -> tuple[Path, str]:
        """(the real path `text` names, the text as typed); UserError when it may not be used."""
        raw = str(text).strip()
        if not raw:
            raise UserError(msg("no folder given"))
        if "\x00" in raw:
            raise UserError(msg("{path}: not a valid path", path=repr(raw)))
        path = Path(raw).expanduser()
        if not path.is_absolute():
            if self.roots_only:
                # relative to the first root, the way a user of the WebUI's train folder types it
                path = self.roots[0] / path if self.roots else path
            path = path.absolute()
        real = path.resolve()
        if self.roots_only and not any(real == r or r in real.parents for r in self.roots):
            roots = ", ".join(str(r) for r in self.roots) or "(none set)"
            raise UserError(msg("{path}: outside the allowed folders ({roots}); {why}. To use it, {how}",
                                path=raw, roots=roots, why=self.why(), how=msg(HOW_TO_ALLOW)))
        return real, raw

    def check_changes_files(self, what: str) -> None:
        """Moving, renaming or deleting files, and downloading models."""
        if self.restricted:
            raise UserError(msg("{what} is not allowed: {why}. Start the WebUI with --enable-insecure-extension-access to allow it.",
                                what=what, why=self.why()))
