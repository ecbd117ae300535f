"""Training utilities: the shared Optax optimizer (AdamW, schedules, decay masks, LR groups,
EMA) and the train state / jitted train step (:mod:`geojax.train.step`)."""

from __future__ import annotations

from geojax.train import optim, step
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

from geojax.train.step import TrainState, check_health, init_state, make_train_step

__all__ = [
    "optim",
    "step",
    "TrainState",
    "check_health",
    "init_state",
    "make_train_step",
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
