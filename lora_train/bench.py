"""How much a LoRA costs on top of the UNet itself: one training step against a bare forward+backward.

`run_bench` times, on CPU in fp32, the step the trainer runs (UNet forward through the LoRA-hooked
UNet, MSE against the noise, backward, the trainer's AdamW on the LoRA parameters, zero_grad) and the "floor": a
forward+backward through the same frozen UNet with no LoRA. Latents and text conditioning are
random tensors of the right shapes, so neither the VAE nor (unless `text=True`) the text encoder is
part of the step. Everything is built from the real `ldm` classes with random weights; nothing is
downloaded.

The floor. A frozen UNet alone has nothing that needs a gradient, so autograd would skip the
backward entirely. We make the floor do the backward the LoRA step itself has to do: a forward hook
on every module the LoRA targets marks that module's output as requiring grad (no parameters, no
optimizer). The autograd graph is then the LoRA step's graph minus the LoRA branches: the activation
gradients run back from the loss to the first targeted module (the first `proj_in`, not the input
conv), and the attention backward computes the gradients of k and v that the LoRAs on `to_k` /
`to_v` need. `ratio = lora_ms / floor_ms` is therefore the cost of the LoRA path and the optimizer
alone. (Making the input latents require grad instead would also run the backward through the
input conv and the first ResBlock at full resolution, which a LoRA step never does, and skip the
k/v gradients, which it always does; on SD1.5 at 256 px the two floors differ by under 1%.)

Timing alternates one floor step and one LoRA step per round (the hooks go on and off between
them, outside the timed region), so a busy machine slows both alike; the first `warmup` rounds are
not counted and each time is the median of `steps` rounds.

Memory. `peak_rss_mb` is the process's peak resident set (`ru_maxrss`, which includes building the
model). On Linux the kernel's peak counter is reset after the build (`/proc/self/clear_refs`), so
`bench_peak_rss_mb` is the peak during the timed rounds alone; `model_rss_mb` is the resident set
just before them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_train.errors import msg
from lora_train.model.attention import sdpa_attention
from lora_train.model.loading import V1_INFERENCE_CONFIG, import_ldm, quiet
from lora_train.network.naming import PREFIX_TE
from lora_train.network.kind import LYCORIS, NetworkKind
from lora_train.network.network import LoRANetwork
from lora_train.network.targets import hf_clip_targets, ldm_unet_targets, sdxl_unet_targets
from lora_train.train import loss as loss_fn
from lora_train.train import memory
from lora_train.train.optimizers import build_optimizer

ARCHS = ("sd15", "tiny", "sdxl", "tiny-sdxl")
SDXL_RAM_GB = 16  # full-size SDXL UNet in fp32: 10.3 GB of weights, plus the step's activations
TOKENS = 77
LEARNING_RATE = 1e-4


@dataclass
class BenchModel:
    """What the bench runs: a UNet, its context width and, for `text=True`, a HF CLIP text model."""

    arch: str
    unet: nn.Module
    context_dim: int
    text_model: nn.Module | None = None
    build_s: float = 0.0
    keep: list = field(default_factory=list)  # owners to keep alive (the tiny LatentDiffusion)
    y_dim: int = 0  # SDXL's vector conditioning (pooled text + sizes)
    context_list: bool = False  # ldm's SpatialTransformer at depth > 1 takes one context per block
    classes: str = "ldm"  # whose UNet class: "ldm" or "sgm"
    note: str = ""

    @property
    def is_sdxl(self) -> bool:
        return self.y_dim > 0


def build_model(arch: str, text: bool = False) -> BenchModel:
    """A fresh model for `arch` with random weights, on CPU in fp32, in eval mode."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    if text and arch in ("sdxl", "tiny-sdxl"):
        raise ValueError("text=True is not supported for SDXL (its presets train the UNet only)")
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # never consume the caller's global RNG
        torch.manual_seed(0)
        if arch in ("sdxl", "tiny-sdxl"):
            bench = _build_sdxl(arch)
        elif arch == "tiny":
            from lora_train.model.tiny import build_tiny

            with quiet():
                ldm_model = build_tiny()
            unet = ldm_model.model.diffusion_model
            text_model = ldm_model.cond_stage_model.transformer if text else None
            context_dim = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
            bench = BenchModel(arch, unet, context_dim, text_model, keep=[ldm_model])
        else:
            import_ldm()
            from ldm.modules.diffusionmodules.openaimodel import UNetModel

            params = copy.deepcopy(V1_INFERENCE_CONFIG["params"]["unet_config"]["params"])
            params["use_checkpoint"] = False
            with quiet():
                unet = UNetModel(**params).eval()
            _unzero(unet)
            text_model = None
            if text:
                from transformers import CLIPTextConfig, CLIPTextModel

                from lora_train.model import clip_files

                text_model = CLIPTextModel(CLIPTextConfig(**clip_files.CLIP_L_TEXT_CONFIG)).eval()
            bench = BenchModel(arch, unet, params["context_dim"], text_model)
    bench.build_s = time.perf_counter() - started
    return bench


def _build_sdxl(arch: str) -> BenchModel:
    """SDXL's UNet with random weights: sgm's own class when sgm is importable, else the same
    shapes from ldm's classes. Full size needs about SDXL_RAM_GB of free memory; with less, every
    width is halved (a quarter of the parameters, same blocks) and the result says so."""
    from lora_train.model.sgm_import import sgm_available

    use_sgm = sgm_available()
    if arch == "tiny-sdxl":
        from lora_train.model import tiny_sdxl

        with quiet():
            engine = tiny_sdxl.build_tiny_sdxl(sgm=use_sgm)
        for module in engine.modules():  # its stock use_checkpoint flags: the trainer switches them off
            for flag in ("checkpoint", "use_checkpoint"):
                if module.__dict__.get(flag) is True:
                    setattr(module, flag, False)
        return BenchModel(arch, engine.model.diffusion_model, tiny_sdxl.CONTEXT_DIM, keep=[engine], y_dim=tiny_sdxl.ADM_IN,
                          classes="sgm" if use_sgm else "ldm")
    from lora_train.model.arch import SDXL_UNET_PARAMS, _sdxl_unet_from_ldm

    note = ""
    widths = {}
    free = _available_gb()
    if free is not None and free < SDXL_RAM_GB:
        widths = {"model_channels": SDXL_UNET_PARAMS["model_channels"] // 2, "context_dim": SDXL_UNET_PARAMS["context_dim"] // 2,
                  "num_head_channels": SDXL_UNET_PARAMS["num_head_channels"] // 2}
        note = msg("scaled down (every width halved): {free} GB free, full size needs about {need} GB", free=f"{free:.1f}", need=SDXL_RAM_GB)
    params = {**SDXL_UNET_PARAMS, "use_checkpoint": False, **widths}
    if use_sgm:
        from sgm.modules.diffusionmodules.openaimodel import UNetModel

        with quiet():
            unet = UNetModel(**params, spatial_transformer_attn_type="softmax")
    else:
        import_ldm()
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        unet = _sdxl_unet_from_ldm(UNetModel, device="cpu", **{k: v for k, v in params.items() if k not in ("adm_in_channels", "num_classes", "transformer_depth")})
    _unzero(unet)
    return BenchModel(arch, unet.eval(), params["context_dim"], y_dim=params["adm_in_channels"], context_list=not use_sgm,
                      classes="sgm" if use_sgm else "ldm", note=note)


# The networks `--network` times, on the same targets (the UNet's transformers, and the text encoder's)
NETWORKS: dict[str, NetworkKind | None] = {
    "lora": None,
    "loha": NetworkKind(LYCORIS, "loha"),
    "lokr": NetworkKind(LYCORIS, "lokr"),
    "dora": NetworkKind(LYCORIS, "lora", dora=True),
}


def _available_gb() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().available / 2**30
    except Exception:
        return None


@torch.no_grad()
def _unzero(unet: nn.Module) -> None:
    """ldm zero-initialises the last layer of every block and of the UNet (`zero_module`): with random
    weights the output would be exactly zero and every gradient too. Give them default weights."""
    for module in unet.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.any():
            module.reset_parameters()


def run_bench(
    arch: str,
    resolution: int,
    dim: int,
    batch: int = 1,
    steps: int = 5,
    warmup: int = 2,
    text: bool = False,
    *,
    model: BenchModel | None = None,
    seed: int = 0,
    network: str = "lora",
    attention: str = "sdpa",
    keep_freed: bool = True,
) -> dict:
    """Time a LoRA training step and its no-LoRA floor; see the module docstring for what is measured.

    `attention`: "sdpa" runs both through PyTorch's SDPA as a training run does outside the WebUI
    (model/attention.py), "model" through the classes' own einsum attention.
    `keep_freed=False` times both without the allocator setting a CPU run has (`memory.keep_freed_memory`).
    `text=True` also runs the text encoder in every step, on random token ids, with a LoRA of its
    own trained at the same learning rate (the floor then runs it frozen, with its LoRA targets'
    outputs requiring grad, like the UNet's). `model` reuses a `build_model` result; the bench
    leaves it as it found it (weights, requires_grad flags, modes, no hooks).
    """
    if resolution % 8 or resolution < 8:
        raise ValueError(f"resolution must be a positive multiple of 8, not {resolution}")
    if dim < 1 or batch < 1 or steps < 1 or warmup < 0:
        raise ValueError("dim, batch and steps must be at least 1, warmup at least 0")
    started = time.perf_counter()
    built_here = model is None
    if model is None:
        model = build_model(arch, text)
    elif model.arch != arch:
        raise ValueError(f"model was built for {model.arch!r}, not {arch!r}")
    if text and model.text_model is None:
        raise ValueError("text=True needs a model built with text=True")
    unet = model.unet
    text_model = model.text_model if text else None
    roots = [unet] + ([text_model] if text_model is not None else [])

    gen = torch.Generator().manual_seed(seed)
    side = resolution // 8
    latents = torch.randn((batch, 4, side, side), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, 1000, (batch,), generator=gen)
    if text_model is not None:
        vocab = text_model.config.vocab_size
        tokens = torch.randint(0, vocab, (batch, TOKENS), generator=gen)
        context = None
    else:
        tokens = None
        context = torch.randn((batch, TOKENS, model.context_dim), generator=gen)
    y = torch.randn((batch, model.y_dim), generator=gen) if model.is_sdxl else None

    targets = sdxl_unet_targets(unet) if model.is_sdxl else ldm_unet_targets(unet)
    if text_model is not None:
        targets = hf_clip_targets(text_model, PREFIX_TE) + targets
    if attention not in ("sdpa", "model"):
        raise ValueError(f"attention must be sdpa or model, not {attention!r}")
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}, not {network!r}")
    kind = NETWORKS[network]
    name = network
    network = LoRANetwork(targets, dim=dim, alpha=dim, seed=seed, kind=kind)
    with torch.no_grad():  # every algorithm starts one factor at zero; a trained network is not, and the path is the same
        for p in network.parameters():
            if not p.any():
                p.uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim), generator=gen).mul_(0.1)
    network.train()
    groups = network.param_groups(LEARNING_RATE, LEARNING_RATE if text_model is not None else None)
    optimizer = build_optimizer("AdamW", groups, LEARNING_RATE)  # the trainer's own choice of update (fused on the CPU)
    lora_params = sum(p.numel() for g in groups for p in g["params"])

    def conditioning():
        if text_model is None:
            return context
        return text_model(input_ids=tokens).last_hidden_state

    def call_unet() -> torch.Tensor:
        c = conditioning()
        if model.context_list:
            from lora_train.model.arch import ldm_sdxl_context

            c = ldm_sdxl_context(c)
        return unet(latents, timesteps, context=c, y=y) if y is not None else unet(latents, timesteps, context=c)

    def lora_step() -> tuple[float, float]:
        t0 = time.perf_counter()
        pred = call_unet()
        loss = loss_fn.per_sample_mse(pred, noise).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss.detach())

    def floor_step() -> tuple[float, float]:
        t0 = time.perf_counter()
        pred = call_unet()
        loss = loss_fn.per_sample_mse(pred, noise).mean()
        loss.backward()
        return time.perf_counter() - t0, float(loss.detach())

    def needs_grad(module, args, output):
        return output if output.requires_grad else output.requires_grad_()

    saved = [(p, p.requires_grad) for root in roots for p in root.parameters()]
    floor_handles: list = []
    lora_times: list[float] = []
    floor_times: list[float] = []
    lora_losses: list[float] = []
    floor_loss = math.nan
    hooked = 0
    threads = torch.get_num_threads()
    model_rss = memory.rss_mb()
    build_peak = memory.ru_maxrss_mb()
    peak_reset = memory.reset_peak_rss()
    swap = sdpa_attention(roots, text_encoder=text_model is not None) if attention == "sdpa" else contextlib.nullcontext([])
    keep = memory.keep_freed_memory(keep_freed)  # as a CPU run has it (train/memory.py)
    restore = contextlib.ExitStack()
    try:
        for root in roots:
            root.requires_grad_(False)
        swapped = restore.enter_context(swap)
        restore.enter_context(keep)
        for i in range(warmup + steps):
            floor_handles = [t.module.register_forward_hook(needs_grad) for t in targets]
            try:
                elapsed, floor_loss = floor_step()
            finally:
                for h in floor_handles:
                    h.remove()
                floor_handles = []
            if i >= warmup:
                floor_times.append(elapsed)
            with network.applied():
                hooked = sum(len(m._forward_hooks) for root in roots for m in root.modules())
                elapsed, loss = lora_step()
            lora_losses.append(loss)
            if i >= warmup:
                lora_times.append(elapsed)
    finally:
        restore.close()  # the attention layers' own forwards again
        for h in floor_handles:
            h.remove()
        network.remove()
        optimizer.zero_grad(set_to_none=True)
        for p, flag in saved:
            p.requires_grad_(flag)
    bench_peak = memory.vm_hwm_mb() if peak_reset else None
    load = _load_average()
    lora_ms = statistics.median(lora_times) * 1000
    floor_ms = statistics.median(floor_times) * 1000
    return {
        "arch": arch,
        "classes": model.classes,
        "note": model.note,
        "resolution": resolution,
        "latent": [batch, 4, side, side],
        "context": [batch, TOKENS, model.context_dim],
        "dim": dim,
        "alpha": dim,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "text": bool(text_model is not None),
        "threads": threads,
        "cpus": os.cpu_count(),
        "load_average": load,  # 1-minute load at the end; above cpus + 1, other processes competed
        "torch": torch.__version__,
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "text_params": sum(p.numel() for p in text_model.parameters()) if text_model is not None else 0,
        "network": name,
        "attention": attention,
        "keep_freed": keep_freed,
        "sdpa_modules": len(swapped),  # attention layers that ran through SDPA for the bench
        "lora_modules": len(network.lora_modules),
        "lora_params": lora_params,
        "hooked_modules": hooked,  # forward hooks on the model while the LoRA step ran
        "floor_loss": floor_loss,  # the frozen UNet's loss (the same every round)
        "lora_losses": lora_losses,  # one per round, warmup included: AdamW moves them
        "lora_ms": lora_ms,
        "floor_ms": floor_ms,
        "ratio": lora_ms / floor_ms,
        "ratio_min": min(lora_times) / min(floor_times),
        "lora_times_ms": [t * 1000 for t in lora_times],
        "floor_times_ms": [t * 1000 for t in floor_times],
        "model_rss_mb": model_rss,
        "bench_peak_rss_mb": bench_peak,
        "peak_rss_mb": max(x for x in (build_peak, memory.ru_maxrss_mb(), bench_peak) if x is not None),
        "build_s": model.build_s if built_here else 0.0,
        "total_s": time.perf_counter() - started,
    }


def format_bench(result: dict) -> str:
    r = result
    text = " + text encoder" if r["text"] else ""
    lines = [
        f"bench {r['arch']}{text}  {r.get('network', 'lora')}  {r['resolution']}px  batch {r['batch']}  dim {r['dim']} (alpha {r['alpha']})  "
        f"CPU fp32, torch {r['torch']}, {r['threads']} threads, {r['classes']} UNet class, "
        f"attention {r.get('attention', 'model')}" + (f" ({r['sdpa_modules']} layers)" if r.get("attention") == "sdpa" else "")
        + ("" if r.get("keep_freed", True) else ", glibc trimming"),
        f"  model      {r['unet_params'] / 1e6:.1f}M UNet params"
        + (f" + {r['text_params'] / 1e6:.1f}M text" if r["text"] else "")
        + f", {r['lora_modules']} LoRA modules, {r['lora_params'] / 1e6:.2f}M LoRA params; "
        f"latents {'x'.join(map(str, r['latent']))}, context {'x'.join(map(str, r['context']))}",
        f"  LoRA step  {r['lora_ms']:9.1f} ms  (median of {r['steps']}, after {r['warmup']} warmup; "
        f"min {min(r['lora_times_ms']):.1f}, max {max(r['lora_times_ms']):.1f})",
        f"  floor      {r['floor_ms']:9.1f} ms  (forward+backward, no LoRA; "
        f"min {min(r['floor_times_ms']):.1f}, max {max(r['floor_times_ms']):.1f})",
        f"  ratio      {r['ratio']:9.3f}  (LoRA / floor; {r['ratio_min']:.3f} from the fastest of each)",
        f"  memory     peak RSS {r['peak_rss_mb']:.0f} MB"
        + (f"; during the timed steps {r['bench_peak_rss_mb']:.0f} MB" if r["bench_peak_rss_mb"] is not None else "")
        + (f"; model resident {r['model_rss_mb']:.0f} MB" if r["model_rss_mb"] is not None else ""),
        f"  took       {r['total_s']:.1f} s" + (f" (model build {r['build_s']:.1f} s)" if r["build_s"] else ""),
    ]
    if r["note"]:
        lines.append("  " + msg("note       {note}", note=r["note"]))
    if r["load_average"] is not None and r["cpus"] and r["load_average"] > r["cpus"] + 1:
        lines.append("  " + msg(
            "warning    load average {load} on {cpus} CPUs: other processes competed for the CPU, so these times are unreliable "
            "(compare the fastest-of-each ratio)", load=f"{r['load_average']:.1f}", cpus=r["cpus"]
        ))
    return "\n".join(lines)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None

