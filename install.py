"""A1111's install hook: runs in a subprocess at every WebUI start (unless --skip-install, under
which the host's `launch.run_pip` does nothing).

It installs only what LoRA Train needs and the host lacks, pinned and with --no-deps: each of these
needs nothing beyond what the WebUI already has (torch, typing-extensions), so pip can never
upgrade or downgrade the host's own packages (torch, transformers, gradio, protobuf ...).
"""

import importlib.metadata
import sys

import launch  # provided by the WebUI (PYTHONPATH is set to its root)

# (distribution name, pip requirement)
PACKAGES = [
    ("tomli-w", "tomli-w==1.0.0"),  # writing configs in sd-scripts' TOML
    ("lion-pytorch", "lion-pytorch==0.2.5"),  # optimizer_type=Lion
    ("prodigyopt", "prodigyopt==1.1.2"),  # Prodigy
    ("dadaptation", "dadaptation==3.2"),  # DAdaptAdam & co.
    ("schedulefree", "schedulefree==1.4.1"),  # AdamWScheduleFree
]
if sys.version_info < (3, 11):
    PACKAGES.append(("tomli", "tomli==2.0.1"))  # tomllib is 3.11+


def missing(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


def main() -> None:
    for dist, requirement in PACKAGES:
        if missing(dist):
            launch.run_pip(f'install --no-deps "{requirement}"', f"LoRA Train requirement: {requirement}")


main()
