"""Training tasks: how a model family turns a pipeline batch into a loss.

A task is the family-specific glue between :mod:`geojax.data.pipeline` batches, the model and
the family's objective. The trainer (:mod:`geojax.train.trainer`) needs only
``task.loss_fn(model, batch, rng) -> (loss, aux)``, which :func:`geojax.train.step.make_train_step`
differentiates, and ``task.family`` (the :mod:`geojax.models.registry` name used to build, save
and evaluate the model). Each family builds its task from the training config
(``Family.make_task``); its task class lives in the family's module (:mod:`geojax.families`)
and can also be imported from here by name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from geojax.models.registry import IMAGENET_MEAN, IMAGENET_STD

STEP_KEY = "train_step"  # added to every batch by the train step (int32 scalar)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 (or [0, 255] float) RGB -> ImageNet-normalised float32."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def make_task(config) -> Any:
  """The task of the family named by ``config.model.family``, built from the config."""
  from geojax.models import registry
  family = registry.get_family(config.model.family)
  if family.make_task is None:
    trainable = sorted(n for n, f in registry.families().items() if f.make_task is not None)
    raise ValueError(f"config.model.family {family.name!r} has no training task (families "
                     f"with one: {', '.join(trainable)})")
  return family.make_task(config)


def __getattr__(name: str) -> Any:
  """``from geojax.train.tasks import <Family>Task``: task classes of the registered families."""
  if name.startswith("__"):
    raise AttributeError(name)
  import importlib
  from geojax.models import registry
  for family in registry.families().values():
    module = importlib.import_module(family.build.__module__)
    if name.endswith("Task") and hasattr(module, name):
      return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
