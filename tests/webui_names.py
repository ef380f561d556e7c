"""The LoRA module names the real A1111 WebUI's loader mapped on the tiny models (recorded once by hand,
see tests/fixtures/README.md), for the fake WebUI's loader and the naming tests."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ("sd1", "tiny", "sdxl")  # tinybase.safetensors, builtin:tiny, the tiny SDXL


def webui_names(model: str) -> frozenset[str]:
    lines = (FIXTURES / f"webui-lora-names-{model}.txt").read_text(encoding="utf-8").splitlines()
    return frozenset(line for line in lines if line and not line.startswith("#"))


def webui_unmapped(model: str) -> list[str]:
    """Naming slips the real loader did not map on that model."""
    lines = (FIXTURES / "webui-lora-unmapped.txt").read_text(encoding="utf-8").splitlines()
    return [line.split()[1] for line in lines if line.startswith(f"{model} ")]
