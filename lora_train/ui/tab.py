"""The Train tab (gradio 3.41 / 4.40 Blocks). Plain gradio only: the WebUI and the standalone server both
render it; everything it does goes through a RunManager and a Host."""

from __future__ import annotations

import html
import itertools
import re
from pathlib import Path
from typing import Optional

import gradio as gr

from lora_train.app import guard
from lora_train.app.runs import RunManager, RunRequest
from lora_train.errors import UserError
from lora_train.host.base import Host
from lora_train.ui import chart, compat, form, presets
from lora_train.ui.i18n import Translator
from lora_train.ui.latest import Newest
from lora_train.ui.render_panel import RenderPanel

DEFAULT_WEIGHTS = "1, 0.75, 0.5, 0.25, 0"


def _message(text: str, error: bool = False, run_id: str = "") -> str:
    """The message under the buttons. One about a run (Started, Queued, Resuming, Stopping) carries its
    id, so the refresh can replace it with how the run ended."""
    cls = "lora-train-error" if error else "lora-train-note"
    return f'<div class="{cls}" data-error="{int(error)}" data-run="{html.escape(run_id)}" style="white-space: pre-line">{html.escape(text)}</div>'


_MESSAGE_RUN = re.compile(r'data-run="([^"]+)"')
END_MESSAGES = {"finished": "Finished", "cancelled": "Stopped", "failed": "Failed", "refused": "Cannot start"}


def _message_after(message_html: str, manager: RunManager, t) -> Optional[str]:
    """The message once the run it speaks of has ended (how, and when), else None (leave it)."""
    m = _MESSAGE_RUN.search(message_html or "")
    if not m:
        return None
    try:
        run = manager.run(html.unescape(m.group(1)))
    except KeyError:
        return None
    if not run.ended:
        return None
    return _message(t.labelled(END_MESSAGES[run.phase], f"{run.name} ({chart.ended_time(run.ended_at)})"), error=run.phase in ("failed", "refused"))


def _fit_buckets(config) -> None:
    """Bucket bounds around a small training size (the presets' 256..1024 is for 512 px and up):
    sd-scripts refuses a min_bucket_reso above the resolution, a mistake nobody makes on purpose."""
    d = config.dataset
    try:
        side = min(int(v) for v in str(d.resolution).split(",")) if d.resolution else None
    except ValueError:
        return  # the plan reports the bad resolution
    if side and d.enable_bucket and d.min_bucket_reso > side:
        d.min_bucket_reso = side
        d.max_bucket_reso = max(d.max_bucket_reso, side)


def _model_html(host: Host, t) -> str:
    # read again on every refresh: the WebUI may load or switch its checkpoint after the tab is built
    return f'<div id="lora_train_model">{html.escape(t.labelled("Model", ""))}<b>{html.escape(t.text(host.model_label()))}</b></div>'


def _preview_caption(path: str, t) -> str:
    # the epoch and step are what tell a run's samples apart
    from lora_train.sample.previews import sample_epoch_step

    at = sample_epoch_step(path)
    return f"{t('Epoch')} {at[0]} · {t('Step')} {at[1]}" if at else Path(path).stem


def _subject(index) -> str:
    """The preset subject the dropdown (type="index") chose; the concept preset when none is."""
    return presets.SUBJECTS[index] if isinstance(index, int) and 0 <= index < len(presets.SUBJECTS) else "concept"


def base_for(host: Host) -> str:
    """The preset base that fits the host's model."""
    return "SDXL" if host.model_family() == "sdxl" else "SD1.5"


def fit_model(config, host: Host, subject: str, base: str) -> None:
    """Apply the preset `subject` x `base` (when given) and the model's own resolution to `config`."""
    if base:
        config.update(presets.preset(subject, base), source="preset")
    config.set("resolution", str(host.model_resolution()))
    _fit_buckets(config)  # the built-in 64 px models


def initial_config(host: Host):
    from lora_train.train.config import TrainConfig

    config = TrainConfig()
    # sd-scripts' bare defaults train 1600 steps at lr 2e-6: useless for a LoRA. Start from the
    # concept preset for the model's family, which is what the tab shows before anyone touches it.
    fit_model(config, host, "concept", base_for(host))
    config.set("output_name", "my_lora")
    return config


def model_message(current_message: str, text: str) -> Optional[str]:
    """The message after the form followed the model, or None to keep the current one: an error the
    user has not read yet (a refused Start) stays; the form still follows the model."""
    return None if 'data-error="1"' in (current_message or "") else _message(text)


_TICKS = itertools.count()


def model_token(version: int, seen: int) -> str:
    """The hidden box whose change runs the follow of a newly loaded model (on_model): the model's
    version once the form has followed it, and a new value on every refresh until then (a field the
    user was typing into made the follow wait for the next refresh)."""
    return str(version) if version == seen else f"{version}@{next(_TICKS)}"


def follow_model(host: Host, flds: list, seen: int, subject: str, base: str, values: list, t, running: bool = False):
    """After the host loaded a checkpoint (its model version moved past `seen`): the form's base preset
    and resolution for it, and a message saying what changed. -> (version, base, field values, message)
    with None for what stays.

    `running`: a run holds the model now. A checkpoint that appears then is the one the run itself
    loaded (Forge loads its chosen checkpoint only when something first uses it, and the run's Start
    can be that first use), so it is taken as seen and the form stays as the user filled it for that
    run: no preset or resolution is put over the values the run was started with."""
    version = host.model_version()
    if version == seen:
        return seen, None, None, None
    if host.model_family() is None:  # still loading: look again on the next refresh
        return seen, None, None, None
    if running:
        return version, None, None, None
    config = form.config_from_values(flds, values)
    want = base_for(host)
    before = config.dataset.resolution
    fit_model(config, host, subject, want if want != base else "")
    changes = []
    if want != base:
        changes.append(t.format("preset {subject} / {base} applied", subject=t(subject), base=want))
    if config.dataset.resolution != before:
        changes.append(t.format("resolution set to {resolution}", resolution=config.dataset.resolution))
    if not changes:
        return version, None, None, None
    message = t.format("The WebUI loaded {model}: {changes}", model=t.text(host.model_label()), changes=" · ".join(changes))
    return version, want, form.values_from_config(flds, config), message


def changed_only(new_values: list, values: list) -> list:
    """Updates for the fields whose value the model's preset changed, no-ops for the rest: the values
    were read when the refresh began, and writing them all back would undo what the user typed since
    (a dataset folder filled in just after the page loaded came back empty)."""
    return [gr.update(value=new) if new != old else gr.update() for new, old in zip(new_values, values)]


def create_train_tab(manager: RunManager, host: Host, t: Optional[Translator] = None) -> gr.Blocks:
    t = t or Translator()
    flds = form.fields()
    config0 = initial_config(host)
    comps: dict[str, gr.components.Component] = {}
    renders = RenderPanel(manager, t)  # images the model makes itself: reg_data_dir, the base-style LoRA

    def make(f: form.Field):
        label = f.key
        info = t(form.HELP[f.key]) if f.key in form.HELP else None
        value = form.ui_value(f, config0.get(f.key))
        eid = f"lora_train_{f.key}"
        if f.kind == "checkbox":
            c = gr.Checkbox(label=label, value=value, info=info, elem_id=eid)
        elif f.kind == "dropdown":
            c = gr.Dropdown(label=label, choices=f.choices, value=value, info=info, elem_id=eid)
        elif f.kind == "number":
            c = gr.Number(label=label, value=value, info=info, elem_id=eid)
        else:
            c = gr.Textbox(label=label, value=value, info=info, elem_id=eid, lines=1, max_lines=1)
        comps[f.key] = c
        return c

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(elem_id="lora_train_main"):
            with gr.Column(scale=3, elem_id="lora_train_settings"):
                model_label = gr.HTML(_model_html(host, t))
                with gr.Row():
                    # shown in the user's language; handlers get the index (gradio 3.41 dropdowns have no label/value pairs)
                    subject = gr.Dropdown(label=t("Preset: subject"), choices=[t(s) for s in presets.SUBJECTS], value=t("concept"),
                                          type="index", elem_id="lora_train_preset_subject")
                    base = gr.Dropdown(label=t("Preset: base"), choices=list(presets.BASES),
                                       value=base_for(host), elem_id="lora_train_preset_base")
                    apply_preset = gr.Button(t("Apply preset"), elem_id="lora_train_apply_preset")
                mode = gr.Radio(label=t("Mode"), choices=[t("Basic"), t("Expert")], value=t("Basic"), elem_id="lora_train_mode")
                with gr.Group():
                    for f in flds:
                        if f.key == "train_data_dir":
                            make(f)
                            trigger = gr.Textbox(label=t("Trigger word"), info=t("Written as the card's activation text; the default preview prompt"),
                                                 elem_id="lora_train_trigger", max_lines=1)
                        elif f.basic:
                            make(f)
                    network_type = gr.Radio(label=t("Network type"), choices=list(presets.NETWORK_TYPES), elem_id="lora_train_network_type",
                                            value=presets.network_type_of(config0.network),
                                            info=t("Sets network_dim / network_alpha / conv_dim / conv_alpha as the guides do; LyCORIS types set network_module and algo (Expert)"))
                    preview_prompts = gr.Textbox(label=t("Preview prompts"), lines=2, elem_id="lora_train_preview_prompts",
                                                 info=t("One per line, sd-scripts options allowed (--n negative --w 512 --h 512 --d seed --s steps --l cfg); empty = the trigger word"))
                    preview_every_epoch = gr.Checkbox(label=t("Preview every epoch"), value=True, elem_id="lora_train_preview_every_epoch")
                    use_txt2img = gr.Checkbox(label=t("Previews from the txt2img tab's settings"), value=False, elem_id="lora_train_use_txt2img",
                                              info=t("In the WebUI: prompt, negative prompt, size, steps, sampler, CFG and seed as the txt2img tab shows them at Start"))
                    txt2img_params = gr.Textbox(visible=False, elem_id="lora_train_txt2img_params")
                    preferred_weight = gr.Number(label=t("Preferred weight"), value=1.0, elem_id="lora_train_preferred_weight")
                renders.reg_accordion()
                with gr.Column(visible=False, elem_id="lora_train_expert") as expert:
                    for section, title in form.SECTION_TITLES.items():
                        rest = [f for f in flds if f.section == section and not f.basic]
                        if rest:
                            with gr.Accordion(t(title), open=False):
                                for f in rest:
                                    make(f)
                    with gr.Accordion(t("Config file (sd-scripts / lora-scripts TOML, kohya_ss JSON)"), open=False):
                        config_path = gr.Textbox(label=t("Path"), elem_id="lora_train_config_path", max_lines=1)
                        with gr.Row():
                            load_config = gr.Button(t("Load"), elem_id="lora_train_load_config")
                            save_config = gr.Button(t("Save"), elem_id="lora_train_save_config")

            with gr.Column(scale=2, elem_id="lora_train_run"):
                with gr.Row():
                    start = gr.Button(t("Start"), variant="primary", elem_id="lora_train_start")
                    enqueue = gr.Button(t("Add to queue"), elem_id="lora_train_enqueue")
                    stop = gr.Button(t("Stop"), variant="stop", elem_id="lora_train_stop")
                with gr.Row():
                    save_now = gr.Button(t("Save now"), elem_id="lora_train_save_now")
                    resume = gr.Button(t("Resume"), elem_id="lora_train_resume")
                    refresh = gr.Button(t("Refresh"), elem_id="lora_train_refresh")
                    # hidden by style.css (kept on the page): its change event follows a newly loaded model
                    model_now = gr.Textbox("", elem_id="lora_train_model_now", elem_classes=["lora-train-hidden"],
                                           show_label=False, container=False, interactive=False)
                message = gr.HTML("", elem_id="lora_train_message")
                with gr.Accordion(t("Dataset plan"), open=True):
                    plan = gr.HTML(_message(t("Set a dataset folder to see the plan.")), elem_id="lora_train_plan")
                    with gr.Row():
                        check = gr.Button(t("Check dataset"), elem_id="lora_train_check")
                        # a few training steps on the model: on a click only, never on every field change
                        estimate = gr.Button(t("Estimate time and memory"), elem_id="lora_train_estimate_button")
                status = gr.HTML(chart.status_html(None, t), elem_id="lora_train_status")
                loss = gr.HTML(chart.loss_chart([], t), elem_id="lora_train_loss")
                previews = gr.Gallery(label=t("Previews"), elem_id="lora_train_previews", columns=4, height=240)
                files = gr.HTML(chart.files_html(None, t), elem_id="lora_train_files")
                with gr.Accordion(t("Compare epochs x weights"), open=False):
                    grid_weights = gr.Textbox(label=t("Grid weights"), value=DEFAULT_WEIGHTS, elem_id="lora_train_grid_weights", max_lines=1)
                    grid_prompt = gr.Textbox(label=t("Prompt"), elem_id="lora_train_grid_prompt", max_lines=1,
                                             info=t("Empty = the trigger word"))
                    grid_button = gr.Button(t("Render grid"), elem_id="lora_train_grid")
                    grid_image = gr.Image(label=t("Grid"), type="filepath", interactive=False, elem_id="lora_train_grid_image")
                renders.base_accordion()

        field_comps = [comps[f.key] for f in flds]
        # -1: fit the form on the first refresh of every page, since the WebUI restores its fields from
        # ui-config.json (stored when the tab was first built, before any checkpoint had loaded)
        model_seen = gr.State(-1)
        # txt2img_params last: the page's loraTrainReadTxt2img fills the last input
        extra = [trigger, network_type, preview_prompts, preview_every_epoch, preferred_weight, use_txt2img, txt2img_params]

        def build(values) -> tuple:
            fv, (trig, ntype, prompts_text, every_epoch, weight, from_txt2img, params) = values[: len(flds)], values[len(flds):]
            config = form.config_from_values(flds, fv)
            _fit_buckets(config)
            if not config.dataset.train_data_dir:
                raise UserError(t("Set the dataset folder (train_data_dir) first."))
            if ntype == "LoCon" and config.network.network_module == "networks.lora" and not config.network.conv_dim:
                config.network.conv_dim, config.network.conv_alpha = 8, config.network.conv_alpha or 1.0
            prompts = [line.strip() for line in (prompts_text or "").splitlines() if line.strip()]
            if from_txt2img:
                from lora_train.ui.txt2img import preview_line

                line = preview_line(params)
                if line is None:
                    raise UserError(t("Previews from the txt2img tab's settings: there is no txt2img tab here, or its prompt is empty."))
                prompts = [line]
            if config.training.seed is None:
                config.training.seed = 1234  # previews comparable across epochs
            return config, RunRequest(config, trigger=(trig or "").strip(), preview_prompts=prompts,
                                      preferred_weight=float(weight if weight is not None else 1.0),
                                      previews=bool(every_epoch))

        def on_mode(value):
            return gr.update(visible=value == t("Expert"))

        def on_preset(subj, b, *values):
            try:
                subj = _subject(subj)
                config = form.config_from_values(flds, values)
                applied = t.labelled("Preset applied", f"{t(subj)} / {b}")
                if b == base_for(host):  # the preset for the loaded model: at that model's own size
                    fit_model(config, host, subj, b)
                    applied += " · " + t.format("resolution set to {resolution}", resolution=config.dataset.resolution)
                else:
                    config.update(presets.preset(subj, b), source="preset")
                return [*form.values_from_config(flds, config), _message(applied)]
            except (UserError, KeyError) as e:
                return [*values, _message(t.text(e), True)]

        plans = Newest()  # Check, Estimate and the fields' blur all write the plan panel

        def newest_plan(fn):
            def run(*values):
                ticket = plans.start()
                out = fn(*values)
                return out if plans.keep(ticket) else gr.update()
            return run

        @newest_plan
        def on_plan(*values):
            from lora_train.app import job

            if not str(values[[f.key for f in flds].index("train_data_dir")] or "").strip():
                return _message(t("Set a dataset folder to see the plan."))  # nothing to plan yet, and no error
            try:
                config, _ = build(values)
                return chart.plan_html(job.plan_on_host(config, host), t)
            except UserError as e:
                return chart.error_html(t.text(e))

        @newest_plan
        def on_estimate(*values):
            try:
                config, request = build(values)
                estimated_plan, lines = manager.estimate(config, request)
                return chart.plan_html(estimated_plan, t, [t.text(line) for line in lines])
            except UserError as e:
                return chart.error_html(t.text(e))

        def submit(start_now: bool, *values):
            try:
                _, request = build(values)
                s = manager.submit(request, start=start_now)
                return _message(t.labelled("Started" if start_now else "Queued", s.name), run_id=s.id)
            except UserError as e:
                return _message(t.text(e), True)

        def on_stop():
            current = manager.latest()
            if not manager.stop():
                return _message(t("Nothing is running."))
            return _message(t("Stopping: the run saves and publishes its last state."), run_id=current.id if current else "")

        def on_save_now():
            return _message(t("A save is written after the current step.") if manager.save_now() else t("Nothing is running."))

        def on_resume():
            try:
                s = manager.resume()
                return _message(t.labelled("Resuming", s.name), run_id=s.id)
            except UserError as e:
                return _message(t.text(e), True)

        def on_refresh(message_html, base_html, seen):
            snap = manager.snapshot()
            current = snap["latest"]
            previews_value = [(p, _preview_caption(p, t)) for p in (current.previews[-8:] if current else [])]
            return (_model_html(host, t), chart.status_html(current, t, snap["queue"], snap["paused"]),
                    chart.loss_chart(current.losses if current else [], t, validation=current.validation if current else []),
                    previews_value,
                    chart.files_html(current, t),
                    _message_after(message_html, manager, t) or gr.update(),
                    _message_after(base_html, manager, t) or gr.update(),  # the base-style button's run
                    model_token(host.model_version(), seen))

        def on_model(seen, current_message, subj, b, *values):
            try:
                version, new_base, new_values, text = follow_model(host, flds, seen, _subject(subj), b, list(values), t,
                                                                     running=manager.running() is not None)
            except (UserError, KeyError):  # a field the user is typing into: try on the next refresh
                return [seen, gr.update(), *[gr.update()] * len(values), gr.update()]
            if text is None:
                return [version, gr.update(), *[gr.update()] * len(values), gr.update()]
            shown = model_message(current_message, text)
            return [version, new_base, *changed_only(new_values, list(values)), gr.update() if shown is None else shown]

        def on_grid(weights_text, prompt, trig):
            latest = manager.latest()
            if latest is None or not latest.published:
                return None, _message(t("No LoRA saved yet"), True)
            try:
                weights = [float(w) for w in weights_text.replace(";", ",").split(",") if w.strip()]
            except ValueError:
                return None, _message(t("Weights must be numbers separated by commas"), True)
            files = sorted((Path(p) for p in latest.published if "-interrupted" not in p), key=lambda p: p.stat().st_mtime)
            out = Path(latest.work_dir) / "grid.png"
            try:
                path = host.xyz_grid(files or [Path(latest.published[-1])], weights, (prompt or trig or latest.trigger or "").strip() or latest.name, 1234, out)
            except UserError as e:
                return None, _message(t.text(e), True)
            if path is None:
                return None, _message(t("This host cannot render a grid"), True)
            return str(path), _message(str(path))

        def on_load_config(path, ntype, *values):
            try:
                config = guard.load_config(host.access(), path)
                # what reading it translated or left out, as the CLI prints it
                said = [f"{t('warning')}: {t.text(w)}" for w in config.warnings] + [f"{t('note')}: {t.text(n)}" for n in config.notes]
                return [*form.values_from_config(flds, config), presets.network_type_of(config.network),
                        _message("\n".join([t.labelled("Loaded", path), *said]))]
            except (UserError, OSError) as e:
                return [*values, ntype, _message(t.text(e), True)]

        def on_network_type(ntype, *values):
            """The guides' defaults for the type chosen, over the form."""
            try:
                config = form.config_from_values(flds, values)
                config.update(presets.NETWORK_TYPES[ntype], source=ntype)
                # the rank fields as the form now shows them (an empty conv_dim: no 3x3 convs), "-" for empty
                shown = ", ".join(f"{k} {'-' if v is None else v}" for k, v in presets.NETWORK_TYPES[ntype].items()
                                  if k in form.BASIC or k.startswith("conv_"))
                return [*form.values_from_config(flds, config), _message(t.format("Network type {name}: {values}", name=ntype, values=shown))]
            except (UserError, KeyError) as e:
                return [*values, _message(t.text(e), True)]

        def on_save_config(path, *values):
            try:
                config, _ = build(values)
                written = guard.save_config(host.access(), config, path)
                return _message(t.labelled("Saved", str(written)))
            except (UserError, OSError) as e:
                return _message(t.text(e), True)

        mode.change(on_mode, [mode], [expert])
        apply_preset.click(on_preset, [subject, base, *field_comps], [*field_comps, message])
        all_inputs = [*field_comps, *extra]
        check.click(on_plan, all_inputs, [plan])
        estimate.click(on_estimate, all_inputs, [plan])
        for key in ("train_data_dir", "reg_data_dir", "resolution"):
            comps[key].blur(on_plan, all_inputs, [plan])
            comps[key].submit(on_plan, all_inputs, [plan])
        for key in ("max_train_epochs", "max_train_steps", "train_batch_size", "enable_bucket", "gradient_accumulation_steps",
                    "validation_split", "validation_seed"):  # the held-out images leave the training set
            getattr(comps[key], "blur" if isinstance(comps[key], gr.Textbox) else "change")(on_plan, all_inputs, [plan])
        start.click(lambda *v: submit(True, *v), all_inputs, [message], **compat.js("loraTrainReadTxt2img"))
        enqueue.click(lambda *v: submit(False, *v), all_inputs, [message], **compat.js("loraTrainReadTxt2img"))
        stop.click(on_stop, [], [message])
        save_now.click(on_save_now, [], [message])
        resume.click(on_resume, [], [message])
        refresh.click(on_refresh, [message, renders.base_message, model_seen],
                      [model_label, status, loss, previews, files, message, renders.base_message, model_now], show_progress=False)
        # the whole form goes to the server and back only when the model moved: sent on every refresh
        # (1.5 s), its 171 fields cost the WebUI's Python thread enough to double a 64 px run's steps
        model_now.change(on_model, [model_seen, message, subject, base, *field_comps], [model_seen, base, *field_comps, message],
                         show_progress=False)
        grid_button.click(on_grid, [grid_weights, grid_prompt, trigger], [grid_image, message])
        load_config.click(on_load_config, [config_path, network_type, *field_comps], [*field_comps, network_type, message])
        network_type.input(on_network_type, [network_type, *field_comps], [*field_comps, message])
        save_config.click(on_save_config, [config_path, *all_inputs], [message])
        renders.wire(comps, build, all_inputs, plan=(on_plan, all_inputs, [plan]))
    tab.lora_fields = {"train_data_dir": comps["train_data_dir"], "trigger": trigger}  # for the Dataset tab's "Send to Train"
    return tab
