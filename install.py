"""A1111's install hook: the WebUI runs this file in a subprocess at every start (not at all under
--skip-install), with the WebUI root on PYTHONPATH so `import launch` works.

It installs only what LoRA Train needs and the host lacks, pinned and with --no-deps: each of these
needs nothing beyond what the WebUI already has (torch, numpy, typing-extensions), so pip can never
upgrade or downgrade the host's own packages (torch, transformers, gradio, protobuf ...). A second
start finds everything installed and does nothing.
"""

import importlib.metadata
import re
import sys

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

# WD14 taggers. Any build of onnxruntime will do, and a user's GPU build must never get the CPU
# wheel beside it: with both installed the CPU one wins and tagging silently runs on the CPU. So
# the CPU wheel comes only when no build is there; the tagger warns when a GPU machine lacks the
# CUDA provider and says which package to install instead.
ANY_OF = [
    (("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon", "onnxruntime-openvino"),
     "onnxruntime==1.17.3"),
]

# Only where torch sees a CUDA GPU: AdamW8bit, Lion8bit, PagedAdamW8bit ... (0.43 ships Linux and
# Windows CUDA wheels that work with the WebUI's torch 2.1; without CUDA it is useless).
CUDA_PACKAGES = [
    ("bitsandbytes", "bitsandbytes==0.43.3"),
]

# The WebUI owns these; installing any of them from an extension breaks it (wrong CUDA build,
# gradio/protobuf version fights), so no requirement may ever name one.
HOST_OWNED = {"torch", "torchvision", "torchaudio", "xformers", "transformers", "gradio", "gradio-client", "protobuf"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s<>=!~;\[@(]", requirement.strip(), maxsplit=1)[0])


def missing(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


def cuda_available() -> bool:
    """torch's own answer, imported only when asked (a torch that does not import means no CUDA)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def skip_install(launch) -> bool:
    # The WebUI skips install.py under --skip-install, and its run_pip does nothing then; this is for
    # running the file by hand. COMMANDLINE_ARGS reaches sys.argv and launch.args on `import launch`.
    return "--skip-install" in sys.argv or bool(getattr(getattr(launch, "args", None), "skip_install", False))


def to_install() -> list[str]:
    wanted = [requirement for dist, requirement in PACKAGES if missing(dist)]
    wanted += [requirement for dists, requirement in ANY_OF if all(missing(d) for d in dists)]
    # torch is imported (slow) only when there is something to decide
    if any(missing(dist) for dist, _ in CUDA_PACKAGES) and cuda_available():
        wanted += [requirement for dist, requirement in CUDA_PACKAGES if missing(dist)]
    return [r for r in wanted if requirement_name(r) not in HOST_OWNED]


def main() -> list[str]:
    import launch  # provided by the WebUI

    if skip_install(launch):
        return []
    done, failed = [], []
    for requirement in to_install():
        try:
            launch.run_pip(f'install --no-deps "{requirement}"', f"LoRA Train requirement: {requirement}")
            done.append(requirement)
        except RuntimeError as e:  # one that cannot install (no wheel, offline) must not stop the others
            print(e, file=sys.stderr)
            failed.append(requirement)
    if failed:  # the WebUI reports a failed install.py and starts anyway; the optimizers affected say so when chosen
        raise RuntimeError(f"LoRA Train: could not install {', '.join(failed)}")
    return done


if __name__ == "__main__":
    main()
