"""A1111's install hook: runs in a subprocess at every WebUI start (unless --skip-install).

It installs only what LoRA Train needs and the host lacks, and never touches the host's own
packages (torch, transformers, gradio, protobuf...).
"""

import importlib.metadata
import sys

import launch  # provided by the WebUI (PYTHONPATH is set to its root)

# (distribution, pip requirement)
OURS = [("tomli-w", "tomli-w==1.0.0")]
if sys.version_info < (3, 11):
    OURS.append(("tomli", "tomli>=1.1"))  # tomllib is 3.11+


def missing(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


for dist, requirement in OURS:
    if missing(dist):
        launch.run_pip(f'install "{requirement}"', f"LoRA Train requirement: {requirement}")
