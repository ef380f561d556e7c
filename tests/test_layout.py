"""The rules of the house, checked on the source: only host/a1111.py (and scripts/) import the
WebUI's `modules`; only ui/ (and scripts/) import gradio; scripts/ holds entry points only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def core_files():
    return sorted((ROOT / "lora_train").rglob("*.py"))


def test_only_the_a1111_host_imports_the_webui():
    offenders = [str(p.relative_to(ROOT)) for p in core_files()
                 if {"modules", "networks", "network"} & imported_roots(p) and p != ROOT / "lora_train" / "host" / "a1111.py"]
    assert not offenders
    assert "modules" in imported_roots(ROOT / "lora_train" / "host" / "a1111.py")  # the check sees imports inside functions


def test_only_the_ui_imports_gradio():
    ui = ROOT / "lora_train" / "ui"
    offenders = [str(p.relative_to(ROOT)) for p in core_files() if "gradio" in imported_roots(p) and ui not in p.parents]
    assert not offenders


def test_scripts_holds_one_entry_point():
    assert sorted(p.name for p in (ROOT / "scripts").glob("*.py")) == ["lora_train_tab.py"]
