"""Tests for geojax.eval.metrics: hand-computed values, invariances and official-code parity."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from geojax.eval import metrics as M

DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "silog", "delta1", "delta2", "delta3")


def _gt_depth(shape=(6, 7), seed=0):
  return np.random.default_rng(seed).uniform(1.0, 5.0, shape)


# ------------------------------------------------------------------------------------------------
# Depth
# ------------------------------------------------------------------------------------------------


def test_depth_perfect():
  gt = _gt_depth()
  out = M.depth_metrics(gt, gt)
  assert set(out) == set(DEPTH_KEYS)
  for k in ("abs_rel", "sq_rel", "rmse", "rmse_log", "silog"):
    assert out[k] == pytest.approx(0.0, abs=1e-12)
  for k in ("delta1", "delta2", "delta3"):
    assert out[k] == 1.0


def test_depth_double():
  gt = _gt_depth()
  out = M.depth_metrics(2 * gt, gt)
  assert out["abs_rel"] == pytest.approx(1.0)
  assert out["sq_rel"] == pytest.approx(np.mean(gt))
  assert out["rmse"] == pytest.approx(np.sqrt(np.mean(gt ** 2)))
  assert out["rmse_log"] == pytest.approx(np.log(2.0))
  assert out["silog"] == pytest.approx(0.0, abs=1e-6)  # a pure scale error is scale-invariant
  assert out["delta1"] == 0.0 and out["delta2"] == 0.0 and out["delta3"] == 0.0  # 1.25^3 < 2


def test_depth_hand_values():
  gt = np.array([[1.0, 2.0]])
  pred = np.array([[1.1, 1.5]])
  out = M.depth_metrics(pred, gt)
  d = np.log([1.1, 1.5 / 2.0])
  assert out["abs_rel"] == pytest.approx((0.1 / 1 + 0.5 / 2) / 2)
  assert out["sq_rel"] == pytest.approx((0.01 / 1 + 0.25 / 2) / 2)
  assert out["rmse"] == pytest.approx(np.sqrt((0.01 + 0.25) / 2))
  assert out["rmse_log"] == pytest.approx(np.sqrt(np.mean(d ** 2)))
  assert out["silog"] == pytest.approx(100 * np.sqrt(np.mean(d ** 2) - np.mean(d) ** 2))
  # ratios 1.1 and 4/3: delta1 counts only the first, delta2 (1.5625) both
  assert out["delta1"] == pytest.approx(0.5)
  assert out["delta2"] == 1.0


@pytest.mark.parametrize("mode", ["median", "scale"])
def test_depth_scale_alignment(mode):
  gt = _gt_depth()
  out = M.depth_metrics(0.37 * gt, gt, align=mode)
  assert out["abs_rel"] == pytest.approx(0.0, abs=1e-9)
  assert out["rmse"] == pytest.approx(0.0, abs=1e-9)
  assert out["delta1"] == 1.0


def test_depth_scale_shift_and_disparity_alignment():
  gt = _gt_depth()
  out = M.depth_metrics((gt - 0.3) / 2.0, gt, align="scale_shift")
  assert out["abs_rel"] == pytest.approx(0.0, abs=1e-9)
  assert out["delta1"] == 1.0
  # scale alone cannot remove a shift
  assert M.depth_metrics((gt - 0.3) / 2.0, gt, align="scale")["abs_rel"] > 1e-3
  pred = 1.0 / (0.5 / gt + 0.1)  # affine error in disparity
  out = M.depth_metrics(pred, gt, align="disparity_affine")
  assert out["abs_rel"] == pytest.approx(0.0, abs=1e-9)
  assert out["delta1"] == 1.0
  assert M.depth_metrics(pred, gt)["abs_rel"] > 1e-2


def test_depth_mask_batch_and_jax():
  import jax.numpy as jnp
  gt = _gt_depth((2, 4, 5))
  pred = gt.copy()
  pred[1] *= 2.0  # image 1: abs_rel 1; image 0 perfect -> per-image mean 0.5
  pred[0, 0, 0] = 100.0
  mask = np.ones(gt.shape, bool)
  mask[0, 0, 0] = False  # hides the outlier
  out = M.depth_metrics(jnp.asarray(pred), jnp.asarray(gt), mask=mask)
  assert out["abs_rel"] == pytest.approx(0.5)
  assert out["delta1"] == pytest.approx(0.5)
  # invalid GT (0, nan) is excluded automatically
  gt2 = gt.copy()
  gt2[0, 0, 0] = 0.0
  gt2[0, 0, 1] = np.nan
  assert M.depth_metrics(pred, gt2)["abs_rel"] == pytest.approx(0.5)
  # an image with no valid pixel is skipped
  mask2 = np.ones(gt.shape, bool)
  mask2[0] = False
  assert M.depth_metrics(pred, gt, mask=mask2)["abs_rel"] == pytest.approx(1.0)


def test_depth_errors():
  gt = _gt_depth()
  with pytest.raises(ValueError, match="align"):
    M.depth_metrics(gt, gt, align="affine")
  with pytest.raises(ValueError, match="pred"):
    M.depth_metrics(gt[:, :-1], gt)
  with pytest.raises(ValueError, match="gt"):
    M.depth_metrics(gt[0], gt[0])
  with pytest.raises(ValueError, match="mask"):
    M.depth_metrics(gt, gt, mask=np.ones((2, 2), bool))
  with pytest.raises(ValueError, match="empty"):
    M.depth_metrics(gt, gt, mask=np.zeros(gt.shape, bool))
  with pytest.raises(ValueError, match="empty"):
    M.depth_metrics(gt, np.zeros_like(gt))


# ------------------------------------------------------------------------------------------------
# Point maps
# ------------------------------------------------------------------------------------------------


def _gt_pointmap(shape=(2, 5, 6), seed=0):
  """Camera-frame points ``shape + (3,)`` with z in [1, 5]."""
  rng = np.random.default_rng(seed)
  z = rng.uniform(1.0, 5.0, shape)
  xy = rng.uniform(-1.0, 1.0, shape + (2,)) * z[..., None]
  return np.concatenate([xy, z[..., None]], -1)


def test_pointmap_scaled_prediction():
  gt = _gt_pointmap()
  out = M.pointmap_metrics(2.0 * gt, gt)  # default align="scale"
  assert set(out) == {"rel_p", "delta_p"}
  assert out["rel_p"] == pytest.approx(0.0, abs=1e-12) and out["delta_p"] == 1.0
  assert M.pointmap_metrics(2.0 * gt, gt, align="scale_shift")["rel_p"] == pytest.approx(
      0.0, abs=1e-12)
  none = M.pointmap_metrics(2.0 * gt, gt, align="none")
  assert none["rel_p"] == pytest.approx(1.0) and none["delta_p"] == 0.0
  # one frame (H, W, 3) and JAX inputs work too
  import jax.numpy as jnp
  one = M.pointmap_metrics(jnp.asarray(3.0 * gt[0]), jnp.asarray(gt[0]))
  assert one["rel_p"] == pytest.approx(0.0, abs=1e-6) and one["delta_p"] == 1.0


def test_pointmap_hand_values():
  gt = np.array([[[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]]])  # (H, W, 3) = (1, 2, 3)
  pred = np.array([[[0.1, 0.0, 1.0], [0.0, 0.0, 2.6]]])
  out = M.pointmap_metrics(pred, gt, align="none")
  assert out["rel_p"] == pytest.approx((0.1 / 1.0 + 0.6 / 2.0) / 2)  # errors 0.1 and 0.3
  assert out["delta_p"] == 0.5  # only 0.1 < 0.25
  assert M.pointmap_metrics(pred, gt, align="none", threshold=0.35)["delta_p"] == 1.0
  # least-squares scale s = <p, g> / <p, p> = 6.2 / 7.77
  s = 6.2 / 7.77
  e = [np.hypot(0.1 * s, s - 1.0) / 1.0, abs(2.6 * s - 2.0) / 2.0]
  out = M.pointmap_metrics(pred, gt, align="scale")
  assert out["rel_p"] == pytest.approx(np.mean(e), rel=1e-12)
  assert out["delta_p"] == np.mean(np.array(e) < 0.25) == 1.0


def test_pointmap_shift_alignment():
  gt = _gt_pointmap(seed=1)
  shift = np.array([0.3, -0.2, 1.5])
  pred = 0.5 * gt + shift  # gt = 2 (pred - shift): a scale and a 3-vector shift
  out = M.pointmap_metrics(pred, gt, align="scale_shift")
  assert out["rel_p"] == pytest.approx(0.0, abs=1e-12) and out["delta_p"] == 1.0
  assert M.pointmap_metrics(pred, gt, align="scale")["rel_p"] > 0.05
  # scale_shift on a perturbed map equals the closed-form fit
  noisy = pred + np.random.default_rng(2).normal(0.0, 0.05, pred.shape)
  p, g = noisy.reshape(-1, 3), gt.reshape(-1, 3)
  a = np.concatenate([p.reshape(-1, 1), np.kron(np.ones((len(p), 1)), np.eye(3))], 1)
  sol = np.linalg.lstsq(a, g.reshape(-1), rcond=None)[0]  # unknowns (s, tx, ty, tz)
  err = np.linalg.norm(sol[0] * p + sol[1:] - g, axis=-1) / np.linalg.norm(g, axis=-1)
  out = M.pointmap_metrics(noisy, gt, align="scale_shift")
  assert out["rel_p"] == pytest.approx(err.mean(), rel=1e-9)
  assert out["delta_p"] == pytest.approx(np.mean(err < 0.25))


def test_pointmap_one_alignment_per_video():
  """A video is aligned jointly: frames with different scales are not each fixed up."""
  gt = _gt_pointmap(shape=(2, 4, 5), seed=3)
  pred = np.stack([2.0 * gt[0], 4.0 * gt[1]])
  s = np.sum(pred * gt) / np.sum(pred * pred)
  err = np.linalg.norm(s * pred - gt, axis=-1) / np.linalg.norm(gt, axis=-1)
  out = M.pointmap_metrics(pred, gt)
  assert out["rel_p"] == pytest.approx(err.mean(), rel=1e-12) and out["rel_p"] > 0.1
  for i in range(2):  # each frame alone is a pure scale
    assert M.pointmap_metrics(pred[i], gt[i])["rel_p"] == pytest.approx(0.0, abs=1e-12)


def test_pointmap_mask_and_invalid_points():
  gt = _gt_pointmap(seed=4)
  pred = 2.0 * gt
  mask = np.ones(gt.shape[:-1], bool)
  mask[0, :2] = False
  bad = pred.copy()
  bad[0, 0] = 1e3  # huge error, masked out
  bad[0, 1] = np.nan  # NaN, masked out
  out = M.pointmap_metrics(bad, gt, mask)
  assert out["rel_p"] == pytest.approx(0.0, abs=1e-12) and out["delta_p"] == 1.0
  assert M.pointmap_metrics(bad, gt)["rel_p"] > 0.5  # unmasked, the outliers count
  # zero or non-finite GT points are not valid (no division by |g| = 0)
  gt2 = gt.copy()
  gt2[1, 0, 0] = 0.0
  gt2[1, 0, 1] = np.inf
  out = M.pointmap_metrics(pred, gt2, align="none")
  assert np.isfinite(out["rel_p"]) and out["rel_p"] == pytest.approx(1.0)


def test_pointmap_degenerate_predictions():
  """Same fallbacks as the depth alignment: a zero prediction is scored as it is, not raised."""
  gt = _gt_pointmap(seed=5)
  zero = M.pointmap_metrics(np.zeros_like(gt), gt, align="scale")
  assert zero["rel_p"] == pytest.approx(1.0) and zero["delta_p"] == 0.0
  const = np.broadcast_to(np.array([0.0, 0.0, 2.0]), gt.shape)
  c = M.pointmap_metrics(const, gt, align="scale_shift")  # s = 1, t = mean(g) - mean(p)
  err = np.linalg.norm(gt.mean((0, 1, 2)) - gt, axis=-1) / np.linalg.norm(gt, axis=-1)
  assert c["rel_p"] == pytest.approx(err.mean(), rel=1e-12)


def test_pointmap_errors():
  gt = _gt_pointmap(shape=(3, 4))
  with pytest.raises(ValueError, match=r"gt_points must have shape \(\.\.\., H, W, 3\)"):
    M.pointmap_metrics(gt[..., 0], gt[..., 0])
  with pytest.raises(ValueError, match="gt_points"):
    M.pointmap_metrics(gt[0], gt[0])  # (W, 3): no H axis
  with pytest.raises(ValueError, match="gt_points"):
    M.pointmap_metrics(gt[..., :2], gt[..., :2])
  with pytest.raises(ValueError, match="pred_points"):
    M.pointmap_metrics(gt[:2], gt)
  with pytest.raises(ValueError, match="mask"):
    M.pointmap_metrics(gt, gt, np.ones((3, 5), bool))
  with pytest.raises(ValueError, match="align"):
    M.pointmap_metrics(gt, gt, align="median")
  with pytest.raises(ValueError, match="threshold"):
    M.pointmap_metrics(gt, gt, threshold=0.0)
  with pytest.raises(ValueError, match="empty"):
    M.pointmap_metrics(gt, gt, np.zeros((3, 4), bool))
  with pytest.raises(ValueError, match="empty"):
    M.pointmap_metrics(np.full_like(gt, np.nan), gt)


# ------------------------------------------------------------------------------------------------
# Normals
# ------------------------------------------------------------------------------------------------


def test_normal_metrics_known_rotations():
  rng = np.random.default_rng(1)
  angles = np.array([0.0, 3.0, 6.0, 10.0, 20.0, 45.0, 90.0, 170.0])
  gt = rng.normal(size=(len(angles), 3))
  gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
  pred = np.empty_like(gt)
  for i, a in enumerate(angles):
    axis = np.cross(gt[i], rng.normal(size=3))
    axis /= np.linalg.norm(axis)
    pred[i] = Rotation.from_rotvec(np.radians(a) * axis).apply(gt[i]) * (i + 1.0)  # unnormalised
  out = M.normal_metrics(pred.reshape(2, 4, 3), gt.reshape(2, 4, 3))
  assert out["mean"] == pytest.approx(angles.mean(), abs=1e-9)
  assert out["median"] == pytest.approx(np.median(angles), abs=1e-9)
  assert out["rmse"] == pytest.approx(np.sqrt(np.mean(angles ** 2)), abs=1e-9)
  assert out["within_5"] == pytest.approx(2 / 8)
  assert out["within_7.5"] == pytest.approx(3 / 8)
  assert out["within_11.25"] == pytest.approx(4 / 8)
  assert out["within_22.5"] == pytest.approx(5 / 8)
  assert out["within_30"] == pytest.approx(5 / 8)
  perfect = M.normal_metrics(gt, gt * 3.0)
  assert perfect["mean"] == pytest.approx(0.0, abs=1e-9) and perfect["within_5"] == 1.0
  mask = angles < 15
  masked = M.normal_metrics(pred, gt, mask=mask)
  assert masked["mean"] == pytest.approx(angles[mask].mean(), abs=1e-9)


def test_normal_errors():
  n = np.ones((4, 3))
  with pytest.raises(ValueError, match="gt"):
    M.normal_metrics(np.ones((4, 2)), np.ones((4, 2)))
  with pytest.raises(ValueError, match="pred"):
    M.normal_metrics(np.ones((3, 3)), n)
  with pytest.raises(ValueError, match="mask"):
    M.normal_metrics(n, n, mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="empty"):
    M.normal_metrics(n, n, mask=np.zeros(4, bool))


# ------------------------------------------------------------------------------------------------
# Poses
# ------------------------------------------------------------------------------------------------


def _official_bench_utils():
  """``depth_anything_3.bench.utils`` with a stub ``open3d`` (only referenced in annotations)."""
  if "open3d" not in sys.modules:
    stub = types.ModuleType("open3d")

    class _Placeholder:
      pass

    stub.geometry = types.SimpleNamespace(PointCloud=_Placeholder, TriangleMesh=_Placeholder,
                                          Image=_Placeholder, RGBDImage=_Placeholder)
    stub.pipelines = types.SimpleNamespace(integration=types.SimpleNamespace(
        ScalableTSDFVolume=_Placeholder, TSDFVolumeColorType=_Placeholder))
    stub.utility = types.SimpleNamespace(Vector3dVector=_Placeholder)
    stub.camera = types.SimpleNamespace(PinholeCameraIntrinsic=_Placeholder)
    sys.modules["open3d"] = stub
  pytest.importorskip("torch")
  return pytest.importorskip("depth_anything_3.bench.utils")


def _random_w2c(n, seed, spread=2.0):
  rng = np.random.default_rng(seed)
  r = Rotation.random(n, random_state=seed).as_matrix()
  t = rng.normal(scale=spread, size=(n, 3))
  w2c = np.tile(np.eye(4), (n, 1, 1))
  w2c[:, :3, :3] = r
  w2c[:, :3, 3] = t
  return w2c


def _perturb(w2c, seed, rot_deg, trans_sigma):
  rng = np.random.default_rng(seed + 1000)
  out = w2c.copy()
  rv = rng.normal(size=(len(w2c), 3))
  rv *= np.radians(rot_deg) * rng.uniform(0, 1, (len(w2c), 1)) / np.linalg.norm(rv, axis=1,
                                                                                 keepdims=True)
  out[:, :3, :3] = Rotation.from_rotvec(rv).as_matrix() @ w2c[:, :3, :3]
  out[:, :3, 3] += rng.normal(scale=trans_sigma, size=(len(w2c), 3))
  return out


def _world_sim3(w2c, s, r, t):
  """w2c of the same cameras after the world map ``X -> s R X + t`` (scene rescaled by s)."""
  out = w2c.copy()
  out[:, :3, :3] = w2c[:, :3, :3] @ r.T
  out[:, :3, 3] = s * w2c[:, :3, 3] - w2c[:, :3, :3] @ r.T @ t
  return out


@pytest.mark.parametrize("seed,n,rot_deg,trans_sigma", [
    (0, 6, 0.0, 0.0), (1, 8, 2.0, 0.05), (2, 10, 3.0, 0.03), (3, 12, 20.0, 0.5),
    (4, 5, 40.0, 1.0), (5, 10, 4.0, 0.05)])
def test_pose_auc_matches_official(seed, n, rot_deg, trans_sigma):
  import torch
  utils = _official_bench_utils()
  gt = _random_w2c(n, seed)
  pred = _perturb(gt, seed, rot_deg, trans_sigma)
  ref = utils.compute_pose(torch.from_numpy(pred), torch.from_numpy(gt))
  ours = M.pose_auc(pred, gt)
  assert set(ours) == {"auc03", "auc05", "auc15", "auc30"}
  for k in ours:
    assert ours[k] == pytest.approx(float(ref[k]), abs=1e-6), k
  if rot_deg == 0.0:
    assert all(v == pytest.approx(1.0) for v in ours.values())
  if seed in (1, 2, 5):  # noisy: every AUC strictly inside (0, 1)
    assert all(0.0 < v < 1.0 for v in ours.values())
  if seed == 3:
    assert 0.0 < ours["auc15"] < ours["auc30"] < 1.0
  # per-pair errors against the official helper
  r_ref, t_ref = utils.se3_to_relative_pose_error(
      utils.align_to_first_camera(torch.from_numpy(pred)),
      utils.align_to_first_camera(torch.from_numpy(gt)), n)
  r, t = M.pose_errors(pred, gt)
  np.testing.assert_allclose(r, r_ref.numpy(), atol=1e-5)
  np.testing.assert_allclose(t, t_ref.numpy(), atol=1e-5)
  # (N, 3, 4) input gives the same result
  assert M.pose_auc(pred[:, :3], gt[:, :3]) == ours


def test_pose_auc_sim3_invariance():
  gt = _random_w2c(9, 7)
  pred = _perturb(gt, 7, 8.0, 0.3)
  r = Rotation.from_euler("xyz", [20.0, -35.0, 70.0], degrees=True).as_matrix()
  moved = _world_sim3(pred, 3.7, r, np.array([1.0, -2.0, 0.5]))
  r0, t0 = M.pose_errors(pred, gt)
  r1, t1 = M.pose_errors(moved, gt)
  np.testing.assert_allclose(r1, r0, atol=1e-6)
  np.testing.assert_allclose(t1, t0, atol=1e-6)
  taus = (1, 3, 5, 10, 30)
  a0, a1 = M.pose_auc(pred, gt, thresholds=taus), M.pose_auc(moved, gt, thresholds=taus)
  for k in a0:
    assert a1[k] == pytest.approx(a0[k], abs=1e-9)
  assert set(a0) == {"auc01", "auc03", "auc05", "auc10", "auc30"}


def test_rra_rta():
  gt = _random_w2c(7, 11)
  pred = _perturb(gt, 11, 10.0, 0.4)
  r, t = M.pose_errors(pred, gt)
  out = M.rra_rta(pred, gt)
  assert set(out) == {"rra@5", "rta@5", "rra@15", "rta@15", "rra@30", "rta@30"}
  for tau in (5, 15, 30):
    assert out[f"rra@{tau}"] == pytest.approx(np.mean(r < tau))
    assert out[f"rta@{tau}"] == pytest.approx(np.mean(t < tau))
  assert all(v == 1.0 for v in M.rra_rta(gt, gt).values())


def _trajectory(n=12, seed=3):
  rng = np.random.default_rng(seed)
  centres = np.cumsum(rng.normal(scale=0.5, size=(n, 3)), 0)
  r = Rotation.random(n, random_state=seed).as_matrix()
  w2c = np.tile(np.eye(4), (n, 1, 1))
  w2c[:, :3, :3] = r
  w2c[:, :3, 3] = -np.einsum("nij,nj->ni", r, centres)
  return w2c, centres


def _umeyama_reference(src, dst):
  mu_s, mu_d = src.mean(0), dst.mean(0)
  xs, xd = src - mu_s, dst - mu_d
  cov = xd.T @ xs / len(src)
  u, d, vt = np.linalg.svd(cov)
  sgn = np.eye(3)
  sgn[2, 2] = np.sign(np.linalg.det(u @ vt))
  r = u @ sgn @ vt
  s = np.trace(np.diag(d) @ sgn) / np.mean(np.sum(xs ** 2, 1))
  return s, r, mu_d - s * r @ mu_s


def test_ate_sim3_and_noise():
  gt, centres = _trajectory()
  r = Rotation.from_euler("zyx", [30.0, 10.0, -50.0], degrees=True).as_matrix()
  pred = _world_sim3(gt, 0.25, r, np.array([3.0, 1.0, -2.0]))
  assert M.ate(pred, gt) == pytest.approx(0.0, abs=1e-9)
  assert M.ate(gt, gt, align="none") == pytest.approx(0.0, abs=1e-12)
  assert M.ate(pred, gt, align="none") > 1.0
  # noisy centres: compare with an independent Umeyama + RMSE
  rng = np.random.default_rng(5)
  pc = M._centres(pred) + rng.normal(scale=0.05, size=centres.shape)
  noisy = pred.copy()
  noisy[:, :3, 3] = -np.einsum("nij,nj->ni", noisy[:, :3, :3], pc)
  s, rr, t = _umeyama_reference(pc, centres)
  expected = np.sqrt(np.mean(np.sum((s * pc @ rr.T + t - centres) ** 2, 1)))
  assert M.ate(noisy, gt) == pytest.approx(expected, rel=1e-9)
  assert 0.0 < M.ate(noisy, gt) < 0.5
  # SE(3) alignment cannot undo the scale
  assert M.ate(pred, gt, align="se3") > 0.1
  with pytest.raises(ValueError, match="align"):
    M.ate(pred, gt, align="sim2")


def test_rpe_hand_and_invariance():
  # align="none": centres 0, 1, 2.5 along x; frame 2 yawed by 10 degrees.
  c2w = np.tile(np.eye(4), (3, 1, 1))
  c2w[:, 0, 3] = [0.0, 1.0, 2.0]
  gt = np.linalg.inv(c2w)
  p_c2w = c2w.copy()
  p_c2w[2, 0, 3] = 2.5
  p_c2w[2, :3, :3] = Rotation.from_euler("z", 10.0, degrees=True).as_matrix()
  out = M.rpe(np.linalg.inv(p_c2w), gt, align="none")
  assert out["rpe_trans"] == pytest.approx(np.sqrt((0.0 + 0.25) / 2))
  assert out["rpe_trans_mean"] == pytest.approx(0.25)
  assert out["rpe_rot"] == pytest.approx(5.0)
  assert out["rpe_rot_rmse"] == pytest.approx(np.sqrt(50.0))
  # a global Sim(3) of the prediction is removed by the alignment
  gt2, _ = _trajectory(10, 8)
  r = Rotation.from_euler("xyz", [5.0, 60.0, -20.0], degrees=True).as_matrix()
  moved = _world_sim3(gt2, 2.5, r, np.array([0.3, 0.2, 0.1]))
  out2 = M.rpe(moved, gt2)
  assert out2["rpe_trans"] == pytest.approx(0.0, abs=1e-9)
  assert out2["rpe_rot"] == pytest.approx(0.0, abs=1e-6)
  assert M.rpe(_perturb(gt2, 3, 5.0, 0.1), gt2, delta=2)["rpe_rot"] > 0.1


def test_pose_errors_bad_shapes():
  gt = _random_w2c(4, 0)
  with pytest.raises(ValueError, match="pred_extrinsics"):
    M.pose_auc(gt[:, :2], gt)
  with pytest.raises(ValueError, match="gt_extrinsics"):
    M.pose_auc(gt, gt[:1])
  with pytest.raises(ValueError, match="same N"):
    M.ate(gt[:3], gt)
  with pytest.raises(ValueError, match="thresholds"):
    M.pose_auc(gt, gt, thresholds=(2.5,))


# ------------------------------------------------------------------------------------------------
# Point clouds
# ------------------------------------------------------------------------------------------------


def test_pointcloud_vs_brute_force():
  rng = np.random.default_rng(0)
  pred = rng.uniform(size=(60, 3))
  gt = rng.uniform(size=(80, 3))
  dmat = np.linalg.norm(pred[:, None] - gt[None], axis=-1)
  d_pg, d_gp = dmat.min(1), dmat.min(0)
  thr = 0.15
  out = M.pointcloud_metrics(pred, gt, threshold=thr)
  p, r = np.mean(d_pg < thr), np.mean(d_gp < thr)
  assert 0 < p < 1 and 0 < r < 1
  expected = {"accuracy": d_pg.mean(), "completeness": d_gp.mean(),
              "overall": (d_pg.mean() + d_gp.mean()) / 2, "precision": p, "recall": r,
              "fscore": 2 * p * r / (p + r)}
  assert set(out) == set(expected)
  for k, v in expected.items():
    assert out[k] == pytest.approx(v, rel=1e-12), k
  assert M.chamfer_distance(pred, gt) == pytest.approx(expected["overall"], rel=1e-12)
  # perfect prediction
  perfect = M.pointcloud_metrics(gt, gt)
  assert perfect["overall"] == 0.0 and perfect["fscore"] == 1.0
  # explicit (s, R, t) applied to the prediction
  rot = Rotation.from_euler("z", 40.0, degrees=True).as_matrix()
  s, t = 2.0, np.array([1.0, 2.0, 3.0])
  moved = ((gt - t) @ rot) / s  # inverse of x -> s R x + t
  assert M.pointcloud_metrics(moved, gt)["accuracy"] > 0.1
  aligned = M.pointcloud_metrics(moved, gt, align=(s, rot, t))
  assert aligned["overall"] == pytest.approx(0.0, abs=1e-9)
  assert aligned["fscore"] == 1.0


def test_pointcloud_million_points_runs():
  rng = np.random.default_rng(1)
  pred = rng.uniform(size=(1_000_000, 3)).astype(np.float32)
  gt = rng.uniform(size=(1_000_000, 3)).astype(np.float32)
  out = M.pointcloud_metrics(pred, gt, threshold=0.01)
  assert 0.0 < out["accuracy"] < 0.01 and 0.0 < out["fscore"] <= 1.0


def test_pointcloud_errors():
  pts = np.zeros((5, 3))
  with pytest.raises(ValueError, match="pred_points"):
    M.pointcloud_metrics(np.zeros((5, 2)), pts)
  with pytest.raises(ValueError, match="gt_points"):
    M.pointcloud_metrics(pts, np.zeros((0, 3)))
  with pytest.raises(ValueError, match="align"):
    M.pointcloud_metrics(pts, pts, align="sim3")


# ------------------------------------------------------------------------------------------------
# Edge-aware Chamfer
# ------------------------------------------------------------------------------------------------


def _step_scene(h=32, w=40):
  gt = np.full((h, w), 2.0)
  gt[:, w // 2:] = 4.0
  gt[: h // 3, : w // 4] = 1.0
  k = np.array([[50.0, 0.0, w / 2], [0.0, 50.0, h / 2], [0.0, 0.0, 1.0]])
  return gt, k


def test_edge_chamfer():
  gt, k = _step_scene()
  out = M.edge_chamfer(gt, gt, k)
  assert out["chamfer"] == pytest.approx(0.0, abs=1e-6)
  assert out["num_points"] > 0
  # an affine error is removed by the default scale_shift alignment
  assert M.edge_chamfer(0.5 * gt + 0.2, gt, k)["chamfer"] == pytest.approx(0.0, abs=1e-9)
  shifted = np.roll(gt, 3, axis=1)
  out = M.edge_chamfer(shifted, gt, k, align="none")
  assert out["chamfer"] > 0.05
  assert out["chamfer"] == pytest.approx((out["accuracy"] + out["completeness"]) / 2)
  assert M.edge_chamfer(shifted, gt, k)["chamfer"] > 0.0


def test_edge_chamfer_errors():
  gt, k = _step_scene()
  with pytest.raises(ValueError, match="align"):
    M.edge_chamfer(gt, gt, k, align="bogus")
  with pytest.raises(ValueError, match="K"):
    M.edge_chamfer(gt, gt, k[:2])
  with pytest.raises(ValueError, match="pred_depth"):
    M.edge_chamfer(gt[:-1], gt, k)
  with pytest.raises(ValueError, match="empty"):
    M.edge_chamfer(gt, gt, k, mask=np.zeros(gt.shape, bool))
  with pytest.raises(ValueError, match="edge"):
    M.edge_chamfer(np.ones_like(gt), np.ones_like(gt), k)  # flat GT: no edges


# ------------------------------------------------------------------------------------------------
# Patch seam consistency (provisional)
# ------------------------------------------------------------------------------------------------


def test_consistency_error():
  a = np.zeros((4, 6))
  b = np.ones((4, 6))
  c = np.full((4, 4), 3.0)
  boxes = [(0, 0, 6, 4), (4, 0, 10, 4), (20, 20, 24, 24)]  # a-b overlap 2 columns, c alone
  assert M.consistency_error([a, b, c], boxes) == pytest.approx(1.0)
  b2 = b.copy()
  b2[:, :2] = [[0.0, 2.0]] * 4  # overlap: |0-0|, |0-2| -> 1.0
  d = np.full((2, 2), 0.5)
  boxes2 = [(0, 0, 6, 4), (4, 0, 10, 4), (4, 2, 6, 4)]  # d overlaps a (0.5) and b2 (0.5, 1.5)
  expected = np.mean([1.0, 0.5, np.mean([0.5, 1.5])])
  assert M.consistency_error([a, b2, d], boxes2) == pytest.approx(expected)
  assert M.consistency_error([a, a], [(0, 0, 6, 4), (2, 0, 8, 4)]) == 0.0
  with pytest.raises(ValueError, match="overlap"):
    M.consistency_error([a, c], [(0, 0, 6, 4), (20, 20, 24, 24)])
  with pytest.raises(ValueError, match="patch_preds"):
    M.consistency_error([a, b], [(0, 0, 5, 4), (4, 0, 10, 4)])
  with pytest.raises(ValueError, match="boxes"):
    M.consistency_error([a, b], [(0, 0, 6, 4)])


# ------------------------------------------------------------------------------------------------
# TAPVid-3D
# ------------------------------------------------------------------------------------------------


def _tap_case():
  # fx = fy = 512 at 512x512 -> 256 at evaluation resolution; z = 2.56 -> 1 px = 0.01 m.
  gt = np.zeros((2, 2, 3))
  gt[..., 2] = 2.56
  pred = gt.copy()
  pred[0, 0, 0] += 0.005  # within every threshold
  pred[0, 1, 0] += 0.015  # within 2, 4, 8, 16 px
  pred[1, 0, 0] += 0.05   # within 8, 16 px
  pred[1, 1, 0] += 1.0    # never within
  gt_vis = np.array([[True, True], [True, False]])
  pred_vis = np.array([[True, True], [False, True]])
  return pred, gt, pred_vis, gt_vis, (512.0, 512.0, 256.0, 256.0), (512, 512)


def test_tapvid3d_hand_case():
  pred, gt, pv, gv, intr, hw = _tap_case()
  out = M.tapvid3d_metrics(pred, gt, pv, gv, intr, hw, scaling="none")
  expected_within = {1: 1 / 3, 2: 2 / 3, 4: 2 / 3, 8: 1.0, 16: 1.0}
  expected_jac = {1: 1 / 5, 2: 2 / 4, 4: 2 / 4, 8: 2 / 4, 16: 2 / 4}
  for d in (1, 2, 4, 8, 16):
    assert out[f"pts_within_{d}"] == pytest.approx(expected_within[d]), d
    assert out[f"jaccard_{d}"] == pytest.approx(expected_jac[d]), d
  assert out["apd3d"] == pytest.approx(11 / 15)
  assert out["average_pts_within_thresh"] == out["apd3d"]
  assert out["average_jaccard"] == pytest.approx(0.44)
  assert out["occlusion_accuracy"] == pytest.approx(0.5)
  # a 3x3 K gives the same; a 1024-short-side video with 2x focal is the same evaluation
  k = np.array([[512.0, 0, 256], [0, 512.0, 256], [0, 0, 1]])
  assert M.tapvid3d_metrics(pred, gt, pv, gv, k, hw, scaling="none") == out
  assert M.tapvid3d_metrics(pred, gt, pv, gv, (1024.0, 1024.0, 512.0, 512.0), (1024, 1536),
                            scaling="none") == out
  # fixed metric thresholds 0.01, 0.04, 0.16, 0.64, 2.56 m
  fixed = M.tapvid3d_metrics(pred, gt, pv, gv, intr, hw, scaling="none",
                             use_fixed_metric_threshold=True)
  assert fixed["pts_within_1"] == pytest.approx(1 / 3)
  assert fixed["pts_within_2"] == pytest.approx(2 / 3)
  assert fixed["pts_within_4"] == pytest.approx(1.0)
  assert fixed["pts_within_16"] == pytest.approx(1.0)


def test_tapvid3d_median_scaling():
  rng = np.random.default_rng(0)
  t, n = 6, 9
  gt = rng.normal(size=(t, n, 3))
  gt[..., 2] = rng.uniform(1.0, 4.0, (t, n))
  pred = gt + rng.normal(scale=0.02, size=gt.shape)
  gv = rng.uniform(size=(t, n)) > 0.2
  pv = gv.copy()
  pv[0, :3] = ~pv[0, :3]
  intr, hw = (300.0, 320.0, 160.0, 120.0), (240, 320)
  base = M.tapvid3d_metrics(pred, gt, pv, gv, intr, hw)
  scaled = M.tapvid3d_metrics(3.3 * pred, gt, pv, gv, intr, hw)
  for k in base:
    assert scaled[k] == pytest.approx(base[k], abs=1e-12), k
  assert 0.0 < base["apd3d"] < 1.0 and 0.0 < base["average_jaccard"] < 1.0
  # the median scale is computed over points visible in both; a perfect prediction scores 1
  perfect = M.tapvid3d_metrics(0.5 * gt, gt, gv, gv, intr, hw)
  assert perfect["apd3d"] == pytest.approx(1.0)
  assert perfect["average_jaccard"] == pytest.approx(1.0)
  assert perfect["occlusion_accuracy"] == 1.0
  # without scaling the halved prediction fails
  assert M.tapvid3d_metrics(0.5 * gt, gt, gv, gv, intr, hw, scaling="none")["apd3d"] < 0.5
  # median scaling factor by hand
  both = gv & pv
  s = np.median(np.linalg.norm(gt, axis=-1)[both]) / np.median(np.linalg.norm(pred, axis=-1)[both])
  manual = M.tapvid3d_metrics(s * pred, gt, pv, gv, intr, hw, scaling="none")
  for k in base:
    assert manual[k] == pytest.approx(base[k], abs=1e-12), k
  # per-trajectory scaling fixes per-track depth scales
  per_track = gt * rng.uniform(0.5, 2.0, (1, n, 1))
  out = M.tapvid3d_metrics(per_track, gt, gv, gv, intr, hw, scaling="per_trajectory",
                           query_frames=np.zeros(n))
  assert out["apd3d"] == pytest.approx(1.0)


def test_tapvid3d_errors():
  pred, gt, pv, gv, intr, hw = _tap_case()
  with pytest.raises(ValueError, match="pred_tracks"):
    M.tapvid3d_metrics(pred[:1], gt, pv, gv, intr, hw)
  with pytest.raises(ValueError, match="gt_visible"):
    M.tapvid3d_metrics(pred, gt, pv, gv[:1], intr, hw)
  with pytest.raises(ValueError, match="intrinsics"):
    M.tapvid3d_metrics(pred, gt, pv, gv, (1.0, 2.0), hw)
  with pytest.raises(ValueError, match="scaling"):
    M.tapvid3d_metrics(pred, gt, pv, gv, intr, hw, scaling="bogus")
  with pytest.raises(ValueError, match="empty"):
    M.tapvid3d_metrics(pred, gt, pv, np.zeros_like(gv), intr, hw)
  with pytest.raises(ValueError, match="empty"):
    M.tapvid3d_metrics(pred, gt, np.zeros_like(pv), gv, intr, hw)
