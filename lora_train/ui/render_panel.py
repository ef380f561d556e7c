"""The Train tab's accordions for images the model makes itself (gradio 3.41 / 4.40): regularization images into
the form's reg_data_dir, and the base-style LoRA (NAME_BASE, then NAME-distilled). The work is in
`app/model_images.py`; this file makes the components where the tab places them and wires them once
the tab's inputs exist (`wire`)."""

from __future__ import annotations

from typing import Callable

import gradio as gr

from lora_train.app.base_style import PRESETS
from lora_train.app.model_images import ModelImages
from lora_train.app.runs import RunManager
from lora_train.errors import UserError, msg
from lora_train.ui import compat
from lora_train.ui.i18n import Translator

# sd-scripts' guide (train_README: "a few hundred are desirable; too few and the class images are not
# generalized"), and sd-scripts uses at most images x repeats of them an epoch (e.g. 20 x 10), the rest unused
REG_IMAGES = 200


class RenderPanel:
    def __init__(self, manager: RunManager, t: Translator):
        self.work = ModelImages(manager)
        self.t = t

    def reg_accordion(self) -> None:
        t = self.t
        with gr.Accordion(t("Regularization images from the model"), open=False, elem_id="lora_train_reg_images"):
            self.reg_prompt = gr.Textbox(label=t("Class prompt"), max_lines=1, elem_id="lora_train_reg_prompt",
                                         info=t("What the images show without your subject, e.g. 'a photo of a woman' or '1girl'; also each image's caption"))
            with gr.Row():
                self.reg_n = gr.Number(label=t("Images"), value=REG_IMAGES, precision=0, elem_id="lora_train_reg_n",
                                       info=t("sd-scripts uses at most images x repeats of the dataset an epoch; its guide suggests a few hundred"))
                self.reg_repeats = gr.Number(label=t("Repeats"), value=1, precision=0, elem_id="lora_train_reg_repeats",
                                             info=t("The <repeats>_<class> folder's repeats"))
            self.reg_button = gr.Button(t("Make regularization images"), elem_id="lora_train_reg_make")
            self.reg_message = gr.HTML("", elem_id="lora_train_reg_message")

    def base_accordion(self) -> None:
        t = self.t
        with gr.Accordion(t("Base-style LoRA (NAME_BASE, then NAME-distilled)"), open=False, elem_id="lora_train_base_style"):
            self.base_n = gr.Number(label=t("Images"), value=None, precision=0, elem_id="lora_train_base_n",
                                    info=t("Empty = one per training image, rendered from its caption without the trigger word"))
            self.gp1 = gr.Textbox(label="GP1", value=PRESETS["GP1"], max_lines=1, elem_id="lora_train_base_gp1",
                                  info=t("Block weights of NAME in NAME:1:GP1 (17 values for SD1/SD2, 12 or 20 for SDXL)"))
            self.gp2 = gr.Textbox(label="GP2", value=PRESETS["GP2"], max_lines=1, elem_id="lora_train_base_gp2",
                                  info=t("Block weights of NAME_BASE in NAME_BASE:-1:GP2"))
            self.base_button = gr.Button(t("Train base-style LoRA"), elem_id="lora_train_base_make")
            self.base_message = gr.HTML("", elem_id="lora_train_base_message")

    # -- handlers (called by gradio; tests call them directly) ---------------------------------------
    def on_reg(self, prompt, n, repeats, resolution, seed, current):
        """-> (reg_data_dir, message): the rendered (or reused) folder, or the field as it was and the error."""
        from lora_train.ui.tab import _message

        lines: list[str] = []
        try:
            folder = self.work.reg_images(prompt, n, repeats, resolution, seed, log=lines.append)
        except (UserError, OSError) as e:
            return current, _message(self.t.text(e), True)
        lines.append(msg("reg_data_dir: {path}", path=folder))
        return str(folder), _message("\n".join(self.t.text(line) for line in lines))

    def on_base(self, build: Callable, n, gp1, gp2, *values):
        """-> the message: what was rendered, and the NAME_BASE run started (the tab's status follows it)."""
        from lora_train.ui.tab import _message

        lines: list[str] = []
        try:
            config, request = build(values)
            status = self.work.base_style(config, request.trigger, n, {"GP1": gp1 or "", "GP2": gp2 or ""}, log=lines.append)
        except (UserError, OSError) as e:
            return _message(self.t.text(e), True)
        lines.append(msg("'{base}' trains now; when it finishes, {name}-distilled is written into the LoRA folder (its line is in the run's messages)",
                         base=status.name, name=config.saving.output_name))
        return _message("\n".join(self.t.text(line) for line in lines), run_id=status.id)  # the refresh says how it ended

    def wire(self, fields: dict, build: Callable, all_inputs: list, plan=None) -> None:
        """`fields`: the form's components by sd-scripts key; `build(values) -> (config, RunRequest)` over
        `all_inputs`, whose last input the page fills with the txt2img tab's settings, as for Start (it
        drops one output value: the button has one output). `plan`: (handler, inputs, outputs) that
        shows the dataset plan again once reg_data_dir is filled."""
        filled = self.reg_button.click(self.on_reg, [self.reg_prompt, self.reg_n, self.reg_repeats, fields["resolution"], fields["seed"],
                                                     fields["reg_data_dir"]], [fields["reg_data_dir"], self.reg_message])
        if plan is not None:
            filled.then(*plan)
        self.base_button.click(lambda *v: self.on_base(build, *v), [self.base_n, self.gp1, self.gp2, *all_inputs],
                               [self.base_message], **compat.js("loraTrainReadTxt2img"))
