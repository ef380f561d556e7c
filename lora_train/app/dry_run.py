"""`train --dry-run`: everything a run checks before it loads the model, without loading it.

The model family comes from the checkpoint's tensor names (model/header.py); the network is built
over a meta-device copy of the family's reference architecture (no memory, no weights), or over
the built-in tiny model, which is small enough to build. A problem is a UserError, as in a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lora_train.app.job import network_for_targets, plan_dataset, select_targets, steps_multiple
from lora_train.errors import UserError, msg
from lora_train.model import registry
from lora_train.network.kind import network_kind
from lora_train.train.config import TrainConfig


@dataclass
class DryRun:
    family: str
    resolution: int
    plan: object
    targets: int
    parameters: int | None  # None: the network could not be built on the meta device; `targets` still counts
    notes: list[str] = field(default_factory=list)


def dry_run(config: TrainConfig) -> DryRun:
    spec = config.model.pretrained_model_name_or_path
    if not spec:
        registry.load_model(spec)  # the error that says what to set
    kind = network_kind(config.network)
    if spec in registry.BUILTINS:
        family, resolution = registry.family_of(spec), registry.resolution_of(spec)
        adapter = registry.load_adapter(spec, config.model.clip_skip)  # random or tiny weights: cheap to build
        from lora_train.network.norm import ldm_unet_norm_targets, sdxl_unet_norm_targets

        targets = select_targets(config, kind, lambda conv: adapter.lora_targets(conv=conv),
                                 lambda: (sdxl_unet_norm_targets if family == "sdxl" else ldm_unet_norm_targets)(adapter.unet),
                                 adapter.can_train_text_encoder())
    elif spec.startswith("builtin:"):
        raise UserError(msg("unknown built-in model '{name}' (known: {known})", name=spec, known=", ".join(registry.BUILTINS)))
    else:
        from lora_train.model.arch import meta_unet
        from lora_train.model.header import ARCH, family_of_file
        from lora_train.model.reference import reference_targets
        from lora_train.network.norm import ldm_unet_norm_targets, sdxl_unet_norm_targets

        from lora_train.model import hub

        if hub.is_hub_id(spec):
            # fetched as the run would fetch it (into the Hugging Face cache; offline, the one-line error
            # that says where to put it): the family is read from what the run will load
            spec = str(hub.fetch(spec, "pretrained_model_name_or_path"))
        family = family_of_file(spec)
        arch, resolution = ARCH[family]
        targets = select_targets(config, kind, lambda conv: reference_targets(arch, conv=conv),
                                 lambda: (sdxl_unet_norm_targets if family == "sdxl" else ldm_unet_norm_targets)(meta_unet(arch)), True)
    plan = plan_dataset(config, resolution, steps_multiple(family))
    if plan.total_steps <= 0:
        raise UserError(msg("the dataset has no images to train on"))
    _check_optimizer(config, plan.total_steps)
    _check_prompts(config)
    result = DryRun(family, resolution, plan, len(targets), None)
    try:
        with torch.device("meta"):
            network = network_for_targets(config, kind, targets, seed=0)
        result.parameters = sum(p.numel() for p in network.parameters())
    except UserError:
        raise
    except Exception as e:  # an algorithm whose set-up needs real numbers (an SVD ...): the count of targets stands
        result.notes.append(msg("the network was not built on the meta device ({error}); {count} modules would train",
                                error=type(e).__name__, count=len(targets)))
    return result


def _check_optimizer(config: TrainConfig, total_steps: int) -> None:
    """The optimizer and scheduler a run would build, over one stand-in parameter: an unknown
    name, a missing package or a bad argument fails here as it would at the start of the run."""
    from lora_train.train.optimizers import build_optimizer
    from lora_train.train.schedulers import build_scheduler

    o = config.optimizer
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": o.unet_lr or o.learning_rate}]
    optimizer = build_optimizer(o.optimizer_type, groups, o.learning_rate, o.optimizer_args, notes=[])
    build_scheduler(o.lr_scheduler, optimizer, total_steps, warmup_steps=o.lr_warmup_steps, num_cycles=o.lr_scheduler_num_cycles,
                    power=o.lr_scheduler_power, min_lr_ratio=o.lr_scheduler_min_lr_ratio, notes=[])


def _check_prompts(config: TrainConfig) -> None:
    s = config.sampling
    if s.sample_prompts and (s.sample_every_n_epochs or s.sample_every_n_steps or s.sample_at_first):
        from lora_train.sample.prompts import load_prompts

        load_prompts(s.sample_prompts, default_sampler=s.sample_sampler)
