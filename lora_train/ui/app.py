"""`python -m lora_train ui`: the same Train tab served without the WebUI, on the standalone host."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]  # the extension folder: javascript/, style.css, localizations/


def page_js() -> str:
    # The WebUI injects javascript/*.js itself; here the same file runs from the page's load event.
    return "() => {\n" + (ROOT / "javascript" / "lora_train.js").read_text(encoding="utf-8") + "\n}"


def create_app(host, lang: Optional[str] = None):
    import gradio as gr

    from lora_train.ui import compat
    from lora_train.ui.i18n import Translator
    from lora_train.app.runs import RunManager
    from lora_train.ui.tabs import create_tabs

    t = Translator(lang)
    manager = RunManager(host)
    css = (ROOT / "style.css").read_text(encoding="utf-8")
    tab = create_tabs(manager, host, t)  # built outside: a Blocks made inside another renders there at once
    with gr.Blocks(title="LoRA Train", css=css, analytics_enabled=False) as app:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem(t("LoRA Train"), id="lora_train", elem_id="tab_lora_train"):
                tab.render()
        compat.load_js(app, page_js())
    app.manager = manager
    return app


def serve(model: str, port: int, listen: bool, lang: Optional[str], lora_dir: Path, work_dir: Path, access=None) -> None:
    from lora_train.host.standalone import StandaloneHost
    from lora_train.ui import compat

    host = StandaloneHost(model, lora_dir, work_dir, access)
    app = create_app(host, lang)
    compat.queue(app, 4)
    print(f"LoRA Train: model {model}; LoRAs go to {lora_dir}; runs in {work_dir}", flush=True)
    app.launch(server_name="0.0.0.0" if listen else "127.0.0.1", server_port=port, show_api=False,
               allowed_paths=[str(lora_dir), str(work_dir)], prevent_thread_lock=False)
