"""localizations/zh_CN.json: every string the Train tab shows has a Chinese entry, the file is what the
WebUI's localization loader and our Translator expect, translations keep the option names, numbers
and formats users copy from them, and the standalone server builds the tab in Chinese from it."""

from __future__ import annotations

import ast
import json
import re
import types
from pathlib import Path

import pytest

from lora_train.ui import chart, form, i18n, presets
from lora_train.app.runs import RunStatus

ROOT = Path(__file__).resolve().parents[1]
ZH_CN = ROOT / "localizations" / "zh_CN.json"
UI_SOURCES = [ROOT / "lora_train" / "ui" / name for name in ("tab.py", "chart.py", "app.py", "tabs.py", "dataset_tab.py", "tools_tab.py", "render_panel.py")] + [
    ROOT / "lora_train" / "cli.py"]
WEBUI_SCRIPT = ROOT / "scripts" / "lora_train_tab.py"  # settings and XYZ labels the WebUI shows
PHASES = tuple(chart.PHASE_LABELS)
CJK = re.compile(r"[\u4e00-\u9fff]")


def _table() -> dict[str, str]:
    return json.loads(ZH_CN.read_bytes().decode("utf-8"))


def _host(tmp: Path):
    from lora_train.host.standalone import StandaloneHost

    return StandaloneHost("builtin:tiny", tmp / "Lora", tmp / "runs")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> set[str]:
    """Every string the tab and its HTML fragments pass through t(), from a build with a recording Translator."""
    made: list[i18n.Translator] = []

    class Recording(i18n.Translator):
        def __init__(self, lang=None):
            super().__init__(lang)
            made.append(self)

    from lora_train.ui.app import create_app

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(i18n, "Translator", Recording)
        create_app(_host(tmp_path_factory.mktemp("loc")), None)
    assert len(made) == 1
    t = made[0]
    for phase in PHASES:
        status = RunStatus("run-1", "my_lora", phase=phase, step=3, total_steps=10, epoch=1, epochs=2, steps_per_second=1.5,
                           eta_seconds=30.0, losses=[(1, 0.2), (2, 0.1)], published=["/x/my_lora.safetensors"], error="boom",
                           messages=["note"])
        chart.status_html(status, t, ["run-2"], paused=True)
        chart.files_html(status, t)
    chart.status_html(None, t)
    chart.files_html(None, t)
    chart.loss_chart([], t)
    chart.loss_chart([(1, 0.3), (2, 0.2), (3, 0.25)], t)
    block = types.SimpleNamespace(report=lambda: {"buckets": [{"resolution": (512, 512), "images_x_repeats": 40}]})
    plan = types.SimpleNamespace(guideline_total=160, train_images=4, reg_images=2, train_samples=40, steps_per_epoch=40, epochs=2,
                                 total_steps=80, blocks=[block], warnings=["w"], scan=types.SimpleNamespace(problems=["p"]), problems=[], validation=[1, 2])
    chart.plan_html(plan, t)
    return set(t.seen)


def _t_literals(path: Path) -> set[str]:
    """t("...") calls with a literal argument, including those only made in event handlers."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        is_t = isinstance(node, ast.Call) and ((isinstance(node.func, ast.Name) and node.func.id == "t") or (
            isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "labelled") and getattr(node.func.value, "id", "") == "t"))
        if is_t and node.args:
            arg = node.args[0]
            # t.labelled("Started" if now else "Queued", ...): both
            for choice in ((arg.body, arg.orelse) if isinstance(arg, ast.IfExp) else (arg,)):
                if isinstance(choice, ast.Constant) and isinstance(choice.value, str):
                    out.add(choice.value)
    return out


def _webui_labels(path: Path) -> set[str]:
    """Settings labels and section names the WebUI script registers (A1111's page JS translates them;
    an OptionInfo's .info("x") shows as the text "(x)"), and the X/Y/Z plot axes it adds."""
    out = set()
    if path.is_file():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}

        def text(node):
            node = constants.get(node.id, node) if isinstance(node, ast.Name) else node
            return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip() else None

        def section_label(node):
            node = constants.get(node.id, node) if isinstance(node, ast.Name) else node
            return text(node.elts[1]) if isinstance(node, ast.Tuple) and len(node.elts) > 1 else None

        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "OptionInfo":
                out.update(map(text, node.args[1:2] + [k.value for k in node.keywords if k.arg == "label"]))
                out.update(section_label(k.value) for k in node.keywords if k.arg == "section")
            elif name == "options_section" and node.args:
                out.add(section_label(node.args[0]))
            elif name == "info" and node.args and text(node.args[0]):
                out.add(f"({text(node.args[0])})")
            elif name == "t" and node.args:
                out.add(text(node.args[0]))
    from lora_train.host.a1111 import xyz as a1111

    out.update(v for k, v in vars(a1111).items() if k.startswith("XYZ_") and k != "XYZ_PREFIX" and isinstance(v, str))
    return {s for s in out if s}


def _needed(recorded: set[str]) -> set[str]:
    from lora_train.ui.tab import END_MESSAGES

    needed = set(recorded) | {"LoRA Train", chart.STOPPING} | set(chart.PHASE_LABELS.values()) | set(END_MESSAGES.values())
    needed |= set(presets.SUBJECTS)  # the preset's subject, named in messages
    needed |= set(form.HELP.values()) | set(form.SECTION_TITLES.values())
    for path in UI_SOURCES:
        needed |= _t_literals(path)
    return needed | _webui_labels(WEBUI_SCRIPT)


@pytest.mark.gradio
def test_every_ui_string_has_a_chinese_entry(recorded):
    assert {"Start", "LoRA Train", "Dataset plan", "No loss yet", "Guideline (images x repeats x 4, usually 1000-2000)"} <= recorded
    table = _table()
    missing = sorted(s for s in _needed(recorded) if not table.get(s, "").strip())
    assert not missing, "zh_CN.json lacks entries for:\n" + "\n".join(missing)


@pytest.mark.gradio
def test_no_stale_entries(recorded):
    stale = sorted(set(_table()) - _needed(recorded) - set(_msg_templates()))
    assert not stale, "zh_CN.json has entries no UI string uses any more:\n" + "\n".join(stale)


def test_file_is_flat_utf8_json_of_strings():
    raw = ZH_CN.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), "no BOM: the WebUI reads it with encoding='utf8'"
    pairs = json.loads(raw.decode("utf-8"), object_pairs_hook=lambda kv: kv)
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), "duplicate keys: " + ", ".join(sorted({k for k in keys if keys.count(k) > 1}))
    for key, value in pairs:
        assert isinstance(key, str) and isinstance(value, str), key
        # the WebUI matches trimmed text nodes exactly
        assert key == key.strip() and key, repr(key)
        assert value == value.strip() and value, f"{key!r} -> {value!r}"
        # "{path}: {reason}" and "network_weights '{path}': {reason}" have no words of their own to translate
        if re.search(r"[A-Za-z]", TOKENS.sub("", re.sub(r"\{\w+\}", "", key))):
            assert CJK.search(value), f"{key!r} is not translated: {value!r}"


# What users copy from a help text into a field or a prompt line must survive translation.
TOKENS = re.compile(
    r"--\w+"  # sd-scripts prompt options
    r"|'[^']*'"  # quoted literal values
    r"|\b\w*_\w*\b"  # option names: train_data_dir, max_train_steps, 10_name
    r"|(?<![\w.])\.[a-z]{2,}\b"  # file extensions
    r"|\bsd-scripts\b"
    r"|\b\w+/\w+\b"  # formulas such as alpha/dim
    r"|\b[A-Za-z]*\d+(?:[.,x-]\d+)*[A-Za-z0-9]*\b"  # numbers, ranges, 3x3, fp16, AdamW8bit
    r"|\bN\b"
)


def _tokens(text: str) -> list[str]:
    return TOKENS.findall(text)


def test_token_pattern():
    assert _tokens("One per line, sd-scripts options allowed (--n negative --w 512); 1000-2000, 3x3 conv_dim, '512' or "
                   "'width,height' .txt alpha/dim fp16 every N") == [
        "sd-scripts", "--n", "--w", "512", "1000-2000", "3x3", "conv_dim", "'512'", "'width,height'", ".txt", "alpha/dim", "fp16", "N"]
    assert _tokens("e.g. 6, weight_decay=0.01 betas=0.9,0.99 (0.05-0.1)") == ["6", "weight_decay", "0.01", "0.9,0.99", "0.05-0.1"]


def test_translations_keep_option_names_numbers_and_formats():
    dropped = {}
    for key, value in _table().items():
        lost = [tok for tok in _tokens(key) if tok not in value]
        if lost:
            dropped[key] = lost
    assert not dropped, "translations drop: " + json.dumps(dropped, ensure_ascii=False, indent=1)


@pytest.mark.gradio
def test_standalone_tab_is_built_in_chinese(tmp_path):
    from lora_train.ui.app import create_app

    table = _table()
    app = create_app(_host(tmp_path), "zh_CN")
    by_id = {c["props"].get("elem_id"): c["props"] for c in app.config["components"] if c["props"].get("elem_id")}
    assert by_id["lora_train_start"]["value"] == table["Start"]
    assert CJK.search(by_id["lora_train_start"]["value"])
    assert by_id["lora_train_stop"]["value"] == table["Stop"]
    assert by_id["tab_lora_train"]["label"] == table["LoRA Train"]
    assert by_id["lora_train_trigger"]["label"] == table["Trigger word"]
    # field labels stay the sd-scripts key names; their help is translated
    assert by_id["lora_train_network_dim"]["label"] == "network_dim"
    assert by_id["lora_train_network_dim"]["info"] == table[form.HELP["network_dim"]]
    assert table["Idle: set a dataset folder and press Start."] in by_id["lora_train_status"]["value"]
    accordions = {c["props"].get("label") for c in app.config["components"] if c["type"] == "accordion"}
    assert table["Optimizer and learning rate"] in accordions and table["Dataset plan"] in accordions
    assert by_id["lora_train_mode"]["value"] == table["Basic"]


def _msg_templates() -> dict[str, str]:
    """Every `msg("...")` template in lora_train/ (messages with numbers, names and paths), and where."""
    out = {}
    for path in sorted((ROOT / "lora_train").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "msg" and node.args:
                arg = constants.get(node.args[0].id, node.args[0]) if isinstance(node.args[0], ast.Name) else node.args[0]
                assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), f"{path}:{node.lineno}: msg() needs a literal template"
                out[arg.value] = f"{path.relative_to(ROOT)}:{node.lineno}"
    return out


def test_every_message_has_a_chinese_entry_with_the_same_placeholders():
    import string

    def names(text):
        return sorted(n for _, n, _, _ in string.Formatter().parse(text) if n)

    table = _table()
    templates = _msg_templates()
    assert len(templates) > 60, "the scan finds the messages"
    missing = sorted(f"{where}: {tpl}" for tpl, where in templates.items() if not table.get(tpl, "").strip())
    assert not missing, "zh_CN.json lacks entries for these messages:\n" + "\n".join(missing)
    wrong = sorted(tpl for tpl in templates if names(table[tpl]) != names(tpl))
    assert not wrong, "translations must keep every {placeholder}:\n" + "\n".join(wrong)


def test_messages_are_translated_after_they_are_filled_in_and_joined():
    """The core hands the UI finished English (joined, listed, nested); the UI still shows Chinese."""
    from lora_train.access import AccessPolicy
    from lora_train.errors import UserError

    t = i18n.Translator("zh_CN")
    with pytest.raises(UserError) as e:
        AccessPolicy.build(["/data"], remote=True).folder("/srv/photos")
    shown = t.text(e.value)
    assert "/srv/photos" in shown and "/data" in shown and "--enable-insecure-extension-access" in shown
    assert not re.search(r"[A-Za-z]{4,} [a-z]{3,} [a-z]{3,}", shown.replace("--enable-insecure-extension-access", "")
                         .replace("--listen, --share", "").replace("--server-name", "")), shown
    plan = "images x repeats x 4 = 320; the usual guideline is 1000-2000\n/x/a.png: image folder does not exist"
    assert t.text(plan) == "图片数 × 重复次数 × 4 = 320；一般建议 1000-2000\n/x/a.png：图片文件夹不存在"
    assert t.text("8 images in /srv/train/5_zkz") == "/srv/train/5_zkz 中有 8 张图片"
    # a hint is a value of its own, possibly empty; its full-width bracket needs no space before it
    from lora_train.errors import close_match_hint, msg

    def unknown(key):
        return msg("{source}: unknown key '{key}'{hint}", source="a.toml", key=key, hint=close_match_hint(key, ["network_dim"]))

    assert unknown("netwrok_dim").endswith(" (did you mean 'network_dim'?)")
    assert t.text(unknown("netwrok_dim")) == "a.toml：未知的参数 'netwrok_dim'（是不是 'network_dim'？）"
    assert t.text(unknown("zzz")) == "a.toml：未知的参数 'zzz'"
    assert i18n.Translator().text(plan) == plan, "English stays as it is"


def test_cli_messages_follow_the_language(tmp_path):
    import os
    import subprocess
    import sys

    def run(lang):
        env = {k: v for k, v in os.environ.items() if k not in ("LANG", "LC_ALL", "LC_MESSAGES", "LORA_TRAIN_LANG")}
        env.update(lang)
        return subprocess.run([sys.executable, "-m", "lora_train", "train", "--set", "pretrained_model_name_or_path=builtin:tiny",
                               "--set", f"train_data_dir={tmp_path / 'nope'}"], capture_output=True, text=True, env=env, cwd=ROOT)

    english = run({})
    assert english.returncode == 2 and english.stderr.startswith("error: ") and "does not exist" in english.stderr
    for lang in ({"LORA_TRAIN_LANG": "zh_CN"}, {"LANG": "zh_CN.UTF-8"}):
        chinese = run(lang)
        assert chinese.returncode == 2 and chinese.stderr.startswith("错误: "), chinese.stderr
        assert str(tmp_path / "nope") in chinese.stderr


MESSAGE_LISTS = {"notes", "warnings", "problems", "messages", "skipped"}  # lists whose items a user reads
CLI_SOURCES = [ROOT / "lora_train" / "cli.py", ROOT / "lora_train" / "tagging" / "cli.py", ROOT / "lora_train" / "tools" / "weights_cli.py"]
NOT_USER_TEXT = {"testing"}  # the fidelity harness reports to developers; `make demo` prints its verdict through cli.py


def _english_outside_msg(node) -> list[str]:
    """Literal English words in an expression that is not a msg()/t()/tr() call."""
    found = []

    def visit(n):
        if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) in ("msg", "t", "tr", "format", "dumps"):
            return
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.search(r"[A-Za-z]{2,}", n.value):
            found.append(n.value)
            return
        for child in ast.iter_child_nodes(n):
            visit(child)

    visit(node)
    return found


def test_user_messages_are_written_with_msg():
    """Errors, notes, warnings and the CLI's output are msg() templates, so the scan above finds them and
    zh_CN.json has each: a raw f-string here would reach a Chinese user in English."""
    offenders = []
    for path in sorted((ROOT / "lora_train").rglob("*.py")):
        rel = path.relative_to(ROOT / "lora_train")
        if rel.parts[0] in NOT_USER_TEXT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = getattr(func.value, "id", getattr(func.value, "attr", "")) if isinstance(func, ast.Attribute) else ""
            user_text = (name == "UserError" or (name == "append" and owner in MESSAGE_LISTS)
                         or (name == "print" and path in CLI_SOURCES))
            if user_text:
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}" for text in _english_outside_msg(node.args[0])]
    assert not offenders, f"{len(offenders)} user messages bypass msg():\n" + "\n".join(offenders)
