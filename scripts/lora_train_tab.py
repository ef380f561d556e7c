"""LoRA Train in the AUTOMATIC1111 WebUI (or Forge, `host_class`): the "LoRA Train" tab, its settings section and the X/Y/Z
plot axes. The WebUI imports this file at start-up and again on every "Reload UI".

Everything else lives in the `lora_train` package beside this folder. The WebUI puts the extension
folder on `sys.path` only while it imports this file (and restores the old list afterwards), so the
package is imported now and the folder is appended to `sys.path` again in every callback.
"""

import os
import sys

from modules import script_callbacks, scripts, shared


def _extension_dir() -> str:
    base = scripts.basedir()  # the extension folder, but only during this import
    if base and os.path.isfile(os.path.join(base, "lora_train", "__init__.py")):
        return base
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


EXTENSION_DIR = _extension_dir()


def _ensure_importable() -> None:
    # appended, not prepended: nothing in the extension folder may shadow the WebUI's own modules
    if EXTENSION_DIR not in sys.path:
        sys.path.append(EXTENSION_DIR)


_ensure_importable()

from lora_train.app import runs  # noqa: E402  (needs the path above)
from lora_train.host import a1111  # noqa: E402

SECTION = ("lora_train", "LoRA Train", "training")


def host_class():
    """Forge (stable-diffusion-webui-forge, which has `modules_forge`) or the AUTOMATIC1111 WebUI."""
    import importlib.util

    if importlib.util.find_spec("modules_forge") is not None:
        from lora_train.host.forge import ForgeHost

        return ForgeHost
    return a1111.A1111Host


def on_ui_tabs():
    _ensure_importable()
    from lora_train.ui import i18n
    from lora_train.ui.tabs import create_tabs

    manager = runs.process_manager(host_class())
    # Built in the chosen language: the WebUI's page script only translates whole texts, and the tab
    # composes some ("Model: ...", status rows), so the server side does it as the standalone UI does.
    lang = getattr(shared.opts, "localization", "None")
    t = i18n.Translator(lang if lang in i18n.available() else None)
    blocks = create_tabs(manager, manager.host, t)
    return [(blocks, "LoRA Train", "lora_train")]


def on_ui_settings():
    import gradio as gr

    options = shared.options_section(SECTION, {
        a1111.SETTING_XYZ_LORA: shared.OptionInfo(
            "", "LoRA that the X/Y/Z plot's [LoRA Train] axes change", gr.Textbox,
        ).info("its file name without extension; empty = the last LoRA a run published"),
        a1111.SETTING_PREVIEW_STEPS: shared.OptionInfo(
            20, "Sampling steps of preview images during training", gr.Slider, {"minimum": 1, "maximum": 150, "step": 1},
        ).info("for preview prompts without --s"),
        a1111.SETTING_ALLOWED_DIRS: shared.OptionInfo(
            "", "Folders the Dataset tab may open, besides the WebUI data folder and its train folder", gr.Textbox,
        ).info("comma-separated; ignored when the WebUI is reachable from other machines without --enable-insecure-extension-access"),
    })
    restricted = getattr(shared, "restricted_opts", None)
    if isinstance(restricted, set):  # --hide-ui-dir-config: like the WebUI's own folder settings
        restricted.add(a1111.SETTING_ALLOWED_DIRS)
    for key, info in options.items():
        shared.opts.add_option(key, info)


def on_before_ui():
    _ensure_importable()
    try:
        a1111.install_xyz_axes()
    except Exception as e:  # the X/Y/Z script is optional
        print(f"LoRA Train: could not add the X/Y/Z plot axes: {type(e).__name__}: {e}", file=sys.stderr)


def on_unload():
    """UI reload (or the script being unloaded): stop the run so it saves its state and releases the
    model before the WebUI re-imports everything; the manager itself survives for the new tab."""
    manager = runs.existing_process_manager()
    if manager is not None:
        manager.shutdown()


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_model_loaded(a1111.on_model_loaded)  # the tab follows the checkpoint the WebUI loads
script_callbacks.on_before_reload(on_unload)
script_callbacks.on_script_unloaded(on_unload)
