"""Training tasks: how one model family turns a pipeline batch into a loss.

A task is the family-specific glue between :mod:`geojax.data.pipeline` batches, the model and
the family's objective. The trainer (:mod:`geojax.train.trainer`) needs only
``task.loss_fn(model, batch, rng) -> (loss, aux)``, which :func:`geojax.train.step.make_train_step`
differentiates, and ``task.family`` (the :mod:`geojax.models.registry` name used to build, save
and evaluate the model).

DA3 (:class:`DA3Task`):

- images: uint8 ``(B, S, H, W, 3)`` -> ImageNet-normalised float32 inside the jitted step;
- reference view: ``"first"`` (the loss's world frame is view 0);
- pose conditioning: each sample is conditioned on its ground-truth cameras with probability
  ``loss.pose_cond_prob`` (paper: 0.2), otherwise the learned camera token is used;
- teacher labels: when the batch holds ``teacher_depth`` (B, S, H, W), depth supervision
  switches from GT to the teacher depth aligned to the GT by RANSAC scale/shift
  (:func:`geojax.losses.da3.teacher_labels`) at ``loss.teacher_switch_step``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from geojax.losses import da3 as da3_loss
from geojax.models.registry import IMAGENET_MEAN, IMAGENET_STD

STEP_KEY = "train_step"  # added to every batch by the train step (int32 scalar)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 (or [0, 255] float) RGB -> ImageNet-normalised float32."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@dataclasses.dataclass(frozen=True)
class DA3Task:
  """DA3 any-view training: forward with random pose conditioning, then the DA3 objective."""

  loss: da3_loss.DA3LossConfig = da3_loss.DA3LossConfig()
  family: str = "da3"

  def loss_fn(self, model, batch: dict[str, Any], rng: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    images = normalize_images(batch["images"])
    b = images.shape[0]
    kwargs: dict[str, Any] = {}
    if self.loss.pose_cond_prob > 0 and getattr(model, "cam_enc", None) is not None:
      mask = da3_loss.pose_condition_mask(jax.random.fold_in(rng, 1), b,
                                          self.loss.pose_cond_prob)
      # Encoder intrinsics: the FoV depends only on the focal lengths and the image size.
      kwargs = dict(extrinsics=batch["extrinsics"], intrinsics=batch["intrinsics"],
                    pose_mask=mask)
    pred = model(images, ref_view_strategy="first", **kwargs)
    if "teacher_depth" in batch:
      gt = jnp.asarray(batch["depth"], jnp.float32)
      labels = lambda: da3_loss.teacher_labels(batch["teacher_depth"], gt, batch["valid"])[0]
      batch = dict(batch, depth=da3_loss.depth_target(batch.get(STEP_KEY, 0), gt, labels,
                                                      self.loss))
    total, terms = da3_loss.da3_loss(pred, batch, self.loss)
    aux = {k: v for k, v in terms.items() if k != "scene_scale"}
    if kwargs:
      aux["pose_conditioned"] = jnp.mean(kwargs["pose_mask"].astype(jnp.float32))
    return total, aux


def make_task(config) -> DA3Task:
  """The task named by ``config.model.family`` with the objective from ``config.loss``."""
  family = config.model.family
  if family == "da3":
    fields = {f.name for f in dataclasses.fields(da3_loss.DA3LossConfig)}
    given = dict(config.loss) if "loss" in config else {}
    unknown = sorted(set(given) - fields)
    if unknown:
      raise ValueError(f"config.loss has unknown fields {unknown}; DA3 loss fields: "
                       f"{sorted(fields)}")
    if "total_steps" not in given:
      given["total_steps"] = int(config.total_steps)
    return DA3Task(loss=da3_loss.DA3LossConfig(**given))
  raise ValueError(f"config.model.family {family!r} has no training task yet (available: da3)")
