"""DA3 any-view training objective (Depth Anything 3, arXiv 2511.10647, §3 / reference §7).

Student loss (reference ``da3.md`` §7.3, paper)::

  L = w_D L_D(D̂, D) + w_M L_M(R̂, M) + w_P L_P(D̂ ⊙ d̂ + t̂, P) + β L_C(ĉ, v) + α L_grad(D̂, D)

with ``w_D = w_M = w_P = α = β = 1``. All terms are ℓ1-based and every mean runs over *valid*
entries only (masked sums divided by the mask count, clamped to >= 1), so changing values at
invalid pixels never changes the loss.

Conventions (see :mod:`geojax.geometry.camera` / :mod:`geojax.geometry.unproject`):

- Batches are the dicts of :mod:`geojax.data.pipeline`: ``depth`` (B, S, H, W) z-depth,
  ``valid`` (B, S, H, W) bool, ``intrinsics`` (B, S, 3, 3) pixels with pixel centres at
  ``integer + DA3LossConfig.pixel_offset`` (the pipeline's convention is 0), ``extrinsics``
  (B, S, 4, 4) world-to-camera. ``images`` and other keys are ignored.
- Predictions are DA3's ``__call__`` outputs: ``depth``, ``depth_conf`` (B, S, H, W); ``ray``
  (B, S, h', w', 6) with ``h' = 8 H / 14`` (direction first, camera centre last), ``ray_conf``
  (B, S, h', w'); ``extrinsics`` (B, S, 3|4, 4) w2c, ``intrinsics`` (B, S, 3, 3). An optional
  ``pose_enc`` (B, S, 9) (the camera decoder's raw c2w encoding) is used directly when present.
- World frame = **camera of view 0** (``ref_view_strategy="first"`` during training, reference
  §10 default), and one metric scale per scene (:func:`normalize_scene`).

Every function is pure ``jax.numpy`` and ``jit``-able (:func:`teacher_labels` needs its ``seed``
static).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from geojax.geometry import alignment, camera, unproject

_HP = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class DA3LossConfig:
  """Weights and schedule of the DA3 student objective.

  Attributes:
    depth_weight: ``w_D`` of the confidence-weighted depth term (paper: 1).
    ray_weight: ``w_M`` of the ray-map term (paper: 1).
    point_weight: ``w_P`` of the composed-point term (paper: 1).
    camera_weight: ``β`` of the 9-D camera-encoding term (paper: β = 1).
    grad_weight: ``α`` of the depth-gradient term (paper: α = 1).
    conf_lambda: ``λ_c`` of the ``- λ_c log c`` confidence regulariser. **Not given by the
      paper**; default 0.2 = VGGT's α for the identical ``c · err - α log c`` form (reference
      §10). The same λ_c is used for the ray confidence.
    pose_cond_prob: probability that a sample is pose-conditioned (paper: p = 0.2, §7.2).
    total_steps: training length (paper: 200k).
    teacher_switch_fraction: fraction of ``total_steps`` after which depth supervision switches
      from GT to aligned teacher labels (paper: 120k / 200k = 0.6).
    pixel_offset: pixel-centre offset of the *batch* intrinsics (0 for geojax.data; DA3's own
      convention is 0.5). GT rays are always built in DA3's ``+0.5`` convention.
    eps: floor for the scene scale.
  """

  depth_weight: float = 1.0
  ray_weight: float = 1.0
  point_weight: float = 1.0
  camera_weight: float = 1.0
  grad_weight: float = 1.0
  conf_lambda: float = 0.2
  pose_cond_prob: float = 0.2
  total_steps: int = 200_000
  teacher_switch_fraction: float = 0.6
  pixel_offset: float = 0.0
  eps: float = 1e-6

  @property
  def teacher_switch_step(self) -> int:
    """``round(teacher_switch_fraction * total_steps)`` (120_000 for the paper's 200k)."""
    return int(round(self.teacher_switch_fraction * self.total_steps))


# ------------------------------------------------------------------------------------------------
# helpers


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum(m x) / max(sum m, 1)``; entries outside ``mask`` are zeroed with ``where`` (NaN-safe)."""
  m = jnp.broadcast_to(mask, x.shape)
  num = jnp.sum(jnp.where(m, x, 0.0))
  return num / jnp.maximum(jnp.sum(m.astype(x.dtype)), 1.0)


def _conf_l1(err: jax.Array, conf: jax.Array, mask: jax.Array, lam: float) -> jax.Array:
  """``(1/Z) Σ_p m_p (c_p err_p - λ log c_p)``, ``Z = Σ m`` (DA3 L_D, reference §7.3).

  Invalid pixels are replaced by ``c = 1, err = 0`` before the product so neither NaN values nor
  non-positive confidences there reach the loss or its gradient.
  """
  c = jnp.where(mask, conf, 1.0)
  e = jnp.where(mask, err, 0.0)
  return _masked_mean(c * e - lam * jnp.log(c), mask)


def default_ray_hw(image_hw: tuple[int, int], patch_size: int = 14) -> tuple[int, int]:
  """DA3 ray-map size ``(8 H / p, 8 W / p)`` for an ``H x W`` image (reference §3.3)."""
  h, w = image_hw
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {image_hw} is not a multiple of patch_size={patch_size}")
  return 8 * h // patch_size, 8 * w // patch_size


def _resize_affine_exact(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize of ``(..., h, w, C)`` to ``(..., H, W, C)``, pixel-area aligned.

  Output pixel ``i`` (centre ``i + 0.5`` of ``H``) reads the input at fractional index
  ``(i + 0.5) h / H - 0.5`` from its two nearest samples, **extrapolating linearly** past the
  first / last sample instead of clamping. Hence a map that is affine in pixel coordinates (the
  ray directions ``R K^-1 p``, constant origins) is reproduced exactly at every pixel, borders
  included, unlike ``jax.image.resize``. Needs ``h, w >= 2``.
  """
  def along(a: jax.Array, axis: int, n_out: int) -> jax.Array:
    n_in = a.shape[axis]
    if n_in == n_out:
      return a
    pos = (jnp.arange(n_out, dtype=a.dtype) + 0.5) * (n_in / n_out) - 0.5
    i0 = jnp.clip(jnp.floor(pos), 0, n_in - 2).astype(jnp.int32)
    frac = pos - i0.astype(a.dtype)
    a0 = jnp.take(a, i0, axis=axis)
    a1 = jnp.take(a, i0 + 1, axis=axis)
    shape = [1] * a.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    return a0 + frac * (a1 - a0)

  h_out, w_out = out_hw
  if min(x.shape[-3], x.shape[-2]) < 2:
    raise ValueError(f"ray map must be at least 2x2 to resize; got {x.shape[-3:-1]}")
  return along(along(x, x.ndim - 3, h_out), x.ndim - 2, w_out)


def _to_da3_intrinsics(k: jax.Array, pixel_offset: float, src_hw: tuple[int, int],
                       dst_hw: tuple[int, int]) -> jax.Array:
  """Batch ``K`` (centres at ``+pixel_offset``, ``src_hw`` pixels) -> DA3's ``+0.5`` convention
  on a ``dst_hw`` map: principal point ``c + (0.5 - pixel_offset)``, then
  :func:`camera.scale_intrinsics` with ``offset=0.5`` (``f' = s f``, ``c' = s c``)."""
  k = jnp.asarray(k, jnp.result_type(k, jnp.float32))
  shift = 0.5 - pixel_offset
  k = k.at[..., 0, 2].add(shift).at[..., 1, 2].add(shift)
  sx = dst_hw[1] / src_hw[1]
  sy = dst_hw[0] / src_hw[0]
  return camera.scale_intrinsics(k, sx, sy, offset=0.5)


# ------------------------------------------------------------------------------------------------
# ground-truth normalisation


def normalize_scene(batch: dict[str, Any], *, ray_hw: tuple[int, int] | None = None,
                    pixel_offset: float = 0.0, eps: float = 1e-6) -> tuple[dict, jax.Array]:
  """Express a scene in view 0's camera frame and divide it by one scale (DA3 §7.3 / ref §7.3).

  1. World frame = camera of view 0 (reference §10 default, ``ref_view_strategy="first"``):
     ``w2c'_i = w2c_i inv(w2c_0)`` (so ``w2c'_0 = I``).
  2. GT world points ``P = R'^T (D K^-1 p - t')`` (:func:`unproject.depth_to_world_points`).
  3. ``s = (1 / Σ m) Σ_p m_p ||P_p||_2`` over the valid pixels of all views of the scene
     (paper: "mean ℓ2 norm of the valid world point map"); ``s`` is floored at ``eps`` (and 1
     for scenes without valid pixels).
  4. ``depth / s``, translations ``t' / s``, points ``P / s``; ray origins (camera centres) scale
     with the translations, directions ``R'^T K^-1 p`` are scale-free.

  Args:
    batch: dict with ``depth`` (B, S, H, W), ``valid`` (B, S, H, W), ``intrinsics`` (B, S, 3, 3),
      ``extrinsics`` (B, S, 3|4, 4) w2c; other keys are passed through (a stale ``ray_map`` in
      the old frame is dropped).
    ray_hw: size of the GT ray map (default :func:`default_ray_hw`, DA3's ``8H/14 x 8W/14``).
    pixel_offset: pixel-centre offset of ``batch["intrinsics"]``.
    eps: scale floor.

  Returns:
    ``(out, scale)``: ``out`` has ``depth`` (zeroed outside ``valid``), ``valid``,
    ``intrinsics``, ``extrinsics`` (B, S, 4, 4) normalised w2c, ``points`` (B, S, H, W, 3),
    ``ray_target`` (B, S, h', w', 6) (direction first, origin last, pixel centres at +0.5 with
    ``K`` rescaled to ``h' x w'``), ``pose_enc`` (B, S, 9) GT c2w encoding
    ``[t, q_xyzw, fov_h, fov_w]`` of the ``H x W`` image, ``scene_scale`` (B,); and ``scale``
    (B,).
  """
  depth = jnp.asarray(batch["depth"], jnp.float32)
  valid = jnp.asarray(batch["valid"], bool)
  k = jnp.asarray(batch["intrinsics"], jnp.float32)
  w2c = camera.to_homogeneous(jnp.asarray(batch["extrinsics"], jnp.float32))
  h, w = depth.shape[-2:]
  if ray_hw is None:
    ray_hw = default_ray_hw((h, w))
  depth = jnp.where(valid, depth, 0.0)
  rel = camera.relative_pose(w2c[:, :1], w2c)  # w2c_i @ inv(w2c_0), (B, S, 4, 4)
  pts = unproject.depth_to_world_points(depth, k, rel, offset=pixel_offset)
  norms = jnp.linalg.norm(jnp.where(valid[..., None], pts, 0.0), axis=-1)
  cnt = jnp.sum(valid, axis=(1, 2, 3)).astype(jnp.float32)
  mean_norm = jnp.sum(jnp.where(valid, norms, 0.0), axis=(1, 2, 3)) / jnp.maximum(cnt, 1.0)
  scale = jnp.where(cnt > 0, jnp.maximum(mean_norm, eps), 1.0)
  inv = (1.0 / scale)[:, None]
  depth_n = depth * inv[..., None, None]
  rel_n = rel.at[..., :3, 3].multiply(inv[..., None])
  pts_n = pts * inv[..., None, None, None]
  k_ray = _to_da3_intrinsics(k, pixel_offset, (h, w), ray_hw)
  ray = unproject.cameras_to_ray_map(k_ray, rel_n, ray_hw[0], ray_hw[1], offset=0.5)
  enc = camera.encode_pose(camera.rigid_inverse(rel_n), k, (h, w))
  out = {kk: v for kk, v in batch.items() if kk != "ray_map"}
  out.update(depth=depth_n, valid=valid, intrinsics=k, extrinsics=rel_n, points=pts_n,
             ray_target=ray, pose_enc=enc, scene_scale=scale)
  return out, scale


# ------------------------------------------------------------------------------------------------
# loss terms


def depth_loss(pred_depth: jax.Array, conf: jax.Array, gt_depth: jax.Array, mask: jax.Array,
               conf_lambda: float = 0.2) -> jax.Array:
  """``L_D = (1/Z_Ω) Σ_p m_p (c_p |D̂_p - D_p| - λ_c log c_p)`` (DA3 paper, reference §7.3).

  Args: ``pred_depth``, ``conf`` (> 0), ``gt_depth``, ``mask`` all ``(B, S, H, W)``.
  Returns a scalar; ``Z = Σ m`` (clamped to >= 1).
  """
  err = jnp.abs(pred_depth - gt_depth)
  return _conf_l1(err, conf, jnp.asarray(mask, bool), conf_lambda)


def ray_loss(pred_ray: jax.Array, conf: jax.Array, gt_ray: jax.Array, mask: jax.Array | None = None,
             conf_lambda: float = 0.2) -> jax.Array:
  """``L_M = (1/Z) Σ_p m_p (c_p ||R̂_p - M_p||_1 - λ_c log c_p)`` at the ray resolution.

  The per-pixel ℓ1 sums the 6 channels (direction, origin). Confidence weighting with
  ``ray_conf`` and the same ``λ_c`` is the reference §10 default (the paper only writes the
  confidence form for L_D). ``mask`` defaults to all pixels (rays are defined everywhere).

  Args: ``pred_ray``, ``gt_ray`` ``(B, S, h', w', 6)``; ``conf``, ``mask`` ``(B, S, h', w')``.
  """
  if mask is None:
    mask = jnp.ones(pred_ray.shape[:-1], bool)
  err = jnp.sum(jnp.abs(pred_ray - gt_ray), -1)
  return _conf_l1(err, conf, jnp.asarray(mask, bool), conf_lambda)


def compose_points(pred_depth: jax.Array, pred_ray: jax.Array) -> jax.Array:
  """Predicted world points ``P̂ = t̂ + D̂ ⊙ d̂`` (paper §7.1) at the depth resolution.

  The ray map ``(B, S, h', w', 6)`` is upsampled to the depth map's ``(H, W)`` by
  :func:`_resize_affine_exact` (pixel-area aligned bilinear with linear extrapolation at the
  borders), which is exact for a true ray map (directions affine in the pixel coordinates,
  constant origins). Upsampling keeps the GT points exact at full resolution and avoids
  resampling depth or masks. Returns ``(B, S, H, W, 3)``.
  """
  ray = _resize_affine_exact(pred_ray, pred_depth.shape[-2:])
  return unproject.points_from_depth_and_rays(pred_depth, ray)


def point_loss(pred_points: jax.Array, gt_points: jax.Array, mask: jax.Array) -> jax.Array:
  """``L_P = (1/Z) Σ_p m_p ||P̂_p - P_p||_1`` (plain masked ℓ1, reference §10 default).

  Args: points ``(B, S, H, W, 3)``, ``mask`` ``(B, S, H, W)``; the ℓ1 sums the 3 coordinates.
  """
  err = jnp.sum(jnp.abs(pred_points - gt_points), -1)
  return _masked_mean(err, jnp.asarray(mask, bool))


def camera_loss(pred_enc: jax.Array, gt_enc: jax.Array, view_mask: jax.Array | None = None
                ) -> jax.Array:
  """``L_C = mean_views Σ_k |ĉ_k - v_k|`` over the 9-D encodings ``[t, q_xyzw, fov_h, fov_w]``.

  Both encodings are c2w with quaternions canonicalised to ``w >= 0`` (reference §3.1, §10).
  Args: ``(B, S, 9)`` each, optional ``view_mask`` ``(B, S)``.
  """
  err = jnp.sum(jnp.abs(pred_enc - gt_enc), -1)
  if view_mask is None:
    view_mask = jnp.ones(err.shape, bool)
  return _masked_mean(err, jnp.asarray(view_mask, bool))


def gradient_loss(pred_depth: jax.Array, gt_depth: jax.Array, mask: jax.Array) -> jax.Array:
  """``L_grad = ||∇_x D̂ - ∇_x D||_1 + ||∇_y D̂ - ∇_y D||_1`` (forward differences, paper §7.3).

  ``∇_x D[i, j] = D[i, j+1] - D[i, j]``, counted only where both pixels are valid; each
  direction is the mean over its own valid pairs. Args: ``(B, S, H, W)`` each.
  """
  mask = jnp.asarray(mask, bool)
  diff = jnp.where(mask, pred_depth - gt_depth, 0.0)
  mx = mask[..., :, 1:] & mask[..., :, :-1]
  my = mask[..., 1:, :] & mask[..., :-1, :]
  gx = jnp.abs(diff[..., :, 1:] - diff[..., :, :-1])
  gy = jnp.abs(diff[..., 1:, :] - diff[..., :-1, :])
  return _masked_mean(gx, mx) + _masked_mean(gy, my)


def predicted_pose_enc(pred: dict[str, Any], image_hw: tuple[int, int]) -> jax.Array:
  """9-D c2w encoding of a prediction: ``pred["pose_enc"]`` if present, else
  :func:`camera.encode_pose` of ``inv(pred["extrinsics"])`` and ``pred["intrinsics"]`` (the
  decoded cameras re-encoded exactly as the GT is). Returns ``(B, S, 9)``."""
  if "pose_enc" in pred:
    return pred["pose_enc"]
  c2w = camera.rigid_inverse(camera.to_homogeneous(pred["extrinsics"]))
  return camera.encode_pose(c2w, pred["intrinsics"], image_hw)


def da3_loss(pred: dict[str, Any], batch: dict[str, Any], config: DA3LossConfig = DA3LossConfig()
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total DA3 student loss ``L = w_D L_D + w_M L_M + w_P L_P + β L_C + α L_grad``.

  The batch is first normalised with :func:`normalize_scene` (world frame = view 0, one scale
  per scene; idempotent, so an already normalised batch is fine) with the GT ray map at the
  prediction's ray resolution. To supervise with teacher labels, replace ``batch["depth"]`` by
  :func:`depth_target` before calling.

  Args:
    pred: DA3 outputs (module docstring).
    batch: pipeline batch (module docstring).
    config: :class:`DA3LossConfig`.

  Returns:
    ``(total, terms)`` with scalar ``terms`` ``depth``, ``ray``, ``point``, ``camera``,
    ``grad`` (unweighted) and ``scene_scale`` (B,).
  """
  h, w = pred["depth"].shape[-2:]
  ray_hw = tuple(pred["ray"].shape[-3:-1])
  gt, scale = normalize_scene(batch, ray_hw=ray_hw, pixel_offset=config.pixel_offset,
                              eps=config.eps)
  valid = gt["valid"]
  lam = config.conf_lambda
  terms = {
      "depth": depth_loss(pred["depth"], pred["depth_conf"], gt["depth"], valid, lam),
      "ray": ray_loss(pred["ray"], pred["ray_conf"], gt["ray_target"], None, lam),
      "point": point_loss(compose_points(pred["depth"], pred["ray"]), gt["points"], valid),
      "camera": camera_loss(predicted_pose_enc(pred, (h, w)), gt["pose_enc"]),
      "grad": gradient_loss(pred["depth"], gt["depth"], valid),
  }
  total = (config.depth_weight * terms["depth"] + config.ray_weight * terms["ray"]
           + config.point_weight * terms["point"] + config.camera_weight * terms["camera"]
           + config.grad_weight * terms["grad"])
  terms["scene_scale"] = scale
  return total, terms


# ------------------------------------------------------------------------------------------------
# pose conditioning and teacher labels


def pose_condition_mask(rng: jax.Array, batch_size: int, prob: float = 0.2) -> jax.Array:
  """Bernoulli(``prob``) per sample: True = feed the GT cameras to ``cam_enc`` (paper §7.2,
  p = 0.2); False = use the learned placeholder token. Returns ``(batch_size,)`` bool."""
  return jax.random.bernoulli(rng, prob, (batch_size,))


def teacher_labels(teacher_depth: jax.Array, sparse_depth: jax.Array, mask: jax.Array,
                   seed: int = 0, *, iterations: int = 100
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Align relative teacher depth to sparse / noisy GT per view (paper §7.4).

  ``(ŝ, t̂) = argmin_{s>0, t} Σ_p m_p (s D̃_p + t - D_p)^2`` by RANSAC least squares with the
  inlier threshold = mean absolute deviation of the residuals from their median
  (:func:`alignment.ransac_scale_shift`, per view over the last two axes); label
  ``= ŝ D̃ + t̂``.

  Args:
    teacher_depth: ``(..., H, W)`` teacher prediction ``D̃``.
    sparse_depth: ``(..., H, W)`` GT ``D`` (values outside ``mask`` are ignored).
    mask: ``(..., H, W)`` bool, valid GT.
    seed: RANSAC seed (Python int; static under ``jit``).

  Returns:
    ``(labels (..., H, W), scale (...), shift (...))``.
  """
  s, t, _ = alignment.ransac_scale_shift(teacher_depth, sparse_depth, mask, seed=seed,
                                         iterations=iterations)
  labels = s[..., None, None] * teacher_depth + t[..., None, None]
  return labels, s, t


def depth_target(step: int | jax.Array, gt: jax.Array, teacher: jax.Array | Callable[[], jax.Array],
                 config: DA3LossConfig = DA3LossConfig()) -> jax.Array:
  """Depth supervision: GT before ``config.teacher_switch_step`` (paper: 120k of 200k), aligned
  teacher labels from then on. ``step`` may be traced. ``teacher`` may be a zero-argument
  function (e.g. the RANSAC alignment of :func:`teacher_labels`); it is then evaluated only
  after the switch (``lax.cond``), so steps before it do not pay for the alignment."""
  after = jnp.asarray(step) >= config.teacher_switch_step
  if callable(teacher):
    return jax.lax.cond(after, lambda: jnp.asarray(teacher(), gt.dtype), lambda: gt)
  return jnp.where(after, teacher, gt)
