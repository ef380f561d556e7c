"""The Tools tab (gradio 3.41 / 4.40): merge / subtract, block weights, resize and pick, after training.
The work and the folder policy are in `app/tools.py`; this file only wires components."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from lora_train.app.runs import RunManager
from lora_train.app.tools import GUIDE_PRESETS, Tools
from lora_train.errors import UserError
from lora_train.ui.i18n import Translator
from lora_train.ui.tab import _message


def ranking_html(ranking, t) -> str:
    """pick's table: the saves by validation loss, the suggested one marked."""
    from lora_train.tools.pick import suggestion

    best = ranking.best
    head = "".join(f"<th>{html.escape(h)}</th>" for h in (t("File"), t("Epoch"), t("Step"), t("Validation loss")))
    rows = []
    for n, save in enumerate(ranking.saves, 1):
        mark = save is best
        cells = [save.file.name + (" ★" if mark else ""), *("-" if v is None else str(v) for v in (save.epoch, save.step)),
                 "-" if save.loss is None else f"{save.loss:.6f}"]
        rows.append(f'<tr data-file="{html.escape(save.file.name)}" data-suggested="{int(mark)}"><td>{n}</td>'
                    + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f'<div id="lora_tools_pick_result"><p>{html.escape(t.text(suggestion(ranking)))}</p>'
            f'<table id="lora_tools_pick_table"><tr><th>#</th>{head}</tr>{"".join(rows)}</table></div>')


def _writes(t, key: str, action: str):
    """A tool's output name, its button and its message."""
    output = gr.Textbox(label=t("Output name"), max_lines=1, elem_id=f"lora_tools_{key}_output")
    return output, gr.Button(action, variant="primary", elem_id=f"lora_tools_{key}"), gr.HTML("", elem_id=f"lora_tools_{key}_message")


def build_tools_tab(manager: RunManager, t: Translator | None = None):
    """Create the tab's components in the current Blocks context; returns the function that refills
    the LoRA lists and the lists, for the tab's select event."""
    from lora_train.tools.lbw import PRESETS
    from lora_train.tools.lowrank import DYNAMIC_METHODS
    from lora_train.tools.pick import report_lines

    t = t or Translator()
    tools = Tools(manager)
    files = tools.lora_files()
    refresh = gr.Button(t("Refresh the LoRA list"), elem_id="lora_tools_refresh")

    with gr.Accordion(t("Merge / subtract (SuperMerger's formula)"), open=True):
        formula = gr.Textbox(label=t("Formula"), placeholder="NAME:1:GP1,NAME_BASE:-1:GP2", max_lines=1, elem_id="lora_tools_formula",
                             info=t("NAME:RATIO[:PRESET], comma-separated; a name is a file of the LoRA folder; a negative ratio subtracts"))
        presets = gr.Textbox(label=t("Block weight presets"), value=GUIDE_PRESETS, lines=2, elem_id="lora_tools_presets",
                             info=t("One NAME:v1,v2,... per line (17 or 26 values for SD1/SD2, 12 or 20 for SDXL)"))
        with gr.Row():
            merge_output = gr.Textbox(label=t("Output name"), max_lines=1, elem_id="lora_tools_merge_output",
                                      info=t("A new file in the LoRA folder"))
            merge_rank = gr.Number(label=t("Rank"), value=0, precision=0, elem_id="lora_tools_merge_rank",
                                   info=t("0 = exact (ranks side by side); N = the best rank-N approximation (SVD)"))
        merge_model = gr.Textbox(label=t("Model (for IA3/OFT/DoRA/GLoRA items)"), max_lines=1, elem_id="lora_tools_merge_model",
                                 info=t("A checkpoint file, loaded beside the WebUI's model; empty for LoRA, LoCon, LoHa and LoKr"))
        merge_button = gr.Button(t("Merge"), variant="primary", elem_id="lora_tools_merge")
        merge_message = gr.HTML("", elem_id="lora_tools_merge_message")

    with gr.Accordion(t("Block weights (lora-block-weight)"), open=False):
        with gr.Row():
            lbw_source = gr.Dropdown(label=t("Source LoRA"), choices=files, elem_id="lora_tools_lbw_source")
            lbw_preset = gr.Dropdown(label=t("Preset"), choices=list(PRESETS), elem_id="lora_tools_lbw_preset")
        lbw_weights = gr.Textbox(label=t("Block weights"), max_lines=1, elem_id="lora_tools_lbw_weights",
                                 info=t("A preset name (those above too) or the values: 17 or 26 for SD1/SD2, 12 or 20 for SDXL"))
        lbw_output, lbw_button, lbw_message = _writes(t, "lbw", t("Bake block weights"))

    with gr.Accordion(t("Resize"), open=False):
        resize_source = gr.Dropdown(label=t("Source LoRA"), choices=files, elem_id="lora_tools_resize_source")
        with gr.Row():
            resize_rank = gr.Number(label=t("Rank"), value=8, precision=0, elem_id="lora_tools_resize_rank",
                                    info=t("The new rank; with a dynamic method the largest"))
            resize_dynamic = gr.Dropdown(label=t("Dynamic method"), choices=[t("fixed rank"), *DYNAMIC_METHODS], value=t("fixed rank"), type="index",
                                         elem_id="lora_tools_resize_dynamic")
            resize_param = gr.Number(label=t("Dynamic parameter"), value=0.9, elem_id="lora_tools_resize_param",
                                     info=t("sv_ratio: largest / smallest singular value kept; sv_fro, sv_cumulative: the share kept, 0-1"))
        resize_output, resize_button, resize_message = _writes(t, "resize", t("Resize"))

    with gr.Accordion(t("Pick the epoch"), open=False):
        pick_folder = gr.Textbox(label=t("Run folder"), max_lines=1, elem_id="lora_tools_pick_folder",
                                 info=t("The output folder of a run (holding <name>-loss.csv); empty = the last run"))
        pick_button = gr.Button(t("Rank the saves"), variant="primary", elem_id="lora_tools_pick")
        pick_message = gr.HTML("", elem_id="lora_tools_pick_message")
        pick_table = gr.HTML("", elem_id="lora_tools_pick_box")
        pick_image = gr.Image(label=t("Previews side by side"), type="filepath", interactive=False, visible=False,
                              elem_id="lora_tools_pick_image")

    sources = [lbw_source, resize_source]

    def lists():
        choices = tools.lora_files()
        return [gr.update(choices=choices) for _ in sources]

    def writing(work):
        """A handler: the tool's lines, or its one-line error; the source lists with the new file."""
        def handler(*values):
            try:
                written = work(*values)
            except (UserError, OSError, ValueError) as e:
                return [_message(t.text(e), True), *[gr.update() for _ in sources]]
            return [_message("\n".join(t.text(line) for line in written.lines)), *lists()]
        return handler

    def on_resize(source, rank, dynamic, param, output):
        method = DYNAMIC_METHODS[dynamic - 1] if isinstance(dynamic, int) and dynamic > 0 else None
        return tools.resize(source, rank, method, param, output)

    def on_pick(folder):
        try:
            ranking, grid = tools.pick(folder)
        except (UserError, OSError, ValueError) as e:
            return _message(t.text(e), True), "", gr.update(value=None, visible=False)
        # the image box shows only when there are previews to show
        return (_message(t.text(report_lines(ranking)[0])), ranking_html(ranking, t),
                gr.update(value=str(grid), visible=True) if grid else gr.update(value=None, visible=False))

    def suggest_output(suffix):
        def fill(source, current):
            return current if (current or "").strip() or not source else f"{Path(source).stem}-{suffix}"
        return fill

    refresh.click(lists, [], sources)
    merge_button.click(writing(tools.merge), [formula, presets, merge_output, merge_rank, merge_model], [merge_message, *sources])
    # the preset's values, not its name: the user sees (and may edit) what will be applied
    lbw_preset.change(lambda name: PRESETS.get(name, name) if name else gr.update(), [lbw_preset], [lbw_weights])
    lbw_source.change(suggest_output("lbw"), [lbw_source, lbw_output], [lbw_output])
    lbw_button.click(writing(tools.lbw), [lbw_source, lbw_weights, presets, lbw_output], [lbw_message, *sources])
    resize_source.change(suggest_output("resized"), [resize_source, resize_output], [resize_output])
    resize_button.click(writing(on_resize), [resize_source, resize_rank, resize_dynamic, resize_param, resize_output],
                        [resize_message, *sources])
    pick_button.click(on_pick, [pick_folder], [pick_message, pick_table, pick_image])
    return lists, sources
