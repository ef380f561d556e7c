"""The AUTOMATIC1111 WebUI (v1.10) host: training runs on the checkpoint the WebUI has loaded.

This package is the only code of `lora_train` that imports the WebUI's `modules.*` (and the built-in
Lora extension's `networks`), always inside functions, so importing it costs nothing and the tests can
put fakes in `sys.modules`. Only `scripts/lora_train_tab.py` imports it. One job per file:
`webui.py` reads the WebUI's state, `host.py` is the Host, `refusals.py` says why a run cannot start,
`session.py` holds the WebUI for a run, `memory.py` undoes merged LoRA weights and handles --medvram,
`previews.py` renders previews through txt2img, `selftest.py` loads a file with the WebUI's Lora
loader, `xyz.py` adds the X/Y/Z plot axes and renders the comparison grid, `xyz_blocks.py` bakes
the block-weights axis' copies and registers them with the Lora extension.

What a run does to the WebUI (see the reference notes, "Design checklist"):
- It holds `call_queue.queue_lock` from start to end, in the run's own thread: txt2img, the API and
  settings that reload weights wait for it (the lock is FIFO and not re-entrant, so nothing here
  calls anything that takes it again). It is registered as a task `task(lora-train-<run id>)` with
  `progress` and `shared.state`, so the stock progress API reports it.
- Before training it puts back the base weights the built-in Lora extension merged in place, drops
  hypernetworks, and trains on `shared.sd_model` through `LdmAdapter`; the trainer's own hooks are
  removed when it ends, so the UNet is bit-identical afterwards.
- Stop is the run manager's own event: the txt2img Interrupt button (`shared.state.interrupted`)
  is global and the WebUI sets it on every "Reload UI", so it does not stop training.
- `--medvram` keeps the UNet, text encoder and VAE on the CPU and swaps one at a time onto the GPU
  through forward hooks. A run then trains the UNet only, caches latents and (where captions are
  fixed) text-encoder outputs before the first step, and pins the UNet on the GPU: after the caches
  nothing else runs, so it stays there. Our LoRA modules hook the layers from outside, so swaps
  never move them or the optimizer state. `--lowvram` is refused: it moves each UNet block off the
  GPU right after its forward pass, which breaks the backward pass.
"""

from lora_train.host.a1111.host import A1111Host
from lora_train.host.a1111.webui import SETTING_ALLOWED_DIRS, SETTING_PREVIEW_STEPS, SETTING_XYZ_LORA, on_model_loaded, task_id
from lora_train.host.a1111.xyz import install_xyz_axes

__all__ = ["A1111Host", "SETTING_ALLOWED_DIRS", "SETTING_PREVIEW_STEPS", "SETTING_XYZ_LORA", "install_xyz_axes", "on_model_loaded", "task_id"]
