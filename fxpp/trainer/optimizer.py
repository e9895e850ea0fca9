"""The optimizer of ``fxpp run``: AdamW over trainable parameters, decay groups, LR schedule, LoRA.

The same construction serves the pipeline's ranks and the parity check's unpatched
model, so the two train the same way: ``make_optimizer`` takes ``(name, parameter)``
pairs and the module the names come from (for transformers' no-decay rule).
"""

from __future__ import annotations

import torch

from ..errors import RunConfigError
from ..runtime.optim import decay_parameter_names, lr_scheduler, param_groups


def make_optimizer(cfg, named_parameters, modules) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with ``cfg.weight_decay`` on all but biases and normalization weights, and its LR schedule.

    Args:
        cfg: the run's ``RunConfig``.
        named_parameters: ``(name, parameter)`` pairs, each parameter once; frozen ones get no slot.
        modules: the modules those names are relative to (a rank's stage modules, or the model).
    """
    decay_names: set[str] = set()
    for module in modules:
        decay_names |= decay_parameter_names(module)
    groups = param_groups(named_parameters, cfg.weight_decay, decay_names)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    sched = lr_scheduler(opt, cfg.lr_schedule, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                         min_lr_ratio=cfg.min_lr_ratio)
    return opt, sched


def with_lora(cfg, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` wrapped by PEFT's LoRA (``cfg.lora_rank`` > 0), its adapters initialised from ``cfg.seed``."""
    if not cfg.lora_rank:
        return model
    try:
        # Imported here: peft is an optional extra (pip install -e '.[peft]').
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise RunConfigError("--lora-rank needs the peft package: pip install -e '.[peft]'") from e
    torch.manual_seed(cfg.seed + 1)  # the same adapters on every rank and in the parity check
    return get_peft_model(model, lora_config(cfg, LoraConfig))


def lora_config(cfg, config_class=None):
    """The ``peft.LoraConfig`` of a run's settings."""
    if config_class is None:
        from peft import LoraConfig as config_class  # optional extra, see with_lora
    kwargs = {"r": cfg.lora_rank, "task_type": "CAUSAL_LM"}
    if cfg.lora_alpha is not None:
        kwargs["lora_alpha"] = cfg.lora_alpha
    if cfg.lora_targets:
        kwargs["target_modules"] = list(cfg.lora_targets)
    return config_class(**kwargs)
