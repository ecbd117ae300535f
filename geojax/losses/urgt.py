"""URGT training objective, targets and training priors (reference ``urgt.md`` §4.2, §8).

No loss code was released; the paper gives only the structure (third-party notes)::

    L_depth  = MSE(D_ref, D_gt) + lambda_grad * L_grad(D_ref, D_gt)
    L_normal = L_angle(n_ref, n_pseudo) + lambda_mse * MSE(n_ref, n_pseudo)
    L        = lambda_depth * L_depth + lambda_normal * L_normal

with the defaults the reference proposes (all configurable): ``lambda_depth = lambda_normal =
lambda_mse = 1``, ``lambda_grad = 0.5`` and a 4-scale gradient-matching term on the residual
(MiDaS / VGGT style, :func:`gradient_matching`). The heads' ``1 + exp`` confidences are not
used (no retrieved text uses them).

Spaces (reference §8 defaults):

- **Depth** lives where the priors live: per-image min-max normalised disparity
  (:func:`disparity_target`, over the valid pixels; invalid pixels count as disparity 0, i.e.
  infinitely far, and are not supervised).
- **Normals** are supervised against *pseudo-normals* fitted to the GT depth by a 5 x 5
  least-squares plane (:func:`pseudo_normals`, OpenCV camera axes facing the camera), which
  ties both heads to one geometry, or against exact GT normals where a dataset has them
  (``normal_target="gt"`` in the task).

Training priors without a prior network (:func:`degraded_prior`): the GT disparity with the
errors a monocular prior has - coarse (area-averaged over ``factor x factor`` pixels and
upsampled bilinearly), systematically distorted (``prior = target ** gamma``, renormalised) and
perturbed by smooth multiplicative noise - and normals fitted to that degraded depth
(:func:`prior_normals`). Every function is pure ``jax.numpy``, ``jit``-able and float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geojax.geometry.normals import normals_from_depth

EPS = 1e-8


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  m = mask.astype(x.dtype)
  while m.ndim < x.ndim:
    m = m[..., None]
  m = jnp.broadcast_to(m, x.shape)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def disparity_target(depth: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array,
                                                                  jax.Array]:
  """GT z-depth ``(B, H, W)`` -> ``(target, lo, hi)``: disparity ``1 / depth`` min-max
  normalised per image over its valid pixels (``(1/d - lo) / (hi - lo + 1e-8)``; invalid
  pixels 0), and each image's ``lo``, ``hi`` ``(B,)`` (so ``1 / (t (hi - lo) + lo)`` is the
  depth again)."""
  valid = valid & jnp.isfinite(depth) & (depth > 0)
  disp = jnp.where(valid, 1.0 / jnp.where(valid, depth, 1.0), 0.0)
  lo = jnp.min(jnp.where(valid, disp, jnp.inf), axis=(-2, -1))
  hi = jnp.max(jnp.where(valid, disp, -jnp.inf), axis=(-2, -1))
  lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
  hi = jnp.where(jnp.isfinite(hi), hi, 1.0)
  t = (disp - lo[:, None, None]) / (hi - lo + EPS)[:, None, None]
  return jnp.where(valid, t, 0.0), lo, hi


def to_depth(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Normalised disparity ``(B, H, W)`` -> z-depth (0 where the disparity is not positive)."""
  disp = x * (hi - lo + EPS)[:, None, None] + lo[:, None, None]
  return jnp.where(disp > 0, 1.0 / jnp.where(disp > 0, disp, 1.0), 0.0)


def _area_down_up(x: jax.Array, w: jax.Array, factor: int) -> jax.Array:
  """Valid-weighted ``factor x factor`` averages of ``x`` ``(B, H, W)``, upsampled bilinearly
  (half-pixel) to ``H x W``; cells without a valid pixel take the image mean."""
  b, h, wd = x.shape
  hh, ww = -(-h // factor), -(-wd // factor)
  pad = ((0, 0), (0, hh * factor - h), (0, ww * factor - wd))
  xs = jnp.pad(x * w, pad).reshape(b, hh, factor, ww, factor).sum((2, 4))
  ws = jnp.pad(w, pad).reshape(b, hh, factor, ww, factor).sum((2, 4))
  mean = jnp.sum(x * w, (1, 2)) / jnp.maximum(jnp.sum(w, (1, 2)), 1.0)
  coarse = jnp.where(ws > 0, xs / jnp.maximum(ws, 1e-12), mean[:, None, None])
  return jax.image.resize(coarse, (b, h, wd), "linear")


def degraded_prior(target: jax.Array, valid: jax.Array, key: jax.Array, *, factor: int = 8,
                   gamma: float = 0.7, noise: float = 0.05) -> jax.Array:
  """A coarse normalised-disparity prior ``(B, H, W)`` from the target (module docstring):
  ``target ** gamma`` on the valid pixels, area-averaged over ``factor`` and upsampled, times
  ``exp(noise * N)`` with ``N`` smooth (drawn on a grid 4x coarser still, upsampled), then
  min-max normalised over the image as the official pipeline normalises its prior."""
  b, h, w = target.shape
  wv = valid.astype(jnp.float32)
  x = jnp.where(valid, jnp.clip(target, 0.0, 1.0) ** gamma, 0.0)
  x = _area_down_up(x, wv, max(int(factor), 1))
  if noise > 0:
    nh, nw = max(1, h // (4 * factor)), max(1, w // (4 * factor))
    n = jax.image.resize(jax.random.normal(key, (b, nh + 1, nw + 1)), (b, h, w), "linear")
    x = x * jnp.exp(noise * n)
  lo = jnp.min(x, axis=(1, 2), keepdims=True)
  hi = jnp.max(x, axis=(1, 2), keepdims=True)
  return (x - lo) / (hi - lo + EPS)


def pseudo_normals(depth: jax.Array, intrinsics: jax.Array, valid: jax.Array,
                   window: int = 5) -> tuple[jax.Array, jax.Array]:
  """Normals fitted to GT depth ``(B, H, W)`` with intrinsics ``(B, 3, 3)`` (least-squares
  planes in ``window x window`` patches, OpenCV camera axes, facing the camera) and where the
  fit is valid."""
  return normals_from_depth(depth, intrinsics, window=window, mask=valid)


def prior_normals(prior: jax.Array, lo: jax.Array, hi: jax.Array, intrinsics: jax.Array,
                  window: int = 5) -> jax.Array:
  """Unit normals ``(B, H, W, 3)`` fitted to the depth of a normalised-disparity prior (its
  disparity mapped back with the target's ``lo``, ``hi``); pixels without a fit face the camera
  head-on, ``(0, 0, -1)``."""
  n, ok = normals_from_depth(to_depth(prior, lo, hi), intrinsics, window=window)
  return jnp.where(ok[..., None], n, jnp.array([0.0, 0.0, -1.0], n.dtype))


def gradient_matching(residual: jax.Array, mask: jax.Array, scales: int = 4) -> jax.Array:
  """Multi-scale gradient matching of a residual ``(B, H, W)`` (MiDaS): at scales ``1, 2, 4,
  ...`` (every ``2^k``-th pixel), the mean absolute x and y forward differences of the residual
  over pairs of valid pixels, summed over directions and averaged over scales."""
  total = 0.0
  for k in range(scales):
    s = 2 ** k
    r, m = residual[:, ::s, ::s], mask[:, ::s, ::s]
    if r.shape[1] < 2 or r.shape[2] < 2:
      break
    mx = m[:, :, 1:] & m[:, :, :-1]
    my = m[:, 1:, :] & m[:, :-1, :]
    total = total + (_masked_mean(jnp.abs(r[:, :, 1:] - r[:, :, :-1]), mx)
                     + _masked_mean(jnp.abs(r[:, 1:, :] - r[:, :-1, :]), my))
  return total / scales


def angular_error(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Angle in radians between ``pred`` (normalised here) and unit ``target`` ``(..., 3)``;
  the cosine is clipped to ``[-1 + 1e-6, 1 - 1e-6]`` so the gradient stays finite (a floor of
  1.4e-3 rad, 0.08 degrees, for identical vectors)."""
  p = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), 1e-6)
  cos = jnp.clip(jnp.sum(p * target, -1), -1.0 + 1e-6, 1.0 - 1e-6)
  return jnp.arccos(cos)


def urgt_loss(depth: jax.Array, normal: jax.Array, target_depth: jax.Array,
              depth_valid: jax.Array, target_normal: jax.Array, normal_valid: jax.Array, *,
              depth_weight: float = 1.0, normal_weight: float = 1.0, grad_weight: float = 0.5,
              normal_mse_weight: float = 1.0, grad_scales: int = 4
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The URGT objective (module docstring) on refined ``depth`` ``(B, H, W)`` and ``normal``
  ``(B, H, W, 3)`` against targets in the same spaces. Returns ``(loss, parts)`` with
  ``depth_mse``, ``depth_grad``, ``normal_angle_deg`` and ``normal_mse``."""
  res = depth - target_depth
  mse = _masked_mean(res ** 2, depth_valid)
  grad = gradient_matching(jnp.where(depth_valid, res, 0.0), depth_valid, grad_scales)
  ang = _masked_mean(angular_error(normal, target_normal), normal_valid)
  nmse = _masked_mean(jnp.sum((normal - target_normal) ** 2, -1), normal_valid)
  loss = (depth_weight * (mse + grad_weight * grad)
          + normal_weight * (ang + normal_mse_weight * nmse))
  return loss, {"depth_mse": mse, "depth_grad": grad, "normal_angle_deg": jnp.degrees(ang),
                "normal_mse": nmse}
