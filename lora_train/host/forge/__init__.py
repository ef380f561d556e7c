"""The stable-diffusion-webui-forge host: training runs on the checkpoint Forge has loaded (SD1.x, SDXL).

Forge keeps the A1111 WebUI's `modules.*` APIs (queue lock, `shared.state`, progress, `processing`,
X/Y/Z, the `networks` module of its LoRA extension), so `ForgeHost` is the A1111 host with Forge's own
model underneath. Like `host/a1111/`, this package imports Forge's `modules.*` and `backend.*` only
inside functions; only `scripts/lora_train_tab.py` chooses it. One job per file: `engine.py` reads
Forge's model state, `host.py` is the Host, `refusals.py` says why a run cannot start, `session.py`
holds Forge for a run, `previews.py` pins Forge's model while the A1111 renderer runs its txt2img,
`selftest.py` loads a file with Forge's own LoRA loader. The adapter (`model/forge.py`) and what
makes Forge's weights trainable (`model/forge_train.py`) are in the core: they import nothing of Forge.

What a run does to Forge:
- It holds `call_queue.queue_lock` from start to end and reports a task, as on A1111.
- It loads the chosen checkpoint if Forge has not yet, puts back the weights Forge merged a LoRA into
  (`forge_objects_original` loaded again), and replaces each UNet and text-encoder Parameter, an
  inference tensor under Forge, by an equal clone autograd can use. Values are bit-identical and the
  clones stay (Forge runs them as it ran the originals).
- While training, Forge's transformer blocks get an out-of-place forward (instance attribute, removed
  after); our LoRA modules hook layers from outside, as on A1111.
- Previews and the model's own txt2img start from the LoRA-free patchers; afterwards the next prompt
  applies its LoRAs again (`current_lora_hash` reset). A published file is checked by Forge's own
  loader, after dropping it from Forge's LoRA file cache.
"""

from lora_train.host.forge.host import ForgeHost

__all__ = ["ForgeHost"]
