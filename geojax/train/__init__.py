"""Training utilities: the shared Optax optimizer (AdamW, schedules, decay masks, LR groups, EMA)."""

from __future__ import annotations

from geojax.train import optim
from geojax.train.optim import (
    FROZEN_LABEL,
    OPTIMIZERS,
    SCHEDULES,
    default_optim_config,
    ema_update,
    init_ema,
    is_no_decay,
    learning_rate_schedule,
    lr_multiplier_tree,
    make_optimizer,
    param_labels,
    param_path,
    param_paths,
    weight_decay_mask,
)

__all__ = [
    "optim",
    "FROZEN_LABEL",
    "OPTIMIZERS",
    "SCHEDULES",
    "default_optim_config",
    "ema_update",
    "init_ema",
    "is_no_decay",
    "learning_rate_schedule",
    "lr_multiplier_tree",
    "make_optimizer",
    "param_labels",
    "param_path",
    "param_paths",
    "weight_decay_mask",
]
