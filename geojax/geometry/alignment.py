"""Scale / scale-shift / Sim(3) alignment, their RANSAC variants and MoGe focal-shift recovery.

Conventions:
- Depth-style functions (:func:`median_scale`, :func:`lstsq_scale`, :func:`lstsq_scale_shift`,
  :func:`align_depth`, :func:`ransac_scale_shift`) take ``pred`` and ``gt`` of one shape. A 1-D
  input ``(N,)`` is one sample; an input with two or more axes is ``(..., H, W)`` and is aligned
  **per sample over the last two axes** (leading axes are batch), so scales and shifts have shape
  ``(...)``. Flatten first to pool more axes, or reshape ``(B, N)`` data to ``(B, 1, N)``.
  :func:`weighted_l1_scale` pools the last axis instead (last two for point sets; see there).
- Masks are boolean (non-zero = valid) and broadcast to the data shape; ``None`` = all valid.
  Entries outside the mask never enter a fitted parameter (NaN / inf there are harmless).
- Sim(3): ``dst ~ s R src + t`` with points as rows, ``(..., N, 3)``.
- Precision: inputs are promoted to at least float32 (float64 is kept when x64 is enabled).
- Validation: every public function raises ``ValueError`` naming the argument for a wrong shape
  or option (shapes are static, so this holds under ``jit`` too). An all-empty ``mask`` or
  all-zero ``weights`` (:func:`umeyama`) raises only when the value is concrete (an eager call;
  :func:`weighted_l1_scale` does not check its ``weight``); under ``jit`` /
  ``vmap``, and for one empty sample inside a batch, the fallback is returned instead: scale 1,
  shift 0, identity Sim(3); focal 1 and shift 0 in :func:`recover_focal_shift`.
- RANSAC functions take an integer ``seed`` and are deterministic given it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from geojax.nn.resize import legacy_nearest_index

_HP = jax.lax.Precision.HIGHEST
ALIGN_MODES = ("none", "median", "scale", "scale_shift", "disparity_affine", "log_affine")


# ------------------------------------------------------------------------------------------------
# validation helpers


def _as_float(x) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _broadcasts_to(shape, target) -> bool:
  try:
    return tuple(jnp.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
  except ValueError:
    return False


def _mask_arg(mask, shape, name: str = "mask") -> jax.Array:
  """Boolean mask broadcast to ``shape``; raises if it does not fit or (eagerly) is empty."""
  if mask is None:
    return jnp.ones(shape, bool)
  mask = jnp.asarray(mask)
  if not _broadcasts_to(mask.shape, shape):
    raise ValueError(f"{name} shape {mask.shape} does not broadcast to {tuple(shape)}")
  mask = jnp.broadcast_to(mask.astype(bool), shape)
  if _concrete(mask) and not bool(jnp.any(mask)):
    raise ValueError(f"{name} selects no valid entry")
  return mask


def _pair(pred, gt, mask):
  pred, gt = _as_float(pred), _as_float(gt)
  if pred.ndim == 0 or pred.size == 0:
    raise ValueError(f"pred must be a non-empty array with at least one axis, got {pred.shape}")
  if gt.shape != pred.shape:
    raise ValueError(f"gt shape {gt.shape} must equal pred shape {pred.shape}")
  dt = jnp.promote_types(pred.dtype, gt.dtype)
  return pred.astype(dt), gt.astype(dt), _mask_arg(mask, pred.shape)


def _nax(ndim: int) -> int:
  """Number of trailing sample axes: 2 for ``(..., H, W)``, 1 for ``(N,)``."""
  return 2 if ndim >= 2 else 1


def _axes(nax: int) -> tuple[int, ...]:
  return tuple(range(-nax, 0))


def _bc(x, nax: int):
  return x[(...,) + (None,) * nax]


def _points_pair(src, dst, name_src: str = "src", name_dst: str = "dst"):
  src, dst = _as_float(src), _as_float(dst)
  if src.ndim < 2 or src.shape[-1] != 3 or src.shape[-2] == 0:
    raise ValueError(f"{name_src} must have shape (..., N, 3) with N >= 1, got {src.shape}")
  if dst.shape != src.shape:
    raise ValueError(f"{name_dst} shape {dst.shape} must equal {name_src} shape {src.shape}")
  dt = jnp.promote_types(src.dtype, dst.dtype)
  return src.astype(dt), dst.astype(dt)


# ------------------------------------------------------------------------------------------------
# scale and scale-shift (closed forms)


def masked_quantile(v: jax.Array, mask: jax.Array, q: float) -> jax.Array:
  """``torch.quantile(v[mask], q)`` (linear interpolation at ``q (n - 1)``) with static shapes:
  ``v`` and ``mask`` of one shape, reduced over all their elements."""
  v, mask = jnp.reshape(v, -1), jnp.reshape(mask, -1).astype(bool)
  n = jnp.sum(mask)
  srt = jnp.sort(jnp.where(mask, v, jnp.inf))
  pos = jnp.float32(q) * (jnp.maximum(n, 1) - 1).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  frac = pos - lo
  a, b = srt[lo], srt[hi]
  # torch.lerp's two-sided form, so that both ends are exact
  return jnp.where(frac < 0.5, a + frac * (b - a), b - (b - a) * (1 - frac))


def _masked_median(x, m, nax: int):
  """Median over the valid entries of the last ``nax`` axes (mean of the two middle values for
  an even count, as ``numpy.median``); returns ``(median, count)``, median 0 when empty."""
  lead = x.shape[:x.ndim - nax]
  x, m = x.reshape(lead + (-1,)), m.reshape(lead + (-1,))
  n = jnp.sum(m, -1)
  xs = jnp.sort(jnp.where(m, x, jnp.inf), -1)
  lo = jnp.maximum((n - 1) // 2, 0)
  take = lambda i: jnp.take_along_axis(xs, i[..., None], -1)[..., 0]
  med = 0.5 * (take(lo) + take(n // 2))
  return jnp.where(n > 0, med, 0.0).astype(x.dtype), n


def _median_scale(p, g, m, nax):
  mg, n = _masked_median(g, m, nax)
  mp, _ = _masked_median(p, m, nax)
  ok = (n > 0) & (mp != 0)
  return jnp.where(ok, mg / jnp.where(ok, mp, 1.0), 1.0)


def _lstsq_scale(p, g, m, nax):
  ax = _axes(nax)
  p, g = jnp.where(m, p, 0.0), jnp.where(m, g, 0.0)
  num, den = jnp.sum(p * g, ax), jnp.sum(p * p, ax)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)


def _scale_shift(p, g, m, nax):
  """Centred normal equations: ``s = cov(p, g) / var(p)``, ``t = mean(g) - s mean(p)``.

  Returns ``(s, t, ok)``; ``ok`` is False for an empty sample (-> s=1, t=0) or a constant ``p``
  (variance below ``(10 eps)^2 sum p^2``; -> s=1, t=mean(g)-mean(p)).
  """
  ax = _axes(nax)
  p, g = jnp.where(m, p, 0.0), jnp.where(m, g, 0.0)
  n = jnp.sum(m, ax).astype(p.dtype)
  nn = jnp.maximum(n, 1.0)
  pm, gm = jnp.sum(p, ax) / nn, jnp.sum(g, ax) / nn
  dp = jnp.where(m, p - _bc(pm, nax), 0.0)
  dg = jnp.where(m, g - _bc(gm, nax), 0.0)
  var, cov = jnp.sum(dp * dp, ax), jnp.sum(dp * dg, ax)
  tol = (10 * jnp.finfo(p.dtype).eps) ** 2 * jnp.sum(p * p, ax)
  ok = (var > tol) & (n > 0)
  s = jnp.where(ok, cov / jnp.where(ok, var, 1.0), 1.0)
  t = jnp.where(n > 0, gm - s * pm, 0.0)
  return s, t, ok


_median_scale_jit = jax.jit(_median_scale, static_argnums=3)
_lstsq_scale_jit = jax.jit(_lstsq_scale, static_argnums=3)
_scale_shift_jit = jax.jit(_scale_shift, static_argnums=3)


@jax.jit(static_argnames=("mode", "nax", "eps"))
def _align(p, g, m, mode: str, nax: int, eps: float):
  if mode == "none":
    return p
  if mode == "median":
    return _bc(_median_scale(p, g, m, nax), nax) * p
  if mode == "scale":
    return _bc(_lstsq_scale(p, g, m, nax), nax) * p
  if mode == "scale_shift":
    s, t, _ = _scale_shift(p, g, m, nax)
    return _bc(s, nax) * p + _bc(t, nax)
  if mode == "log_affine":
    lg = jnp.log1p(jnp.maximum(g, 0.0))
    s, t, _ = _scale_shift(p, lg, m & (g > 0), nax)
    return jnp.maximum(jnp.expm1(_bc(s, nax) * p + _bc(t, nax)), 0.0)
  inv_p = jnp.where(p > 0, 1.0 / jnp.where(p > 0, p, 1.0), 0.0)
  inv_g = jnp.where(g > 0, 1.0 / jnp.where(g > 0, g, 1.0), 0.0)
  s, t, _ = _scale_shift(inv_p, inv_g, m & (g > 0) & (p > 0), nax)
  return 1.0 / jnp.maximum(_bc(s, nax) * inv_p + _bc(t, nax), eps)


def median_scale(pred, gt, mask=None) -> jax.Array:
  """``s = median(gt) / median(pred)`` over valid entries; ``(..., H, W)`` or ``(N,)`` -> ``(...)``.

  Falls back to 1 for an empty sample or a zero median of ``pred``.
  """
  p, g, m = _pair(pred, gt, mask)
  return _median_scale_jit(p, g, m, _nax(p.ndim))


def lstsq_scale(pred, gt, mask=None) -> jax.Array:
  """``s = argmin_s sum m (s p - g)^2 = sum m p g / sum m p^2``; ``(..., H, W)`` -> ``(...)``."""
  p, g, m = _pair(pred, gt, mask)
  return _lstsq_scale_jit(p, g, m, _nax(p.ndim))


def lstsq_scale_shift(pred, gt, mask=None) -> tuple[jax.Array, jax.Array]:
  """``(s, t) = argmin sum m (s p + t - g)^2`` from the 2x2 normal equations (centred form).

  ``(..., H, W)`` -> ``(s, t)`` each ``(...)``. A constant ``pred`` (singular system) gives
  ``s = 1, t = mean(g) - mean(p)``; an empty sample gives ``s = 1, t = 0``.
  """
  p, g, m = _pair(pred, gt, mask)
  s, t, _ = _scale_shift_jit(p, g, m, _nax(p.ndim))
  return s, t


def align_depth(pred, gt, mask=None, mode: str = "none", *, eps: float = 1e-6) -> jax.Array:
  """Align ``pred`` to ``gt`` per sample (last two axes of ``(..., H, W)``) and return it.

  Modes: ``"none"`` (unchanged), ``"median"`` (:func:`median_scale`), ``"scale"``
  (:func:`lstsq_scale`), ``"scale_shift"`` (:func:`lstsq_scale_shift`), ``"disparity_affine"``:
  ``(s, t)`` fitted on ``1/pred`` vs ``1/gt`` over valid entries with ``gt > 0`` and ``pred > 0``,
  aligned depth ``1 / max(s / pred + t, eps)`` (``pred <= 0`` is taken as zero disparity);
  ``"log_affine"``: ``(s, t)`` fitted on ``pred`` vs ``log(1 + gt)`` over valid entries with
  ``gt > 0``, aligned depth ``max(exp(s pred + t) - 1, 0)`` (predictions affine in log-depth,
  such as PPD's).
  The aligned map covers every entry, masked or not.
  """
  if mode not in ALIGN_MODES:
    raise ValueError(f"mode must be one of {ALIGN_MODES}, got {mode!r}")
  p, g, m = _pair(pred, gt, mask)
  if mode == "disparity_affine":
    valid = m & (g > 0) & (p > 0)
    if _concrete(valid) and not bool(jnp.any(valid)):
      raise ValueError("mask selects no entry with gt > 0 and pred > 0 (mode='disparity_affine')")
  return _align(p, g, m, mode, _nax(p.ndim), float(eps))


# ------------------------------------------------------------------------------------------------
# weighted L1 scale (exact)


@jax.jit
def _wl1_scale(x, y, w, m):
  """Exact ``argmin_s sum w |s x - y|`` over the last axis: the lower weighted median of the
  ratios ``y / x`` with weights ``w |x|`` (terms with ``x = 0`` are constant and dropped)."""
  ax_ = jnp.abs(x)
  y = jnp.where(x < 0, -y, y)
  valid = m & (ax_ > 0) & (w > 0)
  r = jnp.where(valid, y / jnp.where(valid, ax_, 1.0), jnp.inf)
  c = jnp.where(valid, w * ax_, 0.0)
  order = jnp.argsort(r, -1)
  rs = jnp.take_along_axis(r, order, -1)
  cs = jnp.cumsum(jnp.take_along_axis(c, order, -1), -1)
  total = cs[..., -1:]
  k = jnp.argmax(2.0 * cs - total >= 0, -1)  # first ratio where the right derivative is >= 0
  s = jnp.take_along_axis(rs, k[..., None], -1)[..., 0]
  return jnp.where(total[..., 0] > 0, s, 1.0)


def weighted_l1_scale(pred, gt, weight, mask=None) -> jax.Array:
  """Exact ``s = argmin_s sum w |s p - g|`` (MoGe / Pi3 / DAGE ``align_points_scale``).

  The objective is convex piecewise linear in ``s``; its minimiser is the (lower) weighted median
  of ``g / p`` with weights ``w |p|``. Shapes:
  - scalars: ``pred, gt (..., N)``, ``weight, mask (..., N)`` (or a scalar weight) -> ``(...)``;
  - points: ``pred, gt (..., N, C)``, ``weight, mask (..., N)`` -> ``(...)``; every coordinate is
    a separate term ``w_n |s p_nc - g_nc|``.
  ``weight >= 0``; an all-zero weight or empty sample gives ``s = 1``.
  """
  p, g = _as_float(pred), _as_float(gt)
  if p.ndim == 0 or p.size == 0:
    raise ValueError(f"pred must be a non-empty array with at least one axis, got {p.shape}")
  if g.shape != p.shape:
    raise ValueError(f"gt shape {g.shape} must equal pred shape {p.shape}")
  w = _as_float(weight)
  if p.ndim >= 2 and w.ndim == p.ndim - 1:
    target, points = p.shape[:-1], True
  elif w.ndim in (0, p.ndim):
    target, points = p.shape, False
  else:
    raise ValueError(f"weight shape {w.shape} must match pred {p.shape} or pred[..., 0]")
  if not _broadcasts_to(w.shape, target):
    raise ValueError(f"weight shape {w.shape} does not broadcast to {tuple(target)}")
  m = _mask_arg(mask, target)
  dt = jnp.promote_types(jnp.promote_types(p.dtype, g.dtype), w.dtype)
  p, g, w = p.astype(dt), g.astype(dt), jnp.broadcast_to(w, target).astype(dt)
  if points:
    w = jnp.broadcast_to(w[..., None], p.shape)
    m = jnp.broadcast_to(m[..., None], p.shape)
    lead = p.shape[:-2] + (-1,)
    p, g, w, m = p.reshape(lead), g.reshape(lead), w.reshape(lead), m.reshape(lead)
  return _wl1_scale(p, g, w, m)


# ------------------------------------------------------------------------------------------------
# RANSAC scale-shift (DA3 teacher-label alignment)


def _sample_ranks(u, n, k: int):
  """``k`` distinct ranks from ``[0, n)`` given ``k`` uniforms ``u`` (Floyd's algorithm; ``n``
  may be traced, ``n >= k``)."""
  chosen = jnp.full((k,), -1, jnp.int32)
  for i in range(k):
    j = n - k + i
    pick = jnp.minimum(jnp.floor(u[i] * (j + 1)).astype(jnp.int32), j)
    chosen = chosen.at[i].set(jnp.where(jnp.any(chosen == pick), j, pick))
  return chosen


def _ransac_ss_single(p, g, m, key, iterations: int, k: int):
  size = p.shape[0]
  n = jnp.sum(m).astype(jnp.int32)
  rank_end = jnp.cumsum(m.astype(jnp.int32))
  p, g = jnp.where(m, p, 0.0), jnp.where(m, g, 0.0)
  nf = jnp.maximum(n, 1).astype(p.dtype)

  def body(carry, u):
    best_cnt, best_err, best_s, best_t, best_inl = carry
    ranks = _sample_ranks(u, n, k)
    idx = jnp.searchsorted(rank_end, ranks + 1, side="left", method="compare_all")
    idx = jnp.clip(idx, 0, size - 1)
    s, t, ok = _scale_shift(p[idx], g[idx], jnp.ones((k,), bool), 1)
    ok = ok & (s > 0) & (n >= k)
    r = s * p + t - g
    med, _ = _masked_median(r, m, 1)
    tau = jnp.sum(jnp.where(m, jnp.abs(r - med), 0.0)) / nf
    inl = m & (jnp.abs(r) <= tau)
    cnt = jnp.where(ok, jnp.sum(inl), -1).astype(jnp.int32)
    err_sum = jnp.sum(jnp.where(inl, jnp.abs(r), 0.0))
    err = jnp.where(cnt > 0, err_sum / jnp.maximum(cnt, 1), jnp.inf)
    better = (cnt > best_cnt) | ((cnt == best_cnt) & (err < best_err))
    new = (cnt, err, s, t, inl)
    carry = jax.tree.map(lambda a, b: jnp.where(better, a, b), new, carry)
    return carry, None

  init = (jnp.int32(-1), jnp.array(jnp.inf, p.dtype), jnp.ones((), p.dtype),
          jnp.zeros((), p.dtype), m)
  uniforms = jax.random.uniform(key, (iterations, k), p.dtype)
  (cnt, _, s_h, t_h, inl), _ = jax.lax.scan(body, init, uniforms)
  s_r, t_r, ok_r = _scale_shift(p, g, inl, 1)
  refit = (cnt >= 2) & ok_r & (s_r > 0)
  s_all, t_all, _ = _scale_shift(p, g, m, 1)
  none = cnt < 0
  s = jnp.where(refit, s_r, jnp.where(none, s_all, s_h))
  t = jnp.where(refit, t_r, jnp.where(none, t_all, t_h))
  r = s * p + t - g
  med, _ = _masked_median(r, m, 1)
  tau = jnp.sum(jnp.where(m, jnp.abs(r - med), 0.0)) / nf
  return s, t, m & (jnp.abs(r) <= tau)


@jax.jit(static_argnames=("iterations", "sample_size"))
def _ransac_ss(p, g, m, seed, iterations: int, sample_size: int):
  key = jax.random.PRNGKey(seed)
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(p.shape[0]))
  fn = lambda a, b, c, kk: _ransac_ss_single(a, b, c, kk, iterations, sample_size)
  return jax.vmap(fn)(p, g, m, keys)


def ransac_scale_shift(pred, gt, mask=None, *, seed: int = 0, iterations: int = 100,
                       sample_size: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
  """RANSAC least squares ``(s, t) = argmin_{s>0, t} sum m (s pred + t - gt)^2`` (DA3 §7.4).

  Per sample (last two axes of ``(..., H, W)``): each of ``iterations`` hypotheses is a
  least-squares fit on ``sample_size`` distinct valid entries (rejected if ``s <= 0`` or
  degenerate); with residuals ``r = s pred + t - gt`` its inlier threshold is the mean absolute
  deviation of ``r`` from its median over valid entries, inliers ``|r| <= threshold``. The
  hypothesis with most inliers wins (ties: smaller mean ``|r|`` over inliers), and ``(s, t)`` is
  refitted by least squares on its inliers (kept only if ``s > 0``). Random subsets come from
  ``jax.random`` keyed by ``seed`` (folded with the flat batch index). If no hypothesis is valid
  the plain least-squares fit on all valid entries is returned.

  Returns ``s, t (...)`` and ``inliers`` (shape of ``pred``, bool): the valid entries within the
  same rule's threshold of the returned ``(s, t)``. Cost ``O(iterations N log N)`` per sample (a
  median per hypothesis); subsample very large maps first.
  """
  if not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  if int(iterations) < 1:
    raise ValueError(f"iterations must be >= 1, got {iterations}")
  if int(sample_size) < 2:
    raise ValueError(f"sample_size must be >= 2, got {sample_size}")
  p, g, m = _pair(pred, gt, mask)
  nax = _nax(p.ndim)
  lead = p.shape[:p.ndim - nax]
  flat = (math.prod(lead), -1)
  key_seed = jnp.asarray(int(seed) % 2**32, jnp.uint32)
  s, t, inl = _ransac_ss(p.reshape(flat), g.reshape(flat), m.reshape(flat), key_seed,
                         int(iterations), int(sample_size))
  return s.reshape(lead), t.reshape(lead), inl.reshape(p.shape)


# ------------------------------------------------------------------------------------------------
# Sim(3): Umeyama and DA3-style RANSAC


def _det3(m):
  """Determinant of ``(..., 3, 3)`` by the triple product ``r0 . (r1 x r2)``."""
  return jnp.sum(m[..., 0, :] * jnp.cross(m[..., 1, :], m[..., 2, :]), -1)


@jax.jit(static_argnames=("with_scale",))
def _umeyama(src, dst, w, with_scale: bool):
  """Weighted Umeyama (1991) on ``(..., N, 3)``; returns ``(s, R, t, ok)``.

  ``mu = sum w x / sum w``; ``C = sum w (d - mu_d)(x - mu_x)^T / sum w = U D V^T``;
  ``S = diag(1, 1, sign(det U det V))``; ``R = U S V^T``; ``s = tr(D S) / var_x``;
  ``t = mu_d - s R mu_x``. ``ok`` is False for zero total weight (identity returned) or a
  covariance of rank < 2 (collinear points).
  """
  wsum = jnp.sum(w, -1)
  wn = w / jnp.where(wsum > 0, wsum, 1.0)[..., None]
  mu_s = jnp.einsum("...n,...nc->...c", wn, src, precision=_HP)
  mu_d = jnp.einsum("...n,...nc->...c", wn, dst, precision=_HP)
  xs, xd = src - mu_s[..., None, :], dst - mu_d[..., None, :]
  cov = jnp.einsum("...n,...ni,...nj->...ij", wn, xd, xs, precision=_HP)
  var = jnp.einsum("...n,...nc,...nc->...", wn, xs, xs, precision=_HP)
  u, d, vt = jnp.linalg.svd(cov)
  sgn = jnp.where(_det3(u) * _det3(vt) < 0, -1.0, 1.0).astype(src.dtype)
  diag = jnp.stack([jnp.ones_like(sgn), jnp.ones_like(sgn), sgn], -1)
  rot = jnp.matmul(u * diag[..., None, :], vt, precision=_HP)
  if with_scale:
    tr = d[..., 0] + d[..., 1] + sgn * d[..., 2]
    s = jnp.where(var > 0, tr / jnp.where(var > 0, var, 1.0), 1.0)
  else:
    s = jnp.ones_like(var)
  t = mu_d - s[..., None] * jnp.einsum("...ij,...j->...i", rot, mu_s, precision=_HP)
  ok = (wsum > 0) & (d[..., 1] > 100 * jnp.finfo(src.dtype).eps * d[..., 0])
  empty = wsum <= 0
  eye = jnp.broadcast_to(jnp.eye(3, dtype=src.dtype), rot.shape)
  rot = jnp.where(empty[..., None, None], eye, rot)
  s = jnp.where(empty, 1.0, s)
  t = jnp.where(empty[..., None], 0.0, t)
  return s, rot, t, ok


def apply_sim3(s, R, t, points) -> jax.Array:
  """``s R x + t`` for ``points (..., N, 3)``, ``s (...)``, ``R (..., 3, 3)``, ``t (..., 3)``."""
  s, R, t, points = _as_float(s), _as_float(R), _as_float(t), _as_float(points)
  if points.ndim < 2 or points.shape[-1] != 3:
    raise ValueError(f"points must have shape (..., N, 3), got {points.shape}")
  if R.shape[-2:] != (3, 3):
    raise ValueError(f"R must have shape (..., 3, 3), got {R.shape}")
  if t.shape[-1:] != (3,):
    raise ValueError(f"t must have shape (..., 3), got {t.shape}")
  return _apply_sim3(s, R, t, points)


@jax.jit
def _apply_sim3(s, R, t, points):
  rotated = jnp.matmul(points, jnp.swapaxes(R, -1, -2), precision=_HP)
  return s[..., None, None] * rotated + t[..., None, :]


def umeyama(src, dst, with_scale: bool = True, weights=None):
  """Least-squares Sim(3) ``dst ~ s R src + t`` (Umeyama 1991), optionally weighted.

  ``src, dst (..., N, 3)``, ``weights (..., N)`` (``>= 0``; 0/1 works as a mask) -> ``s (...)``,
  ``R (..., 3, 3)`` proper rotation (reflection fixed by the sign of ``det U det V``),
  ``t (..., 3)``. ``with_scale=False`` gives ``s = 1`` (rigid fit). Jittable (``with_scale``
  static).
  """
  src, dst = _points_pair(src, dst)
  if weights is None:
    w = jnp.ones(src.shape[:-1], src.dtype)
  else:
    w = _as_float(weights)
    if not _broadcasts_to(w.shape, src.shape[:-1]):
      raise ValueError(f"weights shape {w.shape} does not broadcast to {src.shape[:-1]}")
    w = jnp.broadcast_to(w, src.shape[:-1]).astype(src.dtype)
    if _concrete(w) and not bool(jnp.any(w > 0)):
      raise ValueError("weights has no positive entry")
  s, rot, t, _ = _umeyama(src, dst, w, bool(with_scale))
  return s, rot, t


def _ransac_umeyama_single(src, dst, subsets, with_scale: bool, threshold):
  n, it = src.shape[0], subsets.shape[0]
  # row 0: pre-alignment on all points; rows 1..: one hypothesis per subset
  w = jnp.zeros((it, n), src.dtype).at[jnp.arange(it)[:, None], subsets].set(1.0)
  w = jnp.concatenate([jnp.ones((1, n), src.dtype), w], 0)
  s_a, r_a, t_a, ok_a = jax.vmap(lambda wi: _umeyama(src, dst, wi, with_scale))(w)
  moved = _apply_sim3(s_a, r_a, t_a, src[None])  # (1 + it, N, 3)
  if threshold is None:  # median over src of the distance to the nearest dst after pre-alignment
    dist = jnp.linalg.norm(moved[0][:, None, :] - dst[None, :, :], axis=-1)
    threshold = jnp.median(jnp.min(dist, 1))
  errs = jnp.linalg.norm(moved[1:] - dst[None], axis=-1)
  inl = errs <= threshold
  cnt = jnp.where(ok_a[1:], jnp.sum(inl, -1), -1)
  mean_err = jnp.where(cnt > 0, jnp.sum(jnp.where(inl, errs, 0.0), -1) / jnp.maximum(cnt, 1),
                       jnp.inf)
  top = cnt == jnp.max(cnt)
  err_top = jnp.where(top, mean_err, jnp.inf)
  best = jnp.argmax(top & (err_top == jnp.min(err_top)))  # first of the lexicographic best
  best_cnt, best_inl = cnt[best], inl[best]
  s_r, r_r, t_r, ok_r = _umeyama(src, dst, best_inl.astype(src.dtype), with_scale)
  refit = (best_cnt >= 3) & ok_r
  pick = jnp.where(best_cnt < 0, 0, best + 1)  # no valid hypothesis: keep the pre-alignment
  s = jnp.where(refit, s_r, s_a[pick])
  rot = jnp.where(refit, r_r, r_a[pick])
  t = jnp.where(refit, t_r, t_a[pick])
  return s, rot, t, jnp.linalg.norm(_apply_sim3(s, rot, t, src) - dst, axis=-1) <= threshold


@jax.jit(static_argnames=("with_scale",))
def _ransac_umeyama(src, dst, subsets, threshold, with_scale: bool):
  fn = lambda a, b: _ransac_umeyama_single(a, b, subsets, with_scale, threshold)
  return jax.vmap(fn)(src, dst)


def ransac_umeyama(src, dst, *, iterations: int = 10, seed: int = 42, with_scale: bool = True,
                   sample_size: int | None = None, inlier_threshold: float | None = None):
  """DA3's RANSAC Umeyama (``utils/pose_align.py::_ransac_align_sim3``), ``dst ~ s R src + t``.

  1. Pre-align with Umeyama on all points; the inlier threshold (unless given) is the median over
     ``src`` points of the distance from the pre-aligned point to its nearest ``dst`` point.
  2. ``iterations`` subsets of ``sample_size`` (default ``max(3, (N + 1) // 2)``; clamped to
     ``[3, N]``) distinct indices drawn exactly as DA3 does, ``numpy.random.default_rng(seed)
     .choice(arange(N), size, replace=False)`` per iteration, so subsets match DA3 for the same
     seed (DA3's benchmark uses 42). Degenerate (collinear) subsets are skipped.
  3. Inliers: ``|s R src_i + t - dst_i| <= threshold``; keep the most inliers (ties: smaller mean
     inlier error, then the earlier iteration); refit on the inliers if there are >= 3.
  DA3's API only calls this when ``N >= 10``; here it always runs.

  ``src, dst (..., N, 3)`` with ``N >= 3`` -> ``s (...)``, ``R (..., 3, 3)``, ``t (..., 3)``,
  ``inliers (..., N)`` (points within the threshold of the returned Sim(3)). Memory ``O(N^2)``.
  """
  src, dst = _points_pair(src, dst)
  n = src.shape[-2]
  if n < 3:
    raise ValueError(f"src needs at least 3 points, got shape {src.shape}")
  if int(iterations) < 1:
    raise ValueError(f"iterations must be >= 1, got {iterations}")
  if not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  sub = max(3, (n + 1) // 2) if sample_size is None else max(3, min(int(sample_size), n))
  rng = np.random.default_rng(int(seed))
  subsets = np.stack([rng.choice(np.arange(n), size=sub, replace=False)
                      for _ in range(int(iterations))])
  thr = None if inlier_threshold is None else jnp.asarray(inlier_threshold, src.dtype)
  lead = src.shape[:-2]
  flat = (math.prod(lead), n, 3)
  s, rot, t, inl = _ransac_umeyama(src.reshape(flat), dst.reshape(flat), jnp.asarray(subsets),
                                   thr, bool(with_scale))
  return (s.reshape(lead), rot.reshape(lead + (3, 3)), t.reshape(lead + (3,)),
          inl.reshape(lead + (n,)))


# ------------------------------------------------------------------------------------------------
# MoGe focal / shift recovery


def normalized_view_plane_uv(width: int, height: int,
                             aspect_ratio: float | None = None) -> np.ndarray:
  """MoGe's ``(H, W, 2)`` pixel-centre UV: ``u`` spans ``±(a/sqrt(1+a^2))(W-1)/W``, ``v`` spans
  ``±(1/sqrt(1+a^2))(H-1)/H`` with ``a`` = ``aspect_ratio`` (default ``W/H`` of this grid, so
  that focal is relative to half the diagonal). MoGe-2 heads pass the *image* aspect ratio for
  every pyramid level."""
  a = width / height if aspect_ratio is None else float(aspect_ratio)
  span_u, span_v = a / math.sqrt(1 + a * a), 1 / math.sqrt(1 + a * a)
  u = (2.0 * (np.arange(width) + 0.5) / width - 1.0) * span_u
  v = (2.0 * (np.arange(height) + 0.5) / height - 1.0) * span_v
  uu, vv = np.meshgrid(u, v, indexing="xy")
  return np.stack([uu, vv], -1)


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
  """PyTorch ``interpolate(mode='nearest')`` source indices ``floor(i * in / out)`` (float32)."""
  return legacy_nearest_index(size_in, size_out)


def _focal_shift_single(pts, m, uv, focal, solve_focal: bool, iterations: int):
  """LM over the scalar shift of ``min ||f xy / (z + shift) - uv||^2``; with ``solve_focal`` the
  focal is profiled out, ``f = <p, uv> / <p, p>`` with ``p = xy / (z + shift)`` (MoGe)."""
  dt = pts.dtype
  xy, z = pts[:, :2], pts[:, 2]
  mf = m.astype(dt)[:, None]
  tiny = jnp.finfo(dt).tiny

  def project(shift):
    return jnp.where(m[:, None], xy / (z + shift)[:, None], 0.0)

  def focal_of(proj):
    if not solve_focal:
      return focal
    return jnp.sum(mf * proj * uv) / jnp.maximum(jnp.sum(mf * proj * proj), tiny)

  def resid(shift):
    proj = project(shift)
    return mf * (focal_of(proj) * proj - uv)

  def cost(shift):
    return 0.5 * jnp.sum(resid(shift) ** 2)

  def body(carry, _):
    shift, lam, c = carry
    r, jac = jax.jvp(resid, (shift,), (jnp.ones((), dt),))
    grad, hess = jnp.sum(jac * r), jnp.sum(jac * jac)
    new = shift - grad / jnp.maximum(hess * (1.0 + lam), tiny)
    c_new = cost(new)
    acc = jnp.isfinite(c_new) & (c_new <= c)
    return (jnp.where(acc, new, shift), jnp.where(acc, lam * 0.1, lam * 10.0),
            jnp.where(acc, c_new, c)), None

  zero = jnp.zeros((), dt)
  (shift, _, _), _ = jax.lax.scan(body, (zero, jnp.asarray(1e-3, dt), cost(zero)), None,
                                  length=iterations)
  f = focal_of(project(shift))
  enough = jnp.sum(m) >= 2
  return jnp.where(enough, f, 1.0 if solve_focal else focal), jnp.where(enough, shift, 0.0)


@jax.jit(static_argnames=("solve_focal", "iterations"))
def _focal_shift(pts, m, uv, focal, solve_focal: bool, iterations: int):
  fn = lambda a, b, f: _focal_shift_single(a, b, uv, f, solve_focal, iterations)
  return jax.vmap(fn)(pts, m, focal)


def recover_focal_shift(points, mask=None, focal=None, downsample=64, *, iterations: int = 100):
  """MoGe ``recover_focal_shift``: focal and z-shift of an affine point map ``(..., H, W, 3)``.

  Solves ``min_{f, shift} sum ||f xy / (z + shift) - uv||^2`` over valid pixels of the map
  nearest-downsampled (PyTorch legacy ``nearest``, ``src = floor(dst in / out)``) to
  ``downsample`` (int ``S`` -> ``(S, S)``, ``(h, w)``, or ``None`` for full resolution), with MoGe's
  ``uv`` (:func:`normalized_view_plane_uv`), so ``focal`` is relative to **half the image
  diagonal** (``fx_px = focal * diag / 2``) and camera-space depth is ``z + shift``. ``f`` is in
  closed form per shift; the shift is found by Levenberg–Marquardt on device from ``shift = 0``
  (``iterations`` steps) instead of MoGe's host scipy LM. With ``focal`` (``(...)``) given, only
  the shift is solved and ``focal`` is returned as is. Fewer than 2 valid pixels give
  ``focal = 1`` (or the given one), ``shift = 0``. Returns ``(focal, shift)``, each ``(...)``.
  Assumes a centred principal point, no distortion, square pixels.
  """
  pts = _as_float(points)
  if pts.ndim < 3 or pts.shape[-1] != 3 or pts.shape[-3] == 0 or pts.shape[-2] == 0:
    raise ValueError(f"points must have shape (..., H, W, 3), got {pts.shape}")
  h_in, w_in = pts.shape[-3], pts.shape[-2]
  if downsample is None:
    h_lr, w_lr = h_in, w_in
  else:
    size = (downsample, downsample) if np.ndim(downsample) == 0 else tuple(downsample)
    if len(size) != 2 or any(int(v) != v or int(v) < 1 for v in size):
      raise ValueError(f"downsample must be a positive int, (h, w) or None, got {downsample!r}")
    h_lr, w_lr = int(size[0]), int(size[1])
  m = _mask_arg(mask, pts.shape[:-1])
  lead = pts.shape[:-3]
  if focal is None:
    f = jnp.ones(lead, pts.dtype)
  else:
    f = _as_float(focal)
    if not _broadcasts_to(f.shape, lead):
      raise ValueError(f"focal shape {f.shape} does not broadcast to {lead}")
    f = jnp.broadcast_to(f, lead).astype(pts.dtype)
  iy, ix = _nearest_index(h_in, h_lr), _nearest_index(w_in, w_lr)
  uv = normalized_view_plane_uv(w_in, h_in)[iy][:, ix].reshape(-1, 2)
  pts_lr = pts[..., iy[:, None], ix[None, :], :]
  m_lr = m[..., iy[:, None], ix[None, :]]
  b = math.prod(lead)
  f_out, shift = _focal_shift(pts_lr.reshape(b, -1, 3), m_lr.reshape(b, -1),
                              jnp.asarray(uv, pts.dtype), f.reshape(b), focal is None,
                              int(iterations))
  return f_out.reshape(lead), shift.reshape(lead)


def intrinsics_from_points(points, mask=None, *, iterations: int = 100) -> jax.Array:
  """Normalised intrinsics ``(..., 3, 3)`` of camera-frame point maps ``(..., H, W, 3)``:
  ``fx / W``, ``fy / H`` from :func:`recover_focal_shift` (focal relative to half the image
  diagonal, so ``fx = focal / 2 * sqrt(1 + a^2) / a``, ``fy = focal / 2 * sqrt(1 + a^2)`` with
  ``a = W / H``) and the principal point at the image centre ``(0.5, 0.5)`` (the official
  DAGE / MoGe ``infer()`` convention)."""
  pts = _as_float(points)
  h, w = pts.shape[-3], pts.shape[-2]
  a = w / h
  focal, _ = recover_focal_shift(pts, mask, iterations=iterations)
  fx = focal / 2 * (1 + a * a) ** 0.5 / a
  fy = focal / 2 * (1 + a * a) ** 0.5
  k = jnp.zeros(focal.shape + (3, 3), jnp.float32)
  k = k.at[..., 0, 0].set(fx).at[..., 1, 1].set(fy).at[..., 0, 2].set(0.5).at[..., 1, 2].set(0.5)
  return k.at[..., 2, 2].set(1.0)
