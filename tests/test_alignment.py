"""Tests for ``geojax.geometry.alignment`` against float64 NumPy / SciPy references and closed
forms.

Shapes are reused across tests on purpose: every new shape is a new XLA compilation.
"""

from __future__ import annotations

import sys
import types

import jax
import numpy as np
import pytest
from scipy.optimize import least_squares, minimize_scalar
from scipy.spatial.transform import Rotation

from geojax.geometry import alignment as al

B, H, W = 2, 12, 16


def _rng(seed=0):
  return np.random.default_rng(seed)


def _depth_pair(seed=0, noise=0.05):
  rng = _rng(seed)
  pred = rng.uniform(1.0, 10.0, (B, H, W))
  s = np.array([2.5, 0.4])
  t = np.array([0.3, -0.2])
  gt = s[:, None, None] * pred + t[:, None, None] + noise * rng.normal(size=pred.shape)
  mask = rng.random(pred.shape) < 0.7
  return pred, gt, mask


def _np_lstsq(p, g, m, shift=True):
  """Per-sample float64 least squares with numpy.linalg.lstsq."""
  out = []
  for pi, gi, mi in zip(p, g, m):
    cols = [pi[mi]] + ([np.ones(mi.sum())] if shift else [])
    out.append(np.linalg.lstsq(np.stack(cols, 1), gi[mi], rcond=None)[0])
  return np.array(out)


def np_umeyama(x, y, with_scale=True, w=None):
  """Float64 reference Umeyama: y ~ s R x + t."""
  w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
  w = w / w.sum()
  mx, my = w @ x, w @ y
  xc, yc = x - mx, y - my
  u, d, vt = np.linalg.svd((yc * w[:, None]).T @ xc)
  sfix = np.eye(3)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    sfix[2, 2] = -1
  r = u @ sfix @ vt
  s = np.trace(np.diag(d) @ sfix) / (w @ (xc ** 2).sum(1)) if with_scale else 1.0
  return s, r, my - s * r @ mx


def _random_sim3(seed):
  rng = _rng(seed)
  rot = Rotation.random(random_state=seed).as_matrix()
  return rng.uniform(0.5, 3.0), rot, rng.normal(size=3) * 3


# ------------------------------------------------------------------------------------------------
# depth scale / shift


def test_median_and_lstsq_scale_recover_known_scale_and_honour_mask():
  pred, _, mask = _depth_pair()
  s_true = np.array([2.5, 0.4])
  gt = s_true[:, None, None] * pred
  gt_bad = np.where(mask, gt, np.nan)  # garbage outside the mask must not leak
  pred_bad = np.where(mask, pred, np.inf)
  np.testing.assert_allclose(al.median_scale(pred, gt), s_true, rtol=1e-6)
  np.testing.assert_allclose(al.lstsq_scale(pred, gt), s_true, rtol=1e-6)
  np.testing.assert_allclose(al.median_scale(pred_bad, gt_bad, mask), s_true, rtol=1e-6)
  np.testing.assert_allclose(al.lstsq_scale(pred_bad, gt_bad, mask), s_true, rtol=1e-6)


def test_median_and_lstsq_scale_match_numpy():
  pred, gt, mask = _depth_pair(1)
  med = [np.median(g[m]) / np.median(p[m]) for p, g, m in zip(pred, gt, mask)]
  np.testing.assert_allclose(al.median_scale(pred, gt, mask), med, rtol=1e-5)
  ref = _np_lstsq(pred, gt, mask, shift=False)[:, 0]
  np.testing.assert_allclose(al.lstsq_scale(pred, gt, mask), ref, rtol=1e-5)


def test_lstsq_scale_shift_matches_numpy_lstsq():
  pred, gt, mask = _depth_pair(2)
  s, t = al.lstsq_scale_shift(pred, gt, mask)
  ref = _np_lstsq(pred, gt, mask)
  np.testing.assert_allclose(s, ref[:, 0], rtol=1e-5)
  np.testing.assert_allclose(t, ref[:, 1], rtol=1e-4, atol=1e-4)
  # 1-D input is a single sample
  s1, t1 = al.lstsq_scale_shift(pred[0].ravel(), gt[0].ravel(), mask[0].ravel())
  np.testing.assert_allclose([s1, t1], ref[0], rtol=1e-4, atol=1e-4)


def test_lstsq_scale_shift_degenerate_pred():
  g = _rng(3).uniform(1, 2, (H, W))
  s, t = al.lstsq_scale_shift(np.full((H, W), 3.0), g)
  assert float(s) == 1.0
  np.testing.assert_allclose(t, g.mean() - 3.0, rtol=1e-5)


def test_align_depth_modes_match_numpy():
  pred, gt, mask = _depth_pair(4)
  np.testing.assert_allclose(al.align_depth(pred, gt, mask), pred, rtol=1e-6)
  for mode, ref_scale in (("median", [np.median(g[m]) / np.median(p[m])
                                       for p, g, m in zip(pred, gt, mask)]),
                          ("scale", _np_lstsq(pred, gt, mask, shift=False)[:, 0])):
    out = al.align_depth(pred, gt, mask, mode=mode)
    np.testing.assert_allclose(out, np.asarray(ref_scale)[:, None, None] * pred, rtol=1e-5)
  st = _np_lstsq(pred, gt, mask)
  out = al.align_depth(pred, gt, mask, mode="scale_shift")
  np.testing.assert_allclose(out, st[:, :1, None] * pred + st[:, 1:, None], rtol=1e-4, atol=1e-4)


def test_align_depth_disparity_affine():
  pred, _, mask = _depth_pair(5)
  rng = _rng(5)
  gt = 1.0 / (0.7 / pred + 0.05 + 0.002 * rng.normal(size=pred.shape))
  gt[:, 0, :3] = 0.0  # invalid GT must be skipped even inside the mask
  valid = mask & (gt > 0)
  st = _np_lstsq(1.0 / pred, np.where(gt > 0, 1.0 / np.where(gt > 0, gt, 1), 0), valid)
  ref = 1.0 / np.maximum(st[:, :1, None] / pred + st[:, 1:, None], 1e-6)
  out = al.align_depth(pred, gt, mask, mode="disparity_affine")
  np.testing.assert_allclose(out, ref, rtol=1e-4)
  exact = 1.0 / (0.7 / pred + 0.05)
  np.testing.assert_allclose(al.align_depth(pred, exact, mode="disparity_affine"), exact, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# weighted L1 scale


def _l1_objective(s, p, g, w):
  return np.sum(w * np.abs(s * p - g))


def test_weighted_l1_scale_is_exact_minimiser():
  rng = _rng(6)
  p = rng.normal(size=(3, 40))  # signs mixed on purpose
  g = 1.7 * p + 0.3 * rng.standard_cauchy(size=p.shape)
  w = rng.uniform(0.1, 2.0, p.shape)
  m = rng.random(p.shape) < 0.8
  s = np.asarray(al.weighted_l1_scale(p, g, w, m), np.float64)
  for i in range(3):
    pi, gi, wi = p[i][m[i]], g[i][m[i]], w[i][m[i]]
    cands = gi / pi  # the piecewise-linear convex objective is minimal at a breakpoint
    best = min(_l1_objective(c, pi, gi, wi) for c in cands)
    res = minimize_scalar(lambda v: _l1_objective(v, pi, gi, wi), bounds=(-10, 10),
                          method="bounded", options={"xatol": 1e-10})
    ours = _l1_objective(s[i], pi, gi, wi)
    np.testing.assert_allclose(ours, best, rtol=1e-6)
    assert ours <= res.fun * (1 + 1e-6)
    grid = np.linspace(s[i] - 0.5, s[i] + 0.5, 20001)
    grid_vals = np.abs(grid[:, None] * pi - gi) @ wi
    assert ours <= grid_vals.min() * (1 + 1e-6)


def test_weighted_l1_scale_points_known_scale_with_outliers():
  rng = _rng(7)
  pts = rng.normal(size=(B, 50, 3)) + np.array([0, 0, 4.0])
  gt = 0.8 * pts
  gt[:, :10] += rng.normal(size=(B, 10, 3)) * 5  # 20 % outliers: L1 ignores them
  w = rng.uniform(0.5, 1.0, (B, 50))
  np.testing.assert_allclose(al.weighted_l1_scale(pts, gt, w), [0.8, 0.8], rtol=1e-6)
  # per-coordinate terms: same result as flattening with repeated weights
  flat = al.weighted_l1_scale(pts.reshape(B, -1), gt.reshape(B, -1), np.repeat(w, 3, -1))
  np.testing.assert_allclose(al.weighted_l1_scale(pts, gt, w), flat, rtol=1e-7)


# ------------------------------------------------------------------------------------------------
# RANSAC scale-shift


def _outlier_depth(seed):
  rng = _rng(seed)
  pred = rng.uniform(1.0, 10.0, (B, H, W))
  gt = 2.5 * pred + 0.3
  out = rng.random(pred.shape) < 0.3
  gt = np.where(out, gt + rng.choice([-1.0, 1.0], pred.shape) * rng.uniform(5, 20, pred.shape), gt)
  return pred, gt, out


def test_ransac_scale_shift_recovers_with_outliers_and_is_deterministic():
  pred, gt, out = _outlier_depth(8)
  s, t, inl = al.ransac_scale_shift(pred, gt, seed=3)
  np.testing.assert_allclose(s, [2.5, 2.5], rtol=1e-5)
  np.testing.assert_allclose(t, [0.3, 0.3], atol=1e-5)
  np.testing.assert_array_equal(inl, ~out)
  s2, t2, inl2 = al.ransac_scale_shift(pred, gt, seed=3)
  np.testing.assert_array_equal(s, s2)
  np.testing.assert_array_equal(t, t2)
  np.testing.assert_array_equal(inl, inl2)
  # plain least squares is pulled away by the outliers
  assert abs(float(al.lstsq_scale_shift(pred, gt)[1][0]) - 0.3) > 1e-2


def test_ransac_scale_shift_honours_mask():
  pred, gt, out = _outlier_depth(9)
  mask = _rng(9).random(pred.shape) < 0.8
  s, t, inl = al.ransac_scale_shift(pred, np.where(mask, gt, np.nan), mask, seed=11)
  np.testing.assert_allclose(s, [2.5, 2.5], rtol=1e-5)
  np.testing.assert_allclose(t, [0.3, 0.3], atol=1e-5)
  np.testing.assert_array_equal(inl, ~out & mask)


# ------------------------------------------------------------------------------------------------
# Umeyama


def test_umeyama_recovers_sim3_and_matches_numpy():
  rng = _rng(10)
  src = rng.normal(size=(30, 3)) * 2
  for seed, with_scale in ((0, True), (1, False)):
    s, r, t = _random_sim3(seed)
    s = s if with_scale else 1.0
    dst = s * src @ r.T + t
    s_e, r_e, t_e = al.umeyama(src, dst, with_scale=with_scale)
    np.testing.assert_allclose(s_e, s, rtol=1e-5)
    np.testing.assert_allclose(r_e, r, atol=1e-5)
    np.testing.assert_allclose(t_e, t, atol=1e-5)
    noisy = dst + 0.05 * rng.normal(size=dst.shape)
    ref = np_umeyama(src, noisy, with_scale)
    for a, b in zip(al.umeyama(src, noisy, with_scale=with_scale), ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_umeyama_reflection_prone_data():
  rng = _rng(11)
  s, r, t = _random_sim3(2)
  planar = np.concatenate([rng.normal(size=(30, 2)), np.zeros((30, 1))], 1)  # rank-2 covariance
  s_e, r_e, t_e = al.umeyama(planar, s * planar @ r.T + t)
  np.testing.assert_allclose(s_e, s, rtol=1e-5)
  np.testing.assert_allclose(r_e, r, atol=1e-5)
  np.testing.assert_allclose(t_e, t, atol=1e-5)
  # a mirrored target: the best orthogonal map is a reflection; a proper rotation must come out
  src = rng.normal(size=(30, 3))
  mirrored = src * np.array([1.0, 1.0, -1.0]) + 0.01 * rng.normal(size=src.shape)
  s_e, r_e, t_e = al.umeyama(src, mirrored)
  np.testing.assert_allclose(np.linalg.det(np.asarray(r_e, np.float64)), 1.0, atol=1e-5)
  for a, b in zip((s_e, r_e, t_e), np_umeyama(src, mirrored)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_umeyama_weights_batch_jit_vmap():
  rng = _rng(12)
  src = rng.normal(size=(B, 30, 3))
  dst = np.stack([_random_sim3(k)[0] * x @ _random_sim3(k)[1].T + _random_sim3(k)[2]
                  for k, x in enumerate(src)])
  dst[:, :5] += 10.0  # weight 0 hides these
  w = np.ones((B, 30))
  w[:, :5] = 0.0
  s_e, r_e, t_e = al.umeyama(src, dst, weights=w)
  for k in range(B):
    s, r, t = _random_sim3(k)
    np.testing.assert_allclose(s_e[k], s, rtol=1e-5)
    np.testing.assert_allclose(r_e[k], r, atol=1e-5)
    np.testing.assert_allclose(t_e[k], t, atol=1e-5)
  jitted = jax.jit(lambda a, b, c: al.umeyama(a, b, True, c))(src, dst, w)
  mapped = jax.vmap(lambda a, b, c: al.umeyama(a, b, weights=c))(src, dst, w)
  for a, b, c in zip((s_e, r_e, t_e), jitted, mapped):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-6)
  back = al.apply_sim3(s_e, r_e, t_e, src)
  np.testing.assert_allclose(np.asarray(back)[:, 5:], dst[:, 5:], atol=1e-5)


def test_lstsq_scale_shift_jit_vmap_and_traced_empty_mask():
  pred, gt, mask = _depth_pair(13)
  s, t = al.lstsq_scale_shift(pred, gt, mask)
  sj, tj = jax.jit(al.lstsq_scale_shift)(pred, gt, mask)
  sv, tv = jax.vmap(al.lstsq_scale_shift)(pred, gt, mask)
  np.testing.assert_allclose(sj, s, rtol=1e-6)
  np.testing.assert_allclose(tv, t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sv, s, rtol=1e-6)
  np.testing.assert_allclose(tj, t, rtol=1e-6, atol=1e-6)
  # under jit an empty sample cannot raise: it returns the fallback s = 1, t = 0
  se, te = jax.jit(al.lstsq_scale_shift)(pred, gt, np.zeros_like(mask))
  np.testing.assert_array_equal(se, [1.0, 1.0])
  np.testing.assert_array_equal(te, [0.0, 0.0])


# ------------------------------------------------------------------------------------------------
# RANSAC Umeyama


def _outlier_cloud(seed, n=40):
  rng = _rng(seed)
  s, r, t = _random_sim3(seed)
  src = rng.normal(size=(n, 3)) * 2
  dst = s * src @ r.T + t
  out = np.zeros(n, bool)
  out[rng.permutation(n)[:int(0.3 * n)]] = True
  dst[out] += rng.normal(size=(out.sum(), 3)) * 10
  return src, dst, out, (s, r, t)


def test_ransac_umeyama_recovers_with_outliers():
  src, dst, out, (s, r, t) = _outlier_cloud(14)
  s_e, r_e, t_e, inl = al.ransac_umeyama(src, dst)
  np.testing.assert_allclose(s_e, s, rtol=1e-5)
  np.testing.assert_allclose(r_e, r, atol=1e-5)
  np.testing.assert_allclose(t_e, t, atol=1e-5)
  np.testing.assert_array_equal(inl, ~out)
  assert np.abs(np_umeyama(src, dst)[2] - t).max() > 1e-2  # the plain fit is corrupted


def _da3_pose_align(monkeypatch):
  """The official DA3 ``pose_align`` module with ``evo.PosePath3D`` replaced by a float64 stub."""
  if "evo.core.trajectory" not in sys.modules:
    for name in ("evo", "evo.core", "evo.core.trajectory"):
      monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["evo.core.trajectory"].PosePath3D = object
  pose_align = pytest.importorskip("depth_anything_3.utils.pose_align")

  class PosePath3D:  # evo semantics: align self onto ref, return (r, t, s), raise if degenerate
    def __init__(self, poses_se3):
      self.poses_se3 = [np.array(p, np.float64) for p in poses_se3]

    def align(self, ref, correct_scale=True):
      x = np.stack(self.poses_se3)[:, :3, 3]
      y = np.stack(ref.poses_se3)[:, :3, 3]
      cov = (y - y.mean(0)).T @ (x - x.mean(0)) / len(x)
      if np.count_nonzero(np.linalg.svd(cov)[1] > np.finfo(float).eps) < 2:
        raise ValueError("degenerate covariance rank")
      s, r, t = np_umeyama(x, y, correct_scale)
      for p in self.poses_se3:
        p[:3, :3] = r @ p[:3, :3]
        p[:3, 3] = s * r @ p[:3, 3] + t
      return r, t, s

  monkeypatch.setattr(pose_align, "PosePath3D", PosePath3D)
  return pose_align


def test_ransac_umeyama_matches_official_da3(monkeypatch):
  pose_align = _da3_pose_align(monkeypatch)
  rng = _rng(15)
  for seed, (src, dst, _, _) in ((42, _outlier_cloud(15)), (7, _outlier_cloud(16))):
    dst = dst + 0.02 * rng.normal(size=dst.shape)  # noisy inliers: threshold matters
    pose = lambda c: np.concatenate([np.broadcast_to(np.eye(3), (len(c), 3, 3)), c[:, :, None]],
                                    -1)
    to44 = lambda a: np.concatenate([a, np.broadcast_to([[[0, 0, 0, 1.0]]], (len(a), 1, 4))], 1)
    r_ref, t_ref, s_ref = pose_align._ransac_align_sim3(to44(pose(dst)), to44(pose(src)),
                                                        max_iters=10, random_state=seed)
    s_e, r_e, t_e, _ = al.ransac_umeyama(src, dst, seed=seed)
    np.testing.assert_allclose(s_e, s_ref, rtol=1e-5)
    np.testing.assert_allclose(r_e, r_ref, atol=1e-5)
    np.testing.assert_allclose(t_e, t_ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# MoGe focal / shift


def _moge_uv(width, height):
  """MoGe ``normalized_view_plane_uv`` written from its definition with linspace."""
  aspect = width / height
  span_x, span_y = aspect / (1 + aspect ** 2) ** 0.5, 1 / (1 + aspect ** 2) ** 0.5
  u = np.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width)
  v = np.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height)
  return np.stack(np.meshgrid(u, v, indexing="xy"), -1)


def _synthetic_points(focal, shift, hw=(48, 80), noise=0.0, seed=0):
  h, w = hw
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  z = 2.0 + np.sin(3 * xx) + 0.8 * np.cos(2 * yy) + xx * yy
  pts = np.concatenate([_moge_uv(w, h) * z[..., None] / focal, z[..., None]], -1)
  pts = pts + noise * _rng(seed).normal(size=pts.shape)
  pts[..., 2] -= shift
  return pts


def _scipy_focal_shift(points, mask, size, focal=None):
  """MoGe's torch path (nearest downsample) with a tightly converged float64 scipy LM."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  h, w = points.shape[:2]
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float64))
  pts = F.interpolate(t(points).permute(2, 0, 1)[None], size, mode="nearest")[0].permute(1, 2, 0)
  uv = F.interpolate(t(_moge_uv(w, h)).permute(2, 0, 1)[None], size, mode="nearest")[0]
  m = F.interpolate(t(mask)[None, None], size, mode="nearest")[0, 0].numpy() > 0
  pts, uv = pts.numpy()[m], uv.permute(1, 2, 0).numpy()[m]
  xy, z = pts[:, :2], pts[:, 2]

  def focal_of(proj):
    return focal if focal is not None else (proj * uv).sum() / (proj ** 2).sum()

  def fn(x):
    proj = xy / (z + x[0])[:, None]
    return (focal_of(proj) * proj - uv).ravel()

  sol = least_squares(fn, x0=[0.0], method="lm", ftol=1e-15, xtol=1e-15, gtol=1e-15)
  shift = sol.x[0]
  return focal_of(xy / (z + shift)[:, None]), shift


def test_recover_focal_shift_exact_and_vs_scipy():
  pts = np.stack([_synthetic_points(1.3, 0.7), _synthetic_points(0.8, -0.4)])
  f, s = al.recover_focal_shift(pts.astype(np.float32), downsample=(32, 40))
  np.testing.assert_allclose(f, [1.3, 0.8], rtol=1e-4)
  np.testing.assert_allclose(s, [0.7, -0.4], rtol=1e-4)
  noisy = np.stack([_synthetic_points(1.3, 0.7, noise=0.02, seed=1),
                    _synthetic_points(0.8, -0.4, noise=0.02, seed=2)])
  mask = _rng(17).random(noisy.shape[:3]) < 0.8
  f, s = al.recover_focal_shift(noisy.astype(np.float32), mask, downsample=(32, 40))
  for k in range(2):
    f_ref, s_ref = _scipy_focal_shift(noisy[k], mask[k], (32, 40))
    np.testing.assert_allclose(f[k], f_ref, rtol=1e-4)
    np.testing.assert_allclose(s[k], s_ref, rtol=1e-4)
    assert abs(s_ref - (0.7, -0.4)[k]) > 1e-4  # noise moves the optimum: a real comparison
  # known focal: only the shift is solved
  f2, s2 = al.recover_focal_shift(noisy.astype(np.float32), mask, focal=np.array([1.3, 0.8]),
                                  downsample=(32, 40))
  np.testing.assert_allclose(f2, [1.3, 0.8], rtol=1e-7)
  for k in range(2):
    _, s_ref = _scipy_focal_shift(noisy[k], mask[k], (32, 40), focal=(1.3, 0.8)[k])
    np.testing.assert_allclose(s2[k], s_ref, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# validation


def test_bad_inputs_raise_value_error_naming_the_argument():
  p = np.ones((H, W))
  cases = [
      (lambda: al.lstsq_scale(p, np.ones((H, W + 1))), "gt"),
      (lambda: al.median_scale(p, p, np.ones((3, 3), bool)), "mask"),
      (lambda: al.lstsq_scale_shift(p, p, np.zeros((H, W), bool)), "mask"),
      (lambda: al.align_depth(p, p, mode="affine"), "mode"),
      (lambda: al.align_depth(p, -p, mode="disparity_affine"), "mask"),
      (lambda: al.weighted_l1_scale(p, p, np.ones((H + 1,))), "weight"),
      (lambda: al.ransac_scale_shift(p, p, seed=1.5), "seed"),
      (lambda: al.ransac_scale_shift(p, p, np.zeros((H, W), bool)), "mask"),
      (lambda: al.umeyama(np.ones((5, 3)), np.ones((6, 3))), "dst"),
      (lambda: al.umeyama(np.ones((5, 2)), np.ones((5, 2))), "src"),
      (lambda: al.umeyama(np.ones((5, 3)), np.ones((5, 3)), weights=np.zeros(5)), "weights"),
      (lambda: al.ransac_umeyama(np.ones((2, 3)), np.ones((2, 3))), "src"),
      (lambda: al.recover_focal_shift(np.ones((4, 4, 3)), downsample=0), "downsample"),
      (lambda: al.recover_focal_shift(np.ones((4, 4))), "points"),
  ]
  for fn, name in cases:
    with pytest.raises(ValueError, match=name):
      fn()


def test_masked_quantile_is_torch_quantile_of_the_masked_values():
  """Linear interpolation at q (n - 1) over the masked elements only (static shapes)."""
  from geojax.geometry.alignment import masked_quantile
  rng = np.random.default_rng(0)
  v = rng.normal(size=(7, 9)).astype(np.float32)
  m = rng.uniform(size=(7, 9)) > 0.3
  v[~m] = 1e6  # never counted
  for q in (0.0, 0.02, 0.5, 0.98, 1.0):
    want = np.quantile(v[m].astype(np.float64), q, method="linear")
    assert float(masked_quantile(v, m, q)) == pytest.approx(want, rel=1e-6)
