"""Pixel-Perfect Depth training objective (``ppd/models/ppd_train.py``, ``ppd/models/loss.py``;
reference ``ppd.md`` section 3).

* **Target** (:func:`encode_gt`): ``l = log(d + 1)``; per sample the 2 % / 98 % quantiles of
  ``l`` over valid pixels closer than 80 m (linear interpolation, as ``torch.quantile``; the
  upper one at least ``1e-6`` above the lower); ``clip((l - q02) / (q98 - q02), -0.5, 1) - 0.5``
  in ``[-1, 0.5]``. Every pixel is encoded (invalid ``d = 0`` gives ``l = 0``); only the mask
  gates the loss.
* **Flow matching** (:func:`flow_matching_loss`): noise (drawn first) and logit-normal integer
  timesteps; ``x_t = (1 - t/T) x_0 + (t/T) noise``; the DiT's velocity inverted to predicted
  ``x_0`` and ``x_T``; ``mse = sum(mask ((x_T' - x_0') - (noise - x_0))^2) / (sum(mask) + 1e-6)``.
* **Fine-tuning** adds ``0.2 x`` :func:`multi_scale_grad_loss` of the predicted ``x_0`` against
  the target on the strided subsamplings ``[::s, ::s]``, ``s`` in 1, 2, 4, 8 (pretraining: MSE
  only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geojax.diffusion import flow
from geojax.geometry.alignment import masked_quantile

MAX_DEPTH = 80.0
QUANTILES = (0.02, 0.98)
GRAD_WEIGHT = 0.2
GRAD_SCALES = 4


def encode_gt(depth: jax.Array, mask: jax.Array, *, max_depth: float = MAX_DEPTH
              ) -> tuple[jax.Array, jax.Array]:
  """Metric depth ``(B, H, W)`` (0 where invalid) and its mask -> ``(latent (B, H, W) in
  [-1, 0.5], quantiles (B, 2))`` (module docstring). A sample without a valid pixel below
  ``max_depth`` gets quantiles (0, 1e-6) (it is then fully masked anyway when the mask is
  empty)."""
  depth = jnp.asarray(depth, jnp.float32)
  mask = jnp.asarray(mask, bool)
  l = jnp.log(depth + 1.0)
  clip = mask & (depth < max_depth)
  q = jax.vmap(lambda v, m: jnp.stack([jnp.where(jnp.any(m), masked_quantile(v, m, qq), 0.0)
                                       for qq in QUANTILES]))(l, clip)
  lo = q[:, 0]
  hi = jnp.where(q[:, 1] - lo < 1e-6, lo + 1e-6, q[:, 1])
  x = (l - lo[:, None, None]) / (hi - lo)[:, None, None]
  return jnp.clip(x, -0.5, 1.0) - 0.5, jnp.stack([lo, hi], -1)


def grad_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """The reference ``grad_loss``: masked |dx| and |dy| of the masked residual, summed, over the
  mask's sum (batch-wide)."""
  m = mask.astype(pred.dtype)
  diff = m * (pred - target)
  gx = jnp.abs(diff[:, :, 1:] - diff[:, :, :-1]) * m[:, :, 1:] * m[:, :, :-1]
  gy = jnp.abs(diff[:, 1:, :] - diff[:, :-1, :]) * m[:, 1:, :] * m[:, :-1, :]
  # (the reference divides by sum(m) alone: NaN for a batch without a valid pixel)
  return (jnp.sum(gx) + jnp.sum(gy)) / jnp.maximum(jnp.sum(m), 1e-6)


def multi_scale_grad_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
                          scales: int = GRAD_SCALES) -> tuple[jax.Array, jax.Array]:
  """Sum over strides ``2^k`` (k < ``scales``) of :func:`grad_loss` on ``[:, ::s, ::s]``;
  returns ``(total, per-scale (scales,))``."""
  parts = []
  for k in range(scales):
    s = 2 ** k
    parts.append(grad_loss(pred[:, ::s, ::s], target[:, ::s, ::s], mask[:, ::s, ::s]))
  per = jnp.stack(parts)
  return jnp.sum(per), per


def flow_matching_loss(model, image: jax.Array, semantics: jax.Array, depth: jax.Array,
                       mask: jax.Array, *, noise: jax.Array | None = None,
                       t: jax.Array | None = None, key: jax.Array | None = None,
                       pretrain: bool = False, grad_weight: float = GRAD_WEIGHT,
                       loc: float = 0.0, scale: float = 1.0,
                       window: bool = False) -> dict[str, jax.Array]:
  """The PPD training loss of one batch (module docstring).

  Args:
    model: a PPD DiT, ``model(x, semantics, t)`` -> velocity ``(B, H, W, 1)``.
    image: ``(B, H, W, 3)`` RGB in [0, 1]; semantics: the frozen encoder's tokens.
    depth: ``(B, H, W)`` metres, 0 where invalid; mask: ``(B, H, W)`` bool.
    noise, t: the ``(B, H, W)`` noise and ``(B,)`` integer timesteps; drawn from ``key`` (noise
      first, then logit-normal ``t`` with ``loc`` / ``scale``) when not given.
    pretrain: MSE only (stage 1); otherwise MSE + ``grad_weight`` x the gradient loss.
    window: the batch is the frames of one PPVD window (geojax's recipe; PPVD's training was
      not released): one timestep for all frames (a scalar ``t``, as the video DiT requires)
      and one depth normalisation (quantiles over the whole window), so that the frames share
      one depth scale.

  Returns ``mse``, ``grad`` (0 when pretraining), ``grad_per_scale``, ``total`` and the
  tensors of the step (``latent``, ``noised``, ``velocity``, ``latent_pred``, ``noise_pred``,
  ``quantiles``, ``t``, ``noise``).
  """
  b = depth.shape[0]
  if noise is None or t is None:
    if key is None:
      raise ValueError("flow_matching_loss: pass noise and t, or a key to draw them")
    k_noise, k_t = jax.random.split(key)
    if noise is None:
      noise = jax.random.normal(k_noise, depth.shape, jnp.float32)
    if t is None:
      t = flow.logit_normal_timesteps(k_t, () if window else (b,), loc, scale)
  mask = jnp.asarray(mask, bool)
  if window:
    n, h, w = depth.shape
    latent, quantiles = encode_gt(depth.reshape(1, n * h, w), mask.reshape(1, n * h, w))
    latent = latent.reshape(n, h, w)
  else:
    latent, quantiles = encode_gt(depth, mask)
  x_t = flow.noised(latent, noise, t)
  x = jnp.concatenate([x_t[..., None], jnp.asarray(image, jnp.float32) - 0.5], -1)
  v = model(x, semantics, t)[..., 0].astype(jnp.float32)
  x0_pred, xT_pred = flow.from_velocity(v, x_t, t)
  m = mask.astype(jnp.float32)
  mse = jnp.sum(m * ((xT_pred - x0_pred) - (noise - latent)) ** 2) / (jnp.sum(m) + 1e-6)
  if pretrain:
    grad, per = jnp.float32(0.0), jnp.zeros((GRAD_SCALES,), jnp.float32)
  else:
    grad, per = multi_scale_grad_loss(x0_pred, latent, m)
  total = mse + grad_weight * grad if not pretrain else mse
  return dict(mse=mse, grad=grad, grad_per_scale=per, total=total, latent=latent, noised=x_t,
              velocity=v, latent_pred=x0_pred, noise_pred=xT_pred, quantiles=quantiles, t=t,
              noise=noise)
