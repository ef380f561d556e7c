"""The Dataset tab (gradio 3.41 / 4.40): load a folder, filter by tags, edit captions one by one or in
batches (with a preview), undo/redo, save (every save undoable), auto-tag, move images between
concept folders, and send the folder to the Train tab. All logic is in `tagging/session.py`; this
file only wires components. Built inside the caller's Blocks so "Send to Train" can fill the Train
tab's fields directly.
"""

from __future__ import annotations

import html

import gradio as gr

from lora_train.dataset.prepare import PRESETS
from lora_train.errors import UserError, msg
from lora_train.tagging.session import BATCH_OPS, DatasetSession
from lora_train.ui.i18n import Translator

MODES = ("prefill", "overwrite", "prepend", "append")


def _message(text: str, error: bool = False) -> str:
    cls = "lora-train-error" if error else "lora-train-note"
    return f'<div class="{cls}" data-error="{int(error)}">{html.escape(text).replace(chr(10), "<br>")}</div>'


def _tag_cloud(session: DatasetSession, t) -> str:
    counts = session.tag_counts()
    if not counts:
        return f'<div id="lora_dataset_tags" data-count="0">{html.escape(t("No tags"))}</div>'
    top = counts[0][1]
    items = "".join(
        f'<span class="lora-dataset-tag" data-tag="{html.escape(tag)}" data-n="{n}" '
        f'style="font-size:{0.8 + 0.6 * n / top:.2f}em">{html.escape(tag)} <small>{n}</small></span> '
        for tag, n in counts[:300])
    return f'<div id="lora_dataset_tags" data-count="{len(counts)}">{items}</div>'


def _folders_html(session: DatasetSession, t) -> str:
    if session.store is None:
        return ""
    rows = "".join(f"<tr><td>{html.escape(f or '.')}</td><td>{v['images']}</td><td>{v['repeats'] if v['repeats'] is not None else '-'}</td></tr>"
                   for f, v in session.store.folders().items())
    return (f'<table id="lora_dataset_folders"><tr><th>{html.escape(t("Folder"))}</th><th>{html.escape(t("Images"))}</th>'
            f'<th>{html.escape(t("Repeats"))}</th></tr>{rows}</table>')


def _diff_html(session: DatasetSession, diffs: list, limit: int = 50) -> str:
    store = session.store
    rows = "".join(
        f'<li><b>{html.escape(store.entries[i].name)}</b><br><span class="lora-dataset-before">- {html.escape(", ".join(b))}</span>'
        f'<br><span class="lora-dataset-after">+ {html.escape(", ".join(a))}</span></li>'
        for i, b, a in diffs[:limit])
    more = f"<li>… {len(diffs) - limit}</li>" if len(diffs) > limit else ""
    return f'<ul id="lora_dataset_diff" data-count="{len(diffs)}">{rows}{more}</ul>'


def send_to_train_values(session: DatasetSession) -> tuple[str, str]:
    """(train_data_dir, trigger word) for the Train tab: the folder holding the `<N>_name` folders,
    and the first tag when every image starts with the same one."""
    store = session.require()
    root = store.root
    if not any(f for f in store.folders()) and root.name.split("_", 1)[0].isdigit():
        root = root.parent  # a concept folder itself was loaded
    firsts = {store.tags(i)[0] if store.tags(i) else "" for i in range(len(store))}
    trigger = firsts.pop() if len(firsts) == 1 else ""
    return str(root), trigger


def build_dataset_tab(host, t: Translator | None = None, train_fields: dict | None = None, tabs=None, train_tab_id: str = "train") -> None:
    """Create the tab's components in the current Blocks context. `train_fields` maps
    "train_data_dir" and "trigger" to the Train tab's components; `tabs` is the gr.Tabs holding both."""
    t = t or Translator()
    state = gr.State(None)

    def session_of(s) -> DatasetSession:
        return s if s is not None else DatasetSession(host.access(), host.models_dir())

    with gr.Row(elem_id="lora_dataset_main"):
        with gr.Column(scale=3):
            with gr.Row():
                folder = gr.Textbox(label=t("Dataset folder"), elem_id="lora_dataset_folder", max_lines=1, scale=4,
                                    info=t("A kohya training folder (holding 10_name folders) or one concept folder"))
                caption_ext = gr.Textbox(label=t("Caption extension"), value=".txt", elem_id="lora_dataset_caption_ext", max_lines=1, scale=1)
                load = gr.Button(t("Load"), variant="primary", elem_id="lora_dataset_load", scale=1)
            message = gr.HTML("", elem_id="lora_dataset_message")
            with gr.Row():
                all_of = gr.Dropdown(label=t("Has all of"), multiselect=True, choices=[], elem_id="lora_dataset_all_of")
                any_of = gr.Dropdown(label=t("Has any of"), multiselect=True, choices=[], elem_id="lora_dataset_any_of")
                none_of = gr.Dropdown(label=t("Has none of"), multiselect=True, choices=[], elem_id="lora_dataset_none_of")
                search = gr.Textbox(label=t("Search"), elem_id="lora_dataset_search", max_lines=1)
            shown = gr.HTML("", elem_id="lora_dataset_shown")
            gallery = gr.Gallery(label=t("Images"), elem_id="lora_dataset_gallery", columns=6, height=420, allow_preview=False)
            with gr.Row():
                prev_page = gr.Button("◀", elem_id="lora_dataset_prev", scale=0)
                page = gr.Number(label=t("Page"), value=1, precision=0, elem_id="lora_dataset_page", scale=0)
                next_page = gr.Button("▶", elem_id="lora_dataset_next", scale=0)
            tags_html = gr.HTML(_tag_cloud(DatasetSession(), t), elem_id="lora_dataset_tag_cloud")
        with gr.Column(scale=2):
            with gr.Row():
                undo = gr.Button(t("Undo"), elem_id="lora_dataset_undo")
                redo = gr.Button(t("Redo"), elem_id="lora_dataset_redo")
                save = gr.Button(t("Save"), variant="primary", elem_id="lora_dataset_save")
                undo_save = gr.Button(t("Undo last save"), elem_id="lora_dataset_undo_save")
            with gr.Accordion(t("Selected image"), open=True):
                selected_name = gr.HTML("", elem_id="lora_dataset_selected")
                caption = gr.Textbox(label=t("Caption"), lines=3, elem_id="lora_dataset_caption")
                apply_caption = gr.Button(t("Apply caption"), elem_id="lora_dataset_apply_caption")
            with gr.Accordion(t("Batch edit (the filtered images)"), open=True):
                # shown in the user's language; the handlers get the index (gradio 3.41 dropdowns have no label/value pairs)
                op = gr.Dropdown(label=t("Operation"), choices=[t(o) for o in BATCH_OPS], value=t("add front"), type="index",
                                 elem_id="lora_dataset_op")
                with gr.Row():
                    arg_a = gr.Textbox(label=t("Tags / find"), elem_id="lora_dataset_arg_a", max_lines=1,
                                       info=t("Tags, comma-separated; for replace the tag or pattern; for truncate the token budget (75)"))
                    arg_b = gr.Textbox(label=t("Replace with"), elem_id="lora_dataset_arg_b", max_lines=1)
                    keep = gr.Number(label=t("Keep first N in place (sort)"), value=0, precision=0, elem_id="lora_dataset_keep")
                with gr.Row():
                    preview = gr.Button(t("Preview"), elem_id="lora_dataset_preview")
                    apply = gr.Button(t("Apply"), variant="primary", elem_id="lora_dataset_apply")
                diff = gr.HTML("", elem_id="lora_dataset_diff_box")
            with gr.Accordion(t("Auto-tag (the filtered images)"), open=False):
                tagger = gr.Dropdown(label=t("Tagger"), choices=_tagger_choices(), value=_tagger_choices()[0], allow_custom_value=True,
                                     elem_id="lora_dataset_tagger", info=t("A WD14 model name (downloaded once) or a folder holding model.onnx and selected_tags.csv"))
                with gr.Row():
                    general = gr.Slider(0, 1, value=_general_default(), step=0.0001, label=t("General threshold"), elem_id="lora_dataset_general")
                    character = gr.Slider(0, 1, value=0.85, step=0.01, label=t("Character threshold"), elem_id="lora_dataset_character")
                undesired = gr.Textbox(label=t("Undesired tags"), elem_id="lora_dataset_undesired", max_lines=1)
                with gr.Row():
                    mode = gr.Radio(label=t("Mode"), choices=[(t(m), m) for m in MODES], value="prefill", elem_id="lora_dataset_mode")
                    rating = gr.Checkbox(label=t("Rating tags"), value=False, elem_id="lora_dataset_rating")
                    escape = gr.Checkbox(label=t("Escape brackets"), value=False, elem_id="lora_dataset_escape")
                    blip = gr.Checkbox(label=t("BLIP caption instead"), value=False, elem_id="lora_dataset_blip")
                with gr.Row():
                    autotag = gr.Button(t("Tag"), variant="primary", elem_id="lora_dataset_autotag")
                    cancel = gr.Button(t("Cancel"), elem_id="lora_dataset_cancel")
            with gr.Accordion(t("Folders and repeats"), open=False):
                folders_html = gr.HTML("", elem_id="lora_dataset_folders_box")
                with gr.Row():
                    move_to = gr.Textbox(label=t("Move the filtered images to"), elem_id="lora_dataset_move_to", max_lines=1)
                    move = gr.Button(t("Move"), elem_id="lora_dataset_move")
                with gr.Row():
                    repeats_folder = gr.Textbox(label=t("Folder"), elem_id="lora_dataset_repeats_folder", max_lines=1)
                    repeats = gr.Number(label=t("Repeats"), value=10, precision=0, elem_id="lora_dataset_repeats")
                    set_repeats = gr.Button(t("Set repeats"), elem_id="lora_dataset_set_repeats")
            with gr.Accordion(t("Check dataset"), open=False):
                with gr.Row():
                    check_resolution = gr.Textbox(label=t("Resolution"), value=str(host.model_resolution()), elem_id="lora_dataset_check_resolution", max_lines=1)
                    check_trigger = gr.Textbox(label=t("Trigger word"), elem_id="lora_dataset_check_trigger", max_lines=1)
                check = gr.Button(t("Check"), elem_id="lora_dataset_check")
                report = gr.Textbox(label=t("Report"), lines=8, interactive=False, elem_id="lora_dataset_report")
            with gr.Accordion(t("Crop and resize into a new folder"), open=False):
                with gr.Row():
                    size = gr.Dropdown(label=t("Size"), choices=list(PRESETS), value="sd15-512x512", allow_custom_value=True,
                                       elem_id="lora_dataset_size", info=t("A preset or WIDTHxHEIGHT, multiples of 64"))
                    crop = gr.Radio(label=t("Crop"), choices=[(t("center"), "center"), (t("focus"), "focus")], value="focus", elem_id="lora_dataset_crop",
                                    info=t("focus keeps the most salient part (the subject) in frame"))
                destination = gr.Textbox(label=t("New folder"), elem_id="lora_dataset_destination", max_lines=1)
                prepare = gr.Button(t("Crop and resize"), elem_id="lora_dataset_prepare")
            send = gr.Button(t("Send to Train"), elem_id="lora_dataset_send")

    # -- handlers: each returns the session first, then its outputs ------------------------------
    view_outputs = [gallery, shown, tags_html, page, all_of, any_of, none_of, folders_html, selected_name, caption]

    def view(s: DatasetSession) -> list:
        tags = [tag for tag, _ in s.tag_counts("all")]
        total = len(s.store) if s.store else 0
        visible = len(s.visible())
        sel = s.selected
        name = html.escape(s.store.entries[sel].image()) if s.store and sel is not None else ""
        return [s.gallery(),
                f'<div id="lora_dataset_count" data-visible="{visible}" data-total="{total}">{visible} / {total} {html.escape(t("images"))}'
                f' · {html.escape(t("page"))} {s.page + 1} / {s.pages()}{" · " + html.escape(t("unsaved changes")) if s.store and s.store.dirty else ""}</div>',
                _tag_cloud(s, t), s.page + 1,
                gr.update(choices=tags), gr.update(choices=tags), gr.update(choices=tags),
                _folders_html(s, t), name, s.store.caption(sel) if s.store and sel is not None else ""]

    def guarded(fn):
        def run(s, *args):
            s = session_of(s)
            try:
                text = fn(s, *args)
                return [s, _message(t.text(text or "")), *view(s)]
            except UserError as e:
                return [s, _message(t.text(e), True), *view(s)]
        return run

    outs = [state, message, *view_outputs]
    load.click(guarded(lambda s, f, ext: s.load(f, ext)), [state, folder, caption_ext], outs)
    folder.submit(guarded(lambda s, f, ext: s.load(f, ext)), [state, folder, caption_ext], outs)

    def on_filter(s, a, b, c, q):
        s.set_filter(a, b, c, q)
        return ""
    for comp in (all_of, any_of, none_of):
        comp.change(guarded(on_filter), [state, all_of, any_of, none_of, search], outs)
    search.submit(guarded(on_filter), [state, all_of, any_of, none_of, search], outs)

    def on_page(delta):
        def go(s, p):
            s.page = int(p or 1) - 1 + delta
            return ""
        return go
    prev_page.click(guarded(on_page(-1)), [state, page], outs)
    next_page.click(guarded(on_page(1)), [state, page], outs)
    page.submit(guarded(on_page(0)), [state, page], outs)

    def on_select(s, evt: gr.SelectData):
        s = session_of(s)
        s.select_on_page(evt.index)
        return [s, *view(s)]
    gallery.select(on_select, [state], [state, *view_outputs])

    apply_caption.click(guarded(lambda s, text: s.set_caption(text)), [state, caption], outs)
    undo.click(guarded(lambda s: s.undo()), [state], outs)
    redo.click(guarded(lambda s: s.redo()), [state], outs)
    save.click(guarded(lambda s: s.save()), [state], outs)
    undo_save.click(guarded(lambda s: s.undo_save()), [state], outs)

    def on_preview(s, o, a, b, k):
        s = session_of(s)
        try:
            text, diffs = s.batch(_op(o), a, b, int(k or 0), dry_run=True)
            return s, _message(t.text(text)), _diff_html(s, diffs)
        except UserError as e:
            return s, _message(t.text(e), True), ""
    preview.click(on_preview, [state, op, arg_a, arg_b, keep], [state, message, diff])

    def on_apply(s, o, a, b, k):
        text, _ = s.batch(_op(o), a, b, int(k or 0))
        return text
    apply.click(guarded(on_apply), [state, op, arg_a, arg_b, keep], outs).then(lambda: "", None, [diff])

    def on_autotag(s, name, g, c, und, m, r, esc, use_blip, progress=gr.Progress()):
        from lora_train.tagging import autotag as at

        s.cancelled = False
        tag_images = (at.blip_tagger(name if name and not name.startswith("wd") else None, s.models_dir, s.access)
                      if use_blip else at.wd14_tagger(name, s.models_dir, s.access, general=g, character=c, undesired=und, rating=r, escape=esc))
        change = s.autotag(tag_images, m, progress=lambda done, total: progress((done, total), desc=t("Tagging")),
                           cancel=lambda: getattr(s, "cancelled", False))
        warning = getattr(tag_images, "warning", None)
        return msg("{operation}: {changed} caption(s) changed (not saved yet)", operation=t("Tagged"),
                   changed=len(change.diffs) if change else 0) + (f"\n{warning}" if warning else "")
    def on_tagger(name):
        from lora_train.tagging.wd14 import MODELS

        model = MODELS.get((name or "").strip())
        return gr.update(value=model.general_threshold) if model else gr.update()
    tagger.change(on_tagger, [tagger], [general])
    autotag.click(guarded(on_autotag), [state, tagger, general, character, undesired, mode, rating, escape, blip], outs)

    def on_cancel(s):
        if s is not None:
            s.cancelled = True
        return _message(t("Cancelling after the current batch"))
    cancel.click(on_cancel, [state], [message])

    def on_check(s, resolution, trigger):
        s = session_of(s)
        try:
            return s, t.text(s.check(resolution, trigger))
        except UserError as e:
            return s, t.text(e)
    check.click(on_check, [state, check_resolution, check_trigger], [state, report])

    def on_prepare(s, dst, sz, how, progress=gr.Progress()):
        return s.prepare(dst, sz, how, progress=lambda done, total, _: progress((done, total), desc=t("Crop and resize")))
    prepare.click(guarded(on_prepare), [state, destination, size, crop], outs).then(
        lambda s: str(s.store.root) if s is not None and s.store else gr.update(), [state], [folder])

    move.click(guarded(lambda s, f: s.move(f)), [state, move_to], outs)
    set_repeats.click(guarded(lambda s, f, n: s.set_repeats(f, int(n or 0))), [state, repeats_folder, repeats], outs)

    if train_fields:
        def on_send(s):
            s = session_of(s)
            try:
                root, trigger = send_to_train_values(s)
            except UserError as e:
                return [_message(t.text(e), True), gr.update(), gr.update()] + ([gr.update()] if tabs is not None else [])
            out = [_message(t.labelled("Sent; the folder has unsaved edits: save them before training" if s.store.dirty
                                       else "Sent to the Train tab", str(root))), root, trigger or gr.update()]
            return out + [gr.update(selected=train_tab_id)] if tabs is not None else out
        send.click(on_send, [state], [message, train_fields["train_data_dir"], train_fields["trigger"], *([tabs] if tabs is not None else [])])


def _op(index) -> str:
    """The batch operation the dropdown (type="index") chose."""
    if isinstance(index, int) and 0 <= index < len(BATCH_OPS):
        return BATCH_OPS[index]
    raise UserError(msg("choose an operation"))


def _general_default() -> float:
    from lora_train.tagging.wd14 import MODELS

    return MODELS[_tagger_choices()[0]].general_threshold


def _tagger_choices() -> list[str]:
    from lora_train.tagging.wd14 import MODELS

    preferred = "wd-v1-4-moat-tagger-v2"  # kohya's GUI default
    return sorted(MODELS, key=lambda n: (n != preferred, n))

