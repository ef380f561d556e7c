"""The tabs of LoRA Train in one Blocks: Train first (what the page opens on), Dataset and Tools beside it.
The WebUI shows this as its "LoRA Train" tab; the standalone server as its page."""

from __future__ import annotations

from typing import Optional

import gradio as gr

from lora_train.ui.dataset_tab import build_dataset_tab
from lora_train.ui.i18n import Translator
from lora_train.ui.tab import create_train_tab
from lora_train.ui.tools_tab import build_tools_tab


def create_tabs(manager, host, t: Optional[Translator] = None) -> gr.Blocks:
    t = t or Translator()
    train = create_train_tab(manager, host, t)  # built outside: a Blocks made inside another renders there at once
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Tabs(elem_id="lora_train_tabs") as tabs:
            with gr.TabItem(t("Train"), id="train", elem_id="lora_train_tab_train"):
                train.render()
            with gr.TabItem(t("Dataset"), id="dataset", elem_id="lora_train_tab_dataset"):
                build_dataset_tab(host, t, train.lora_fields, tabs, "train")
            with gr.TabItem(t("Tools"), id="tools", elem_id="lora_train_tab_tools") as tools:
                refresh_lists, sources = build_tools_tab(manager, t)
            tools.select(refresh_lists, [], sources)  # the LoRAs runs published since the page was loaded
    return blocks
