"""Finding `sgm` (Stability AI's generative-models), which SDXL needs and PyPI does not have.

Inside the WebUI it is the host's `repositories/generative-models`. Headless, point us at a
checkout with `--sgm-path` or `LORA_TRAIN_SGM_PATH` (an installed WebUI's folder works).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lora_train.errors import UserError, msg

ENV = "LORA_TRAIN_SGM_PATH"


def _candidates(path: str | os.PathLike | None) -> list[Path]:
    given = path or os.environ.get(ENV)
    if not given:
        return []
    p = Path(given).expanduser()
    # a generative-models checkout, or a WebUI folder that has one under repositories/
    return [p, p / "repositories" / "generative-models"]


def sgm_available(path: str | os.PathLike | None = None) -> bool:
    try:
        import_sgm(path)
        return True
    except UserError:
        return False


def import_sgm(path: str | os.PathLike | None = None):
    for folder in _candidates(path):
        if (folder / "sgm" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.append(str(folder))
            break
    else:
        if path is not None:
            raise UserError(msg("'{path}' has no sgm package: give a generative-models checkout or a WebUI folder", path=path))
    try:
        from lora_train.model.loading import quiet

        with quiet():
            import sgm  # noqa: F401
            import sgm.models.diffusion  # noqa: F401
    except ImportError as e:
        raise UserError(msg(
            "SDXL needs Stability AI's {package} package (generative-models), which cannot be imported ({error}). "
            "It is not on PyPI: point LoRA Train at a checkout with --sgm-path or {env} "
            "(an installed WebUI folder works: its repositories/generative-models)", package="'sgm'", error=e, env=ENV
        )) from None
    return sys.modules["sgm"]
