"""AdamW with parameter groups by module and role, and the per-step learning rate."""

from __future__ import annotations

import torch

from lens.config import OptimConfig
from lens.models.lens_model import LensModel, param_role


def build_optimizer(model: LensModel, o: OptimConfig) -> torch.optim.AdamW:
    """One group per (module, role, decays) with lr multiplier lr_mult[module] * lr_mult[role]; weight decay on
    matrices only."""
    groups: dict[tuple, dict] = {}
    for name, p in model.trainable_parameters().items():
        module, role = name.split(".")[0], param_role(name)
        decays = p.ndim >= 2
        g = groups.setdefault((module, role, decays), {
            "params": [], "name": f"{module}/{role}", "lr_mult": o.lr_mult[module] * o.lr_mult[role],
            "weight_decay": o.weight_decay if decays else 0.0})
        g["params"].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=o.lr, betas=tuple(o.betas))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_mult"]
