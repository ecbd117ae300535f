"""DAGE training objectives (reference ``dage.md`` §9; official ``ngoductuanlhp/DAGE @ c3065a4``,
``training/loss/{pi3_loss,pi3_distill_loss,edge_loss}.py``).

Three totals, as the official classes compute them:

- :func:`pi3_loss` (``Pi3Loss``, stage-1 without distillation and stage 2)::

    L = L_pts + L_normal + 0.02 L_edge + 0.1 (100 L_trans + L_rot) + 0.2 L_metric

- :func:`distill_loss` (``Pi3DistillLoss``, stage-1 distillation)::

    L = [L_pts + L_normal + 0.1 L_edge] + 0.1 [100 L_trans + L_rot] + 0.2 L_metric
        + [L_pts^kd] + 0.1 [100 L_trans^kd + L_rot^kd] + 0.5 [L_feat]

  every bracket passed through the official ``check_and_fix_inf_nan`` (non-finite -> 0, then
  clamped to ``[-100, 100]``; :func:`_fix`).

- :func:`conf_loss` (stage 3, ``Pi3Loss(train_conf=True)``): ``L = 0.05 L_conf``.

Conventions (shapes channels-last, ``B`` samples of ``N`` views of ``H x W`` pixels):

- Predictions are DAGE ``forward`` outputs: ``local_points`` (B, N, H, W, 3) in each camera's
  OpenCV frame (up to scale), ``conf`` (B, N, H, W[, 1]) **logits**, ``camera_poses``
  (B, N, 4, 4) **camera-to-world**, ``metric_scale`` (B, 1) (already ``exp``-ed; the loss takes
  its log).
- Ground truth (:func:`prepare_gt`): z-depth (B, N, H, W); intrinsics **normalised** by the image
  size (``fx/W, fy/H, cx/W, cy/H``) with pixel ``(i, j)`` read at ``((j + 0.5)/W, (i + 0.5)/H)``
  (MoGe / ``utils3d`` convention); camera-to-world poses (B, N, 4, 4); valid mask (B, N, H, W).
  :func:`gt_from_pipeline` converts a :mod:`geojax.data` batch (pixel intrinsics, centres at
  integers, world-to-camera) to this form.
- Scale: the GT is moved into view 0's frame and divided by ``gt_norm_factor`` (mean distance of
  the valid points from view 0's centre); the prediction is divided by ``pred_norm_factor`` (mean
  norm of its local points over GT-valid pixels). One scale ``S`` per sample then aligns the
  normalised prediction to the GT (:func:`align_scale`, no gradient).
- Per-sample flags ``is_synthetic`` (normal and edge terms) and ``is_metric_scale`` (metric-scale
  term) are (B,) arrays; terms restricted by a flag are masked, so any mixture runs under one
  ``jit``. Pooling follows the official code: the point, confidence and camera terms are means
  over every valid pixel / pose pair of the batch; the normal term is a mean over the synthetic
  samples; the edge term pools the synthetic samples (one SSI median, one count per scale).
- Empty selections give 0 where the official code would divide by zero (NaN) or skip a term.

Official details reproduced on purpose: the scale alignment uses 4096 valid points picked by
PyTorch's legacy ``nearest`` 1-D resampling (float32 index arithmetic, :func:`resample_valid`);
the rotation error is ``acos`` clamped to ``[-1 + 1e-6, 1 - 1e-6]`` (a ~1.4e-3 rad floor); the
edge loss normalises with one median over the whole batch of synthetic images (not per image) and
clamps each direction of each scale at 5; the distillation total clamps its brackets
(``check_and_fix_inf_nan``); the stage-3 sky term takes a given mask (the official code always ran
SegFormer because of a ``sky_masks`` / ``sky_mask`` key mismatch). Not ported: the optional
global-point term (DAGE's forward returns no global points) and the SegFormer sky predictor.

Every function is pure ``jax.numpy``, ``jit``-able, float32, and differentiable w.r.t. the
predictions (``S``, the GT and the teacher are constants, as in the official code).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from geojax.geometry import alignment, camera, normals, rotation, unproject

_HP = jax.lax.Precision.HIGHEST
# acos(clamp(c, -1 + 1e-6, 1 - 1e-6)) of the official rotation loss, in float32.
_ROT_MIN = float(np.arccos(np.float32(1.0 - 1e-6)))
_ROT_MAX = float(np.arccos(np.float32(-1.0 + 1e-6)))
_SCHARR = np.array([[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]], np.float32)


# ------------------------------------------------------------------------------------------------
# small helpers


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _bool(x) -> jax.Array:
  return jnp.asarray(x).astype(bool)


def _safe_norm(v: jax.Array) -> jax.Array:
  """``|v|`` over the last axis with a zero (not NaN) gradient at ``v = 0``."""
  sq = jnp.sum(v * v, -1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum(m x) / sum(m)`` over all entries (0 when the mask is empty; NaN-safe)."""
  m = jnp.broadcast_to(mask, x.shape)
  return jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)


def _fix(x: jax.Array, hard_max: float | None = 100.0) -> jax.Array:
  """Official ``check_and_fix_inf_nan``: non-finite -> 0, then clamp to ``[-hard_max, hard_max]``
  (the clamp also stops the gradient beyond it)."""
  x = jnp.where(jnp.isfinite(x), x, 0.0)
  return x if hard_max is None else jnp.clip(x, -hard_max, hard_max)


def _apply_pose(pose: jax.Array, points: jax.Array) -> jax.Array:
  """``R p + t`` of ``pose`` (B, N, 4, 4) on ``points`` (B, N, ..., 3)."""
  return unproject.world_to_camera(points, pose)


def _bce_logits(x: jax.Array, y: jax.Array) -> jax.Array:
  """Element-wise ``BCEWithLogits``: ``max(x, 0) - x y + log(1 + exp(-|x|))``."""
  return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _sample_flag(gt: Mapping[str, Any], key: str, batch: int,
                 default: bool | None = None) -> jax.Array:
  """``gt[key]`` as a (B,) bool (numbers: ``> 0.5``); ``default`` when absent (else KeyError)."""
  flag = gt.get(key)
  if flag is None:
    if default is None:
      raise KeyError(f"gt needs the per-sample flag {key!r} (shape ({batch},))")
    return jnp.full((batch,), default)
  flag = jnp.asarray(flag).reshape(-1)
  if flag.shape[0] != batch:
    raise ValueError(f"gt[{key!r}] has shape {flag.shape}, expected ({batch},)")
  return flag if flag.dtype == bool else flag > 0.5


# ------------------------------------------------------------------------------------------------
# ground truth and prediction normalisation


def gt_from_pipeline(batch: Mapping[str, Any], *, pixel_offset: float = 0.0) -> dict:
  """Map a :mod:`geojax.data` batch (``depth``, ``valid``, ``intrinsics`` in pixels with centres at
  ``integer + pixel_offset``, ``extrinsics`` world-to-camera) to the GT fields of this module:
  ``depth``, ``valid_mask``, ``intrinsics`` normalised (``fx/W, fy/H, (cx + 0.5 - offset)/W,
  (cy + 0.5 - offset)/H``) and ``cam2world``. Other keys are passed through."""
  depth = _f32(batch["depth"])
  h, w = depth.shape[-2:]
  k = _f32(batch["intrinsics"])
  shift = 0.5 - pixel_offset
  k = k.at[..., 0, 2].add(shift).at[..., 1, 2].add(shift)
  k = k * jnp.array([1.0 / w, 1.0 / h, 1.0], jnp.float32)[:, None]
  with jax.default_matmul_precision("highest"):
    c2w = camera.rigid_inverse(camera.to_homogeneous(_f32(batch["extrinsics"])))
  out = {kk: v for kk, v in batch.items() if kk not in ("valid", "extrinsics")}
  out.update(depth=depth, valid_mask=_bool(batch["valid"]), intrinsics=k, cam2world=c2w)
  return out


def prepare_gt(depth: jax.Array, intrinsics: jax.Array, cam2world: jax.Array,
               valid_mask: jax.Array) -> dict[str, jax.Array]:
  """Official ``Pi3Loss.prepare_gt`` (``use_moge=True``).

  1. Unproject ``depth`` at the normalised pixel centres ``((j + .5)/W, (i + .5)/H)`` with the
     normalised ``intrinsics``.
  2. Poses relative to view 0: ``P_n' = inv(P_0) P_n`` (c2w); points to view 0's frame.
  3. ``gt_norm_factor = sum_valid |X| / (count + 1e-8)`` over all views of a sample; points and
     pose translations are divided by it (samples without a valid pixel keep factor 1).
  4. Back into each camera: ``local_points = inv(P_n') X``.

  Args:
    depth: (B, N, H, W) z-depth (non-finite values are replaced by 0).
    intrinsics: (B, N, 3, 3) normalised intrinsics.
    cam2world: (B, N, 4, 4) (or 3x4) camera-to-world poses.
    valid_mask: (B, N, H, W) bool.

  Returns:
    dict with ``local_points`` and ``global_points`` (B, N, H, W, 3), ``camera_poses``
    (B, N, 4, 4) relative c2w, ``norm_factor`` (B,), ``px`` (B, N) = ``fx_norm * W`` (focal in
    pixels, used by the edge loss), ``valid_mask`` (B, N, H, W) bool.
  """
  with jax.default_matmul_precision("highest"):
    depth = _f32(depth)
    depth = jnp.where(jnp.isfinite(depth), depth, 0.0)
    valid = _bool(valid_mask)
    k = _f32(intrinsics)
    c2w = camera.to_homogeneous(_f32(cam2world))
    h, w = depth.shape[-2:]
    k_px = k * jnp.array([w, h, 1.0], jnp.float32)[:, None]
    pts = unproject.depth_to_camera_points(depth, k_px, offset=0.5)
    rel = camera.relative_pose(c2w[:, :1], c2w, c2w=True)
    world = _apply_pose(rel, pts)
    dist = _safe_norm(jnp.where(valid[..., None], world, 0.0))
    cnt = jnp.sum(valid, axis=(1, 2, 3)).astype(jnp.float32)
    nf = jnp.sum(dist, axis=(1, 2, 3)) / (cnt + 1e-8)
    nf = jnp.where(cnt > 0, nf, 1.0)
    world = world / nf[:, None, None, None, None]
    rel = rel.at[..., :3, 3].divide(nf[:, None, None])
    local = _apply_pose(camera.rigid_inverse(rel), world)
    return dict(local_points=local, global_points=world, camera_poses=rel, norm_factor=nf,
                px=k[..., 0, 0] * w, valid_mask=valid)


def normalize_prediction(local_points: jax.Array, camera_poses: jax.Array, valid_mask: jax.Array
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Official ``normalize_pred``: divide local points and pose translations by
  ``norm_factor = sum_valid |p| / (count + 1e-8)`` (gradient flows through the factor; 1 for a
  sample without a valid pixel, where the official code would divide by 0).

  Args: ``local_points`` (B, N, H, W, 3), ``camera_poses`` (B, N, 4, 4) c2w, ``valid_mask``
  (B, N, H, W). Returns ``(local_points, camera_poses, norm_factor (B,))``.
  """
  pts = _f32(local_points)
  poses = camera.to_homogeneous(_f32(camera_poses))
  valid = _bool(valid_mask)
  dist = _safe_norm(jnp.where(valid[..., None], pts, 0.0))
  cnt = jnp.sum(valid, axis=(1, 2, 3)).astype(jnp.float32)
  nf = jnp.sum(dist, axis=(1, 2, 3)) / (cnt + 1e-8)
  nf = jnp.where(cnt > 0, nf, 1.0)
  pts = pts / nf[:, None, None, None, None]
  poses = poses.at[..., :3, 3].divide(nf[:, None, None])
  return pts, poses, nf


def point_weights(z: jax.Array, valid_mask: jax.Array) -> jax.Array:
  """Per-pixel weights ``1 / (max(z, 0.1 zbar) + 1e-6)`` with ``zbar`` the per-view weighted mean
  ``mean(z m) / (mean(m) + 1e-7)`` over ``(H, W)``. ``z``, ``valid_mask`` (..., H, W)."""
  m = _bool(valid_mask)
  zm = jnp.where(m, z, 0.0)
  zbar = (jnp.mean(zm, (-2, -1), keepdims=True)
          / (jnp.mean(m.astype(jnp.float32), (-2, -1), keepdims=True) + 1e-7))
  return 1.0 / (jnp.maximum(z, 0.1 * zbar) + 1e-6)


# ------------------------------------------------------------------------------------------------
# scale alignment


def resample_valid(values: jax.Array, valid_mask: jax.Array, size: int = 4096) -> jax.Array:
  """Official ``prepare_ROE``: the valid entries of each sample (row-major over ``N, H, W``)
  resampled to ``size`` by PyTorch's legacy 1-D ``nearest`` rule, entry
  ``min(floor(k * (n / size)), n - 1)`` in float32 (``n`` = valid count, traced); a sample
  without a valid entry gives ones.

  Args: ``values`` (B, N, H, W, C), ``valid_mask`` (B, N, H, W). Returns (B, size, C).
  """
  b, c = values.shape[0], values.shape[-1]
  flat = values.reshape(b, -1, c)
  m = _bool(valid_mask).reshape(b, -1)

  def one(x, mk):
    n = jnp.sum(mk, dtype=jnp.int32)
    scale = n.astype(jnp.float32) / jnp.float32(size)
    src = jnp.floor(jnp.arange(size, dtype=jnp.float32) * scale).astype(jnp.int32)
    src = jnp.minimum(src, n - 1)
    rank_end = jnp.cumsum(mk.astype(jnp.int32))
    pos = jnp.clip(jnp.searchsorted(rank_end, src + 1, side="left"), 0, x.shape[0] - 1)
    return jnp.where(n > 0, x[pos], jnp.ones((size, c), x.dtype))

  return jax.vmap(one)(flat, m)


def align_scale(pred_points: jax.Array, target_points: jax.Array, weights: jax.Array,
                valid_mask: jax.Array, num_samples: int = 4096) -> jax.Array:
  """Official ``align_points_scale`` on :func:`resample_valid` samples, then ``|S|``.

  ``S = argmin_s sum_k w_k |s p_k - t_k|_1`` over ``num_samples`` nearest-resampled valid pixels
  (all three coordinates), solved exactly as the lower weighted median of ``t / p`` with weights
  ``w |p|`` (:func:`geojax.geometry.alignment.weighted_l1_scale`). No gradient.

  Args: ``pred_points``, ``target_points`` (B, N, H, W, 3); ``weights``, ``valid_mask``
  (B, N, H, W). Returns (B,).
  """
  both = jnp.concatenate([_f32(pred_points), _f32(target_points), _f32(weights)[..., None]], -1)
  x = resample_valid(jax.lax.stop_gradient(both), valid_mask, num_samples)
  return jnp.abs(alignment.weighted_l1_scale(x[..., 0:3], x[..., 3:6], x[..., 6]))


# ------------------------------------------------------------------------------------------------
# loss terms


def point_errors(aligned: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """Per-coordinate weighted L1 ``|S p - t| w`` (B, N, H, W, 3)."""
  return jnp.abs(aligned - target) * weights[..., None]


def local_points_loss(aligned: jax.Array, target: jax.Array, weights: jax.Array,
                      valid_mask: jax.Array) -> jax.Array:
  """``mean_{valid pixels, xyz} |S p - t| w`` pooled over the batch (official
  ``local_pts_loss``). ``aligned``, ``target`` (B, N, H, W, 3); ``weights``, ``valid_mask``
  (B, N, H, W)."""
  err = point_errors(aligned, target, weights)
  return _masked_mean(err, _bool(valid_mask)[..., None])


def _xyz(p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  return p[..., 0], p[..., 1], p[..., 2]


def _sub(a, b):
  return tuple(x - y for x, y in zip(a, b))


def _cross(a, b):
  """Cross product of component triples (structure-of-arrays: fewer ops to compile than
  ``jnp.cross`` on a trailing axis of 3)."""
  return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _angle(a, b) -> jax.Array:
  """``atan2(|a x b| + 1e-12, a . b)`` of component triples (MoGe ``angle_diff_vec3``)."""
  c = _cross(a, b)
  sq = c[0] * c[0] + c[1] * c[1] + c[2] * c[2]
  pos = sq > 0
  norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
  return jnp.arctan2(norm + 1e-12, a[0] * b[0] + a[1] * b[1] + a[2] * b[2])


def _corners(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The four corners ``lu, ru, ld, rd`` of every 2x2 cell of ``(..., H, W)``, each
  ``(..., H-1, W-1)`` (l/r = left/right column, u/d = upper/lower row)."""
  return x[..., :-1, :-1], x[..., :-1, 1:], x[..., 1:, :-1], x[..., 1:, 1:]


def _triangle_normals(p: jax.Array) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """Cross products of the four corner triangles of each 2x2 cell of ``p`` (..., H, W, 3):
  ``(ru - rd) x (ld - rd)``, ``(lu - ru) x (rd - ru)``, ``(ld - lu) x (ru - lu)``,
  ``(rd - ld) x (lu - ld)``, each a component triple of (..., H-1, W-1)."""
  lu, ru, ld, rd = zip(*(_corners(c) for c in _xyz(p)))
  return [_cross(_sub(ru, rd), _sub(ld, rd)), _cross(_sub(lu, ru), _sub(rd, ru)),
          _cross(_sub(ld, lu), _sub(ru, lu)), _cross(_sub(rd, ld), _sub(lu, ld))]


def normal_loss(points: jax.Array, gt_points: jax.Array, valid_mask: jax.Array,
                sample_mask: jax.Array | None = None, *, edge_rtol: float = 0.03) -> jax.Array:
  """Official ``PointLoss.normal_loss`` (MoGe triangle normals).

  Pixels on GT depth edges (:func:`geojax.geometry.normals.depth_edges`, ``rtol = 0.03``, 3x3) are
  dropped from ``valid_mask``. For each 2x2 cell the four corner triangles whose three pixels are
  valid contribute ``smooth_3deg(clip(angle(n, n_gt), 1deg, 90deg))`` (``smooth_b(e) = e^2 / 2b``
  below ``b``, ``e - b/2`` above). The sum is divided by the number of cells of the selected
  samples (``mean`` over ``(B_sel, N, H-1, W-1)``) and by ``4 max(H, W)``.

  Args: ``points`` (aligned prediction), ``gt_points`` (B, N, H, W, 3); ``valid_mask``
  (B, N, H, W); ``sample_mask`` (B,) samples to include (default all). Returns a scalar, 0 when
  no sample is selected.
  """
  b, n, h, w = points.shape[:4]
  sel = jnp.ones((b,), bool) if sample_mask is None else _bool(sample_mask)
  not_edge = ~normals.depth_edges(gt_points[..., 2], rtol=edge_rtol)
  m = _bool(valid_mask) & not_edge & sel[:, None, None, None]
  mlu, mru, mld, mrd = _corners(m)
  masks = [mru & mld & mrd, mlu & mrd & mru, mld & mru & mlu, mrd & mlu & mld]
  lo, hi, beta = math.radians(1), math.radians(90), math.radians(3)
  total = jnp.zeros(mlu.shape, jnp.float32)
  for tri, tri_gt, mk in zip(_triangle_normals(points), _triangle_normals(gt_points), masks):
    e = jnp.clip(_angle(tri, tri_gt), lo, hi)
    e = jnp.where(e < beta, 0.5 * e * e / beta, e - 0.5 * beta)
    total = total + jnp.where(mk, e, 0.0)
  cells = jnp.sum(sel).astype(jnp.float32) * (n * (h - 1) * (w - 1))
  return jnp.sum(total) / jnp.maximum(cells, 1.0) / (4 * max(h, w))


def _window_all(m: jax.Array) -> jax.Array:
  """(M, H, W) bool -> (M, H-2, W-2): the whole 3x3 window is True ('valid' 3x3 box sum >= 9,
  as the official ``conv2d(mask, ones) >= 9``)."""
  s = jax.lax.reduce_window(m.astype(jnp.float32), 0.0, jax.lax.add, (1, 3, 3), (1, 1, 1),
                            "VALID")
  return s >= 9.0


def _scharr(x: jax.Array) -> jax.Array:
  """(M, H, W) -> (M, 2, H-2, W-2): 'valid' cross-correlation with the Scharr kernels
  (channel 0: x ``[-3 0 3; -10 0 10; -3 0 3]``, channel 1: y, its transpose)."""
  k = jnp.asarray(np.stack([_SCHARR, _SCHARR.T])[:, None])  # (O=2, I=1, 3, 3)
  return jax.lax.conv_general_dilated(x[:, None], k, (1, 1), "VALID", precision=_HP)


def _ssi_normalize(x: jax.Array, m: jax.Array) -> jax.Array:
  """Official ``ssi_normalize_depth``: ``(x - med) / (mean|x - med| + 1e-8)`` with one lower
  median (``torch.median``) and one mean over **all** masked entries of ``x`` together (all
  images of the batch); all entries when the mask is empty."""
  flat, mf = x.reshape(-1), m.reshape(-1)
  n = jnp.sum(mf, dtype=jnp.int32)
  any_ = n > 0
  mf = jnp.where(any_, mf, True)
  n = jnp.where(any_, n, flat.shape[0])
  xs = jnp.sort(jnp.where(mf, flat, jnp.inf))
  med = xs[jnp.maximum((n - 1) // 2, 0)]
  mad = jnp.sum(jnp.where(mf, jnp.abs(flat - med), 0.0)) / n.astype(jnp.float32)
  return (x - med) / (mad + 1e-8)


def edge_loss(pred_depth: jax.Array, gt_depth: jax.Array, focal_over_width: jax.Array,
              valid_mask: jax.Array, sample_mask: jax.Array | None = None, *, scales: int = 4,
              clamp: float = 5.0, outlier: float = 50.0) -> jax.Array:
  """Official ``MultiScaleDeriLoss(operator='Scharr', scales=4, ssi=True)`` on canonical inverse
  depth ``rho = (1 / z) (f_x / W)``.

  1. SSI-normalise prediction and GT: ``(rho - median) / mean|rho - median|`` with one median and
     one mean over every valid pixel of the selected samples together (as coded, not per image).
  2. For each of ``scales`` levels: drop pixels with ``|rho'| > 50`` (either map; cumulative
     over levels), keep Scharr outputs whose whole 3x3 window is valid, add
     ``min(5, sum|Sx rho'_p - Sx rho'_g| / count) + min(5, same for Sy)`` (nothing when the count
     is 0); then nearest-downsample maps and mask by 2 (``x[::2, ::2]``, size ``floor(H / 2)``).
  3. Divide by ``scales``.

  Zero depths (infinite ``rho``) are treated as invalid pixels with ``rho = 0`` (the official code
  would propagate inf / NaN).

  Args:
    pred_depth: (B, N, H, W) aligned predicted z.
    gt_depth: (B, N, H, W) GT z.
    focal_over_width: (B, N) normalised ``f_x`` (``px / W``).
    valid_mask: (B, N, H, W).
    sample_mask: (B,) samples to include (default all).

  Returns a scalar.
  """
  b = pred_depth.shape[0]
  h, w = pred_depth.shape[-2:]
  if min(h, w) >> (scales - 1) < 3:
    raise ValueError(f"edge loss needs at least 3x3 pixels at {scales} scales, got {(h, w)}")
  sel = jnp.ones((b,), bool) if sample_mask is None else _bool(sample_mask)
  k = _f32(focal_over_width)[..., None, None]

  def inv(z):
    ok = jnp.isfinite(z) & (z != 0)
    return jnp.where(ok, (1.0 / jnp.where(ok, z, 1.0)) * k, 0.0), ok

  rp, okp = inv(_f32(pred_depth))
  rg, okg = inv(_f32(gt_depth))
  m = _bool(valid_mask) & sel[:, None, None, None] & okp & okg
  p = _ssi_normalize(rp, m).reshape((-1, h, w))
  t = _ssi_normalize(rg, m).reshape((-1, h, w))
  m = m.reshape((-1, h, w))
  total = jnp.zeros((), jnp.float32)
  for _ in range(scales):
    m = m & ~((jnp.abs(p) > outlier) | (jnp.abs(t) > outlier))
    gm = _window_all(m)[:, None]
    cnt = jnp.sum(gm).astype(jnp.float32)
    diff = jnp.where(gm, jnp.abs(_scharr(p) - _scharr(t)), 0.0)
    lxy = jnp.sum(diff, axis=(0, 2, 3)) / jnp.maximum(cnt, 1.0)  # (x, y)
    total = total + jnp.where(cnt > 0, jnp.sum(jnp.minimum(lxy, clamp)), 0.0)
    hh, ww = p.shape[-2] // 2, p.shape[-1] // 2
    p, t, m = (a[..., ::2, ::2][..., :hh, :ww] for a in (p, t, m))
  return total / scales


def _pairwise_relative(c2w: jax.Array) -> jax.Array:
  """``inv(P_i) P_j`` for every ordered pair, (B, N, N, 4, 4)."""
  return camera.compose_poses(camera.rigid_inverse(c2w)[:, :, None], c2w[:, None, :])


def camera_loss(pred_c2w: jax.Array, gt_c2w: jax.Array, scale: jax.Array, *, delta: float = 0.1,
                sample_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Official ``CameraLoss`` on all ordered pairs ``i != j`` of relative poses
  ``inv(P_i) P_j`` (c2w), the prediction's translations first multiplied by ``scale``.

  ``trans`` = Huber(``delta``) on the relative translations, mean over (pairs, xyz);
  ``rot`` = mean geodesic angle of ``R_pred^T R_gt``, clamped like the official
  ``acos(clamp(cos, -1 + 1e-6, 1 - 1e-6))`` (floor ~1.4e-3 rad, zero gradient below it).

  Args: ``pred_c2w``, ``gt_c2w`` (B, N, 4, 4); ``scale`` (B,); ``sample_mask`` (B,) samples to
  include (default all). Returns ``(trans, rot)`` scalars (0 for N = 1 or no sample).
  """
  b, n = pred_c2w.shape[:2]
  sel = jnp.ones((b,), bool) if sample_mask is None else _bool(sample_mask)
  pred = camera.to_homogeneous(_f32(pred_c2w))
  pred = pred.at[..., :3, 3].multiply(_f32(scale)[:, None, None])
  with jax.default_matmul_precision("highest"):
    rp = _pairwise_relative(pred)
    rg = _pairwise_relative(camera.to_homogeneous(_f32(gt_c2w)))
  pair = (~jnp.eye(n, dtype=bool))[None] & sel[:, None, None]
  d = rp[..., :3, 3] - rg[..., :3, 3]
  ad = jnp.abs(d)
  hub = jnp.where(ad < delta, 0.5 * d * d, delta * (ad - 0.5 * delta))
  trans = _masked_mean(hub, pair[..., None])
  ang = jnp.clip(rotation.geodesic_distance(rp[..., :3, :3], rg[..., :3, :3]), _ROT_MIN, _ROT_MAX)
  rot = _masked_mean(ang, pair)
  return trans, rot


def metric_scale_loss(metric_scale: jax.Array, scale: jax.Array, gt_norm_factor: jax.Array,
                      pred_norm_factor: jax.Array, is_metric_scale: jax.Array) -> jax.Array:
  """``mean (log m - log(S gt_nf / pred_nf))^2`` over the metric samples and the trailing axes of
  ``metric_scale`` (B, T); the target is a constant. 0 without a metric sample."""
  ms = _f32(metric_scale).reshape(metric_scale.shape[0], -1)
  target = jax.lax.stop_gradient(_f32(scale) * _f32(gt_norm_factor) / _f32(pred_norm_factor))
  sel = _bool(is_metric_scale)[:, None] & jnp.ones(ms.shape, bool)
  safe = jnp.where(sel, ms, 1.0)
  err = (jnp.log(safe) - jnp.log(jnp.where(sel, target[:, None], 1.0))) ** 2
  return _masked_mean(err, sel)


def confidence_loss(conf: jax.Array, point_err: jax.Array, valid_mask: jax.Array,
                    sky_mask: jax.Array | None, *, threshold: float = 0.03) -> jax.Array:
  """Stage-3 ``local_conf_loss``: ``BCE(conf, 1[mean_xyz err < threshold])`` averaged over the valid
  pixels of the batch, plus ``BCE(conf, 0)`` averaged over sky pixels that are not valid (0 when
  there are none). ``conf`` logits (B, N, H, W[, 1]); ``point_err`` (B, N, H, W, 3) from
  :func:`point_errors`; masks (B, N, H, W)."""
  c = _f32(conf)
  if c.ndim == 5:
    c = c[..., 0]
  valid = _bool(valid_mask)
  target = (jnp.mean(jax.lax.stop_gradient(point_err), -1) < threshold).astype(jnp.float32)
  loss = _masked_mean(_bce_logits(c, target), valid)
  if sky_mask is not None:
    sky = _bool(sky_mask) & ~valid
    loss = loss + _masked_mean(_bce_logits(c, 0.0), sky)
  return loss


def feature_distill_loss(student: jax.Array, teacher: jax.Array, eps: float = 1e-8) -> jax.Array:
  """``mean(1 - cos(student, teacher))`` over all tokens, cosine over the last axis
  (``F.cosine_similarity``: each vector divided by ``max(|v|, eps)``); teacher is constant."""
  s = _f32(student)
  t = jax.lax.stop_gradient(_f32(teacher))
  s = s / jnp.maximum(_safe_norm(s), eps)[..., None]
  t = t / jnp.maximum(_safe_norm(t), eps)[..., None]
  return jnp.mean(1.0 - jnp.sum(s * t, -1))


def teacher_conf_mask(conf: jax.Array, quantile: float = 0.3) -> jax.Array:
  """Distillation mask without GT: ``sigmoid(conf)`` above its per-view ``quantile`` (linear
  interpolation, ``torch.quantile``). ``conf`` (B, N, H, W[, 1]) -> (B, N, H, W) bool."""
  c = _f32(conf)
  if c.ndim == 5:
    c = c[..., 0]
  p = jax.nn.sigmoid(jax.lax.stop_gradient(c))
  q = jnp.quantile(p.reshape(p.shape[:2] + (-1,)), quantile, axis=-1, method="linear")
  return p > q[..., None, None]


# ------------------------------------------------------------------------------------------------
# totals


def _gt_fields(gt: Mapping[str, Any]) -> dict[str, jax.Array]:
  try:
    return prepare_gt(gt["depth"], gt["intrinsics"], gt["cam2world"], gt["valid_mask"])
  except KeyError as e:
    raise KeyError(f"gt needs depth, intrinsics (normalised), cam2world, valid_mask; missing {e}"
                   ) from None


def _real_terms(pred_pts, g, valid, synthetic, *, edge: bool, num_samples: int):
  """Scale ``S`` and the point / normal / edge terms against the GT."""
  z = g["local_points"][..., 2]
  weights = point_weights(z, valid)
  scale = align_scale(pred_pts, g["local_points"], weights, valid, num_samples)
  aligned = scale[:, None, None, None, None] * pred_pts
  terms = dict(local_pts_loss=local_points_loss(aligned, g["local_points"], weights, valid),
               normal_loss=normal_loss(aligned, g["local_points"], valid, synthetic))
  if edge:
    w = pred_pts.shape[-2]
    terms["edge_loss"] = edge_loss(aligned[..., 2], z, g["px"] / w, valid, synthetic)
  return scale, terms


def pi3_loss(pred: Mapping[str, Any], gt: Mapping[str, Any], *, edge_weight: float = 0.02,
             camera_weight: float = 0.1, trans_weight: float = 100.0,
             metric_scale_weight: float = 0.2, use_edge_loss: bool = True,
             use_camera_loss: bool = True, use_metric_scale_loss: bool = True,
             num_align_samples: int = 4096) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Official ``Pi3Loss(use_edge_loss=True)`` with ``metric_scale_loss=True``::

    L = L_pts + L_normal + edge_weight L_edge
        + camera_weight (trans_weight L_trans + L_rot) + metric_scale_weight L_metric

  Args:
    pred: ``local_points`` (B, N, H, W, 3), ``camera_poses`` (B, N, 4, 4) c2w, ``metric_scale``
      (B, 1) (needed only with ``use_metric_scale_loss``).
    gt: ``depth`` (B, N, H, W), ``intrinsics`` (B, N, 3, 3) normalised, ``cam2world``
      (B, N, 4, 4), ``valid_mask`` (B, N, H, W), ``is_synthetic`` (B,) (normal and edge terms),
      ``is_metric_scale`` (B,) (metric-scale term).
    edge_weight, camera_weight, trans_weight, metric_scale_weight: official 0.02, 0.1, 100, 0.2.
    use_edge_loss, use_camera_loss, use_metric_scale_loss: official switches (stage 1/2: all on).
    num_align_samples: points of the scale alignment (official 4096).

  Returns:
    ``(total, aux)``: scalars ``local_pts_loss``, ``normal_loss``, ``edge_loss``, ``trans_loss``,
    ``rot_loss``, ``metric_scale_loss``, ``total`` (unweighted terms, official names) and (B,)
    ``align_scale``, ``gt_norm_factor``, ``pred_norm_factor``.
  """
  with jax.default_matmul_precision("highest"):
    g = _gt_fields(gt)
    valid = g["valid_mask"]
    b = valid.shape[0]
    synthetic = _sample_flag(gt, "is_synthetic", b)
    pts, poses, pnf = normalize_prediction(pred["local_points"], pred["camera_poses"], valid)
    scale, aux = _real_terms(pts, g, valid, synthetic, edge=use_edge_loss,
                                   num_samples=num_align_samples)
    total = aux["local_pts_loss"] + aux["normal_loss"]
    if use_edge_loss:
      total = total + edge_weight * aux["edge_loss"]
    if use_camera_loss:
      aux["trans_loss"], aux["rot_loss"] = camera_loss(poses, g["camera_poses"], scale)
      total = total + camera_weight * (trans_weight * aux["trans_loss"] + aux["rot_loss"])
    if use_metric_scale_loss:
      metric = _sample_flag(gt, "is_metric_scale", b)
      aux["metric_scale_loss"] = metric_scale_loss(pred["metric_scale"], scale, g["norm_factor"],
                                                   pnf, metric)
      total = total + metric_scale_weight * aux["metric_scale_loss"]
    aux.update(total=total, align_scale=scale, gt_norm_factor=g["norm_factor"],
               pred_norm_factor=pnf)
    return total, aux


def distill_loss(pred: Mapping[str, Any], teacher: Mapping[str, Any], gt: Mapping[str, Any], *,
                 student_feat: jax.Array | None = None, teacher_feat: jax.Array | None = None,
                 edge_weight: float = 0.1, camera_weight: float = 0.1, trans_weight: float = 100.0,
                 metric_scale_weight: float = 0.2, kd_alpha: float = 1.0, feat_weight: float = 0.5,
                 use_real_loss: bool = True, use_edge_loss: bool = True,
                 use_metric_scale_loss: bool = True, teacher_quantile: float = 0.3,
                 hard_max: float | None = 100.0, num_align_samples: int = 4096
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Official ``Pi3DistillLoss(use_edge_loss=True)`` (stage-1 distillation,
  ``feat_distill_type='cosine'``, ``metric_scale_loss=True``)::

    L = fix(L_pts + L_normal + edge_weight L_edge)
        + camera_weight fix(trans_weight L_trans + L_rot) + metric_scale_weight L_metric
        + kd_alpha fix(L_pts^kd) + camera_weight kd_alpha fix(trans_weight L_trans^kd + L_rot^kd)
        + feat_weight kd_alpha fix(L_feat)

  with ``fix`` = :func:`_fix` (``hard_max``). Distillation: the teacher's local points and poses
  are normalised like the prediction (same mask); ``L_pts^kd`` is the point loss of the
  prediction aligned (own scale ``S_kd``) to the normalised teacher with weights from the
  teacher's depth; ``L_*^kd`` the camera loss against the teacher's poses with ``S_kd``;
  ``L_feat`` = :func:`feature_distill_loss` (skipped when no features are given).

  The optional per-sample ``gt["has_gt"]`` (B,) marks samples with real depth (default all). For a
  sample without it (the official mixed-batch rule) the mask is :func:`teacher_conf_mask` of
  ``teacher["conf"]`` (per-view 30 % quantile) and the GT terms skip it.

  Args:
    pred: as :func:`pi3_loss`.
    teacher: ``local_points`` (B, N, H, W, 3), ``camera_poses`` (B, N, 4, 4) c2w, ``conf``
      (B, N, H, W[, 1]) logits (only with ``has_gt``). Treated as constants.
    gt: as :func:`pi3_loss`, optionally ``has_gt``.
    student_feat, teacher_feat: (B, T, C) tokens (e.g. token-splitter output vs teacher block).

  Returns:
    ``(total, aux)`` with the :func:`pi3_loss` names plus ``distill_local_pts_loss``,
    ``distill_trans_loss``, ``distill_rot_loss``, ``feat_distill_loss`` and (B,)
    ``distill_align_scale``, ``teacher_norm_factor``.
  """
  with jax.default_matmul_precision("highest"):
    g = _gt_fields(gt)
    valid = g["valid_mask"]
    b = valid.shape[0]
    has_gt = _sample_flag(gt, "has_gt", b, default=True)
    if gt.get("has_gt") is not None:
      valid = jnp.where(has_gt[:, None, None, None], valid, teacher_conf_mask(teacher["conf"],
                                                                              teacher_quantile))
    real_valid = valid & has_gt[:, None, None, None]
    synthetic = _sample_flag(gt, "is_synthetic", b) & has_gt
    t_pts, t_poses, tnf = normalize_prediction(jax.lax.stop_gradient(_f32(teacher["local_points"])),
                                               jax.lax.stop_gradient(_f32(teacher["camera_poses"])),
                                               valid)
    pts, poses, pnf = normalize_prediction(pred["local_points"], pred["camera_poses"], valid)
    aux: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    if use_real_loss:
      scale, terms = _real_terms(pts, g, real_valid, synthetic, edge=use_edge_loss,
                                       num_samples=num_align_samples)
      aux.update(terms)
      point_total = terms["local_pts_loss"] + terms["normal_loss"]
      if use_edge_loss:
        point_total = point_total + edge_weight * terms["edge_loss"]
      aux["trans_loss"], aux["rot_loss"] = camera_loss(poses, g["camera_poses"], scale,
                                                       sample_mask=has_gt)
      total = (total + _fix(point_total, hard_max)
               + camera_weight * _fix(trans_weight * aux["trans_loss"] + aux["rot_loss"], hard_max))
      if use_metric_scale_loss:
        metric = _sample_flag(gt, "is_metric_scale", b) & has_gt
        aux["metric_scale_loss"] = metric_scale_loss(pred["metric_scale"], scale,
                                                     g["norm_factor"], pnf, metric)
        total = total + metric_scale_weight * aux["metric_scale_loss"]
      aux["align_scale"] = scale
    t_w = point_weights(t_pts[..., 2], valid)
    kd_scale = align_scale(pts, t_pts, t_w, valid, num_align_samples)
    aux["distill_local_pts_loss"] = local_points_loss(kd_scale[:, None, None, None, None] * pts,
                                                      t_pts, t_w, valid)
    aux["distill_trans_loss"], aux["distill_rot_loss"] = camera_loss(poses, t_poses, kd_scale)
    total = (total + kd_alpha * _fix(aux["distill_local_pts_loss"], hard_max)
             + camera_weight * kd_alpha * _fix(trans_weight * aux["distill_trans_loss"]
                                               + aux["distill_rot_loss"], hard_max))
    if student_feat is not None and teacher_feat is not None:
      aux["feat_distill_loss"] = feature_distill_loss(student_feat, teacher_feat)
      total = total + feat_weight * kd_alpha * _fix(aux["feat_distill_loss"], hard_max)
    aux.update(total=total, distill_align_scale=kd_scale, gt_norm_factor=g["norm_factor"],
               pred_norm_factor=pnf, teacher_norm_factor=tnf)
    return total, aux


def conf_loss(pred: Mapping[str, Any], gt: Mapping[str, Any], *, sky_mask: jax.Array | None = None,
              weight: float = 0.05, threshold: float = 0.03, num_align_samples: int = 4096
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Stage 3 (official ``Pi3Loss(train_conf=True)``, ``skip_cam_loss=True``): ``L = weight
  L_conf`` with :func:`confidence_loss` of ``pred["conf"]`` against ``1[point error < threshold]``
  after normalisation and scale alignment exactly as in :func:`pi3_loss`.

  ``sky_mask`` (B, N, H, W) (default ``gt["sky_mask"]`` if present, else none) replaces the
  official SegFormer-B0 sky prediction (the official code never reads a dataset sky mask because
  it looks for the key ``sky_masks`` while storing ``sky_mask``).

  Returns ``(total, aux)`` with ``local_conf_loss``, ``total`` and (B,) ``align_scale``,
  ``gt_norm_factor``, ``pred_norm_factor``.
  """
  with jax.default_matmul_precision("highest"):
    g = _gt_fields(gt)
    valid = g["valid_mask"]
    pts, _, pnf = normalize_prediction(pred["local_points"], pred["camera_poses"], valid)
    weights = point_weights(g["local_points"][..., 2], valid)
    scale = align_scale(pts, g["local_points"], weights, valid, num_align_samples)
    err = point_errors(scale[:, None, None, None, None] * pts, g["local_points"], weights)
    if sky_mask is None:
      sky_mask = gt.get("sky_mask")
    lc = confidence_loss(pred["conf"], err, valid, sky_mask, threshold=threshold)
    total = weight * lc
    return total, dict(local_conf_loss=lc, total=total, align_scale=scale,
                       gt_norm_factor=g["norm_factor"], pred_norm_factor=pnf)
