"""The rules of the house (../shared/ARCHITECTURE.md), checked on the source with `ast`, imports inside
functions included: layers import downward only (front ends -> app -> hosts -> core, and inside the
core the directions the map draws); only host/a1111/ (and scripts/) import the WebUI's `modules`; only
ui/ (and scripts/) import gradio, and only ui/compat.py tells gradio 3.41 and 4.40 apart; host files stay under
400 lines; scripts/ holds entry points only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_train"

UPPER = {"ui", "app", "host", "testing", "cli", "demo", "bench", "__main__"}
# room -> rooms it must never import (a room is a subpackage of lora_train, or a top-level module)
NEVER = {
    "model": {"train", "dataset", "tagging", "sample", "tools"} | UPPER,
    "network": {"model", "train", "dataset", "tagging", "sample", "tools"} | UPPER,
    "dataset": {"model", "network", "train", "tagging", "sample", "tools"} | UPPER,
    "tagging": {"model", "network", "train", "sample", "tools"} | UPPER,
    "train": {"tagging", "sample", "tools"} | UPPER,
    "sample": {"tagging", "tools"} | UPPER,
    "tools": {"tagging", "dataset"} | UPPER,
    # the leaves under the whole core import only each other ("*": any room but a leaf)
    "errors": {"*"}, "tomlfile": {"*"}, "access": {"*"},
    "host": {"ui", "app", "cli", "testing", "demo", "bench"},
    "app": {"ui", "cli", "testing", "demo", "bench"},
    "testing": {"ui", "cli", "host"},
}
# the exceptions the map draws inside the core
ALLOWED = {
    "model": ("lora_train.network.naming", "lora_train.network.targets"),  # model -> network naming
    # the CLIP tokenizer files: token counts in dataset checks and the tag editor
    "dataset": ("lora_train.model.clip_files",),
    "tagging": ("lora_train.model.clip_files", "lora_train.dataset"),
    # the app layer reaches hosts through the Host contract only
    "app": ("lora_train.host.base",),
}
LEAVES = {"errors", "tomlfile", "access"}  # modules the whole core may use


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function bodies included), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def room_of(path: Path, package: Path) -> str:
    parts = path.relative_to(package).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def layer_violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        src = room_of(path, package)
        never = NEVER.get(src, set())
        allowed = ALLOWED.get(src, ())
        for module in sorted(imports(path)):
            if not module.startswith("lora_train."):
                continue
            dst = module.split(".")[1]
            if dst == src or any(module == a or module.startswith(a + ".") for a in allowed):
                continue
            if src == "app" and dst == "host":
                bad.append(f"{path.relative_to(package)} imports {module} (app reaches hosts through host.base only)")
            elif dst in never or ("*" in never and dst not in LEAVES):
                bad.append(f"{path.relative_to(package)} imports {module} ({src} -> {dst})")
    return sorted(set(bad))


def test_layers_import_downward_only():
    bad = layer_violations()
    assert not bad, "imports against the map's one-way rule:\n" + "\n".join(bad)


def test_the_layer_check_sees_imports_in_functions_and_every_forbidden_direction(tmp_path):
    """The checker itself, on a scratch package: each forbidden import is reported, nothing else."""
    pkg = tmp_path / "lora_train"
    files = {
        "dataset/check.py": "def f():\n    from lora_train.train.config import TrainConfig\n",  # dataset -> train, in a function
        "dataset/ok.py": "from lora_train.model.clip_files import x\nfrom lora_train.errors import UserError\n",
        "model/a.py": "import lora_train.ui.tab\n",
        "network/b.py": "from lora_train import app\nfrom lora_train.app.runs import RunManager\n",
        "train/c.py": "def g():\n    import lora_train.host.standalone\n",
        "sample/d.py": "from lora_train.testing.base import x\n",
        "model/ok.py": "from lora_train.network.naming import PREFIX_TE\n",
        "app/e.py": "from lora_train.host.a1111 import A1111Host\nfrom lora_train.host.base import Host\n",
        "host/f.py": "from lora_train.app.runs import RunManager\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    got = layer_violations(pkg)
    assert got == sorted([
        "app/e.py imports lora_train.host.a1111 (app reaches hosts through host.base only)",
        "app/e.py imports lora_train.host.a1111.A1111Host (app reaches hosts through host.base only)",
        "dataset/check.py imports lora_train.train.config (dataset -> train)",
        "dataset/check.py imports lora_train.train.config.TrainConfig (dataset -> train)",
        "host/f.py imports lora_train.app.runs (host -> app)",
        "host/f.py imports lora_train.app.runs.RunManager (host -> app)",
        "model/a.py imports lora_train.ui.tab (model -> ui)",
        "network/b.py imports lora_train.app (network -> app)",
        "network/b.py imports lora_train.app.runs (network -> app)",
        "network/b.py imports lora_train.app.runs.RunManager (network -> app)",
        "sample/d.py imports lora_train.testing.base (sample -> testing)",
        "sample/d.py imports lora_train.testing.base.x (sample -> testing)",
        "train/c.py imports lora_train.host.standalone (train -> host)",
    ])


def imported_roots(path: Path) -> set[str]:
    return {m.split(".")[0] for m in imports(path)}


def test_only_the_webui_hosts_import_the_webui():
    a1111, forge = PACKAGE / "host" / "a1111", PACKAGE / "host" / "forge"
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if {"modules", "networks", "network"} & imported_roots(p) and a1111 not in p.parents and forge not in p.parents]
    assert not offenders
    assert "modules" in imported_roots(a1111 / "session.py")  # the check sees imports inside functions
    assert "modules" in imported_roots(forge / "session.py")


def test_only_the_forge_host_imports_forge():
    forge = PACKAGE / "host" / "forge"
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if {"backend", "modules_forge"} & imported_roots(p) and forge not in p.parents]
    assert not offenders
    assert "backend" in imported_roots(forge / "selftest.py")


def test_only_the_ui_imports_gradio():
    ui = PACKAGE / "ui"
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "gradio" in imported_roots(p) and ui not in p.parents]
    assert not offenders


def test_only_ui_compat_tells_gradio_versions_apart():
    """Tabs written once for gradio 3.41 (A1111) and 4.40 (Forge): what differs is in ui/compat.py."""
    compat = PACKAGE / "ui" / "compat.py"
    marks = ("__version__", "GRADIO_4", "GRADIO_MAJOR", "_js=")
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py")] if p != compat
                 for m in marks if m in p.read_text(encoding="utf-8") and (m != "__version__" or "gradio" in imported_roots(p))]
    assert not offenders


def test_host_files_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in (PACKAGE / "host").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}


def test_scripts_holds_one_entry_point():
    assert sorted(p.name for p in (ROOT / "scripts").glob("*.py")) == ["lora_train_tab.py"]
