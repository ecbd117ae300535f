"""DAGE training losses (geojax.losses.dage) against the official loss values stored in the DAGE
parity fixture (``../shared/fixtures/dage/README.md`` §8.5-§9: ``Pi3Loss``, ``Pi3DistillLoss`` and
the stage-3 confidence loss of ngoductuanlhp/DAGE@c3065a4 evaluated on the stored outputs), plus
the branches the fixture does not take (B > 1, ``real`` depth, non-metric samples, placeholder
samples) and gradients under ``jit``.

Every fixture value is compared as max|a - b| / max|b| <= 1e-5 (fp32, matmuls at "highest").
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geojax.losses import dage as L

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.environ.get("GEOJAX_SHARED", os.path.join(os.path.dirname(__file__), "..", "..",
                                                    "shared"))
FIX = os.path.join(ROOT, "fixtures", "dage", "io.npz")
TOL = 1e-5

PI3_TERMS = ("local_pts_loss", "normal_loss", "edge_loss", "trans_loss", "rot_loss",
             "metric_scale_loss", "total")
DISTILL_TERMS = PI3_TERMS + ("distill_local_pts_loss", "distill_trans_loss", "distill_rot_loss",
                             "feat_distill_loss")
CONF_TERMS = ("local_conf_loss", "total")


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def io():
  if not os.path.exists(FIX):
    pytest.skip(f"DAGE parity fixture not found at {FIX} (set GEOJAX_SHARED)")
  return dict(np.load(FIX))


def _inputs(io, *, has_gt=None):
  """(pred, teacher, gt, student_feat, teacher_feat, sky) from fixture arrays (B leading)."""
  pred = dict(local_points=io["local_points"], conf=io["conf"], camera_poses=io["camera_poses"],
              metric_scale=io["metric_scale"])
  teacher = dict(local_points=io["teacher_local_points"], conf=io["teacher_conf"],
                 camera_poses=io["teacher_camera_poses"])
  gt = dict(depth=io["gt_metric_depth"], intrinsics=io["gt_intrinsics_normalized"],
            cam2world=io["gt_cam2world"], valid_mask=io["gt_valid_mask"],
            is_synthetic=io["gt_depth_type_is_synthetic"],
            is_metric_scale=io["gt_is_metric_scale"])
  if has_gt is not None:
    gt["has_gt"] = np.asarray(has_gt, bool)
  return pred, teacher, gt, io["lr_student_feat_for_distill"], io["teacher_feat"], io["gt_inf_mask"]


def _all_losses(pred, teacher, gt, sfeat, tfeat, sky):
  """The three totals; the returned value (what the gradient test differentiates) is distill +
  conf: distill contains every pi3 term, and leaving pi3 out of the backward pass (its forward is
  the same computation, shared by XLA) keeps the compile short."""
  _, p = L.pi3_loss(pred, gt)
  d_tot, d = L.distill_loss(pred, teacher, gt, student_feat=sfeat, teacher_feat=tfeat)
  c_tot, c = L.conf_loss(pred, gt, sky_mask=sky)
  return d_tot + c_tot, (p, d, c)


_all_jit = jax.jit(_all_losses)
_all_grad = jax.jit(jax.value_and_grad(_all_losses, has_aux=True))
_prepare_gt = jax.jit(L.prepare_gt)
_resample = jax.jit(L.resample_valid, static_argnums=2)


def _check_fixture_terms(io, p, d, c, *, skip=()):
  errs = {}
  for prefix, aux, names in (("loss_pi3__", p, PI3_TERMS), ("loss_distill__", d, DISTILL_TERMS),
                             ("loss_stage3conf__", c, CONF_TERMS)):
    for k in names:
      if k in skip:
        continue
      errs[prefix + k] = rel(aux[k], io[prefix + k])
  bad = {k: v for k, v in errs.items() if not v <= TOL}
  assert not bad, bad
  return errs


# ------------------------------------------------------------------------------------------------
# fixture parity (B = 1)


def test_prepare_gt_matches_fixture(io):
  g = _prepare_gt(io["gt_metric_depth"], io["gt_intrinsics_normalized"], io["gt_cam2world"],
                   io["gt_valid_mask"])
  for ours, key in (("local_points", "gt_local_points"), ("camera_poses", "gt_camera_poses_rel"),
                    ("norm_factor", "gt_norm_factor"), ("px", "gt_px")):
    assert rel(g[ours], io["lossaux_pi3__" + key]) <= TOL, key
  assert g["valid_mask"].dtype == bool


def test_losses_match_fixture(io):
  _, (p, d, c) = _all_jit(*_inputs(io))
  _check_fixture_terms(io, p, d, c)
  for aux in (p, d, c):
    assert rel(aux["align_scale"], io["lossaux_pi3__align_scale"]) <= TOL
    assert rel(aux["pred_norm_factor"], io["lossaux_pi3__pred_norm_factor"]) <= TOL
    assert rel(aux["gt_norm_factor"], io["lossaux_pi3__gt_norm_factor"]) <= TOL
  # the official totals, recomposed from the terms with the documented weights
  f = lambda k: float(io[k])  # noqa: E731
  pi3 = (f("loss_pi3__local_pts_loss") + f("loss_pi3__normal_loss")
         + 0.02 * f("loss_pi3__edge_loss")
         + 0.1 * (100 * f("loss_pi3__trans_loss") + f("loss_pi3__rot_loss"))
         + 0.2 * f("loss_pi3__metric_scale_loss"))
  assert abs(float(p["total"]) - pi3) <= TOL * pi3
  kd = (pi3 + 0.08 * f("loss_pi3__edge_loss") + f("loss_distill__distill_local_pts_loss")
        + 0.1 * (100 * f("loss_distill__distill_trans_loss") + f("loss_distill__distill_rot_loss"))
        + 0.5 * f("loss_distill__feat_distill_loss"))
  assert abs(float(d["total"]) - kd) <= TOL * kd
  assert abs(float(c["total"]) - 0.05 * f("loss_stage3conf__local_conf_loss")) <= TOL


# ------------------------------------------------------------------------------------------------
# branches the fixture does not take: B = 2, real / non-metric / placeholder samples, gradients


def _stack(*samples):
  """Stack per-sample input tuples (each already with B = 1) along the batch axis."""
  return jax.tree.map(lambda *xs: np.concatenate(xs, 0), *samples)


def _sample(io, *, synthetic, metric, has_gt=True, pred_scale=1.0, noise_seed=None):
  pred, teacher, gt, sf, tf, sky = _inputs(io, has_gt=[has_gt])
  gt["is_synthetic"] = np.array([float(synthetic)], np.float32)
  gt["is_metric_scale"] = np.array([float(metric)], np.float32)
  pts = pred["local_points"] * np.float32(pred_scale)
  if noise_seed is not None:
    rng = np.random.default_rng(noise_seed)
    pts = pts * np.exp(rng.normal(0.0, 0.3, pts.shape)).astype(np.float32)
  poses = pred["camera_poses"].copy()
  poses[..., :3, 3] *= np.float32(pred_scale)
  pred = dict(pred, local_points=pts, camera_poses=poses,
              metric_scale=pred["metric_scale"] / np.float32(pred_scale))
  return pred, teacher, gt, sf, tf, sky


def test_mixed_batch_flags_and_gradients(io):
  # A: a synthetic non-metric sample and a real metric one; the second is the same prediction
  # scaled by 2 (exact in fp32) with metric_scale / 2, so after normalisation both samples are
  # the fixture's: every pooled term equals the B = 1 value, and each flag-restricted term comes
  # from exactly one sample.
  batch = _stack(_sample(io, synthetic=1, metric=0),
                 _sample(io, synthetic=0, metric=1, pred_scale=2.0))
  (_, (p, d, c)), grads = _all_grad(*batch)
  _check_fixture_terms(io, p, d, c)
  s = io["lossaux_pi3__align_scale"][0]
  nf = io["lossaux_pi3__pred_norm_factor"][0]
  for aux in (p, d, c):
    assert rel(aux["align_scale"], [s, s]) <= TOL
    assert rel(aux["pred_norm_factor"], [nf, 2 * nf]) <= TOL
  # gradients w.r.t. every prediction are finite and non-zero; metric_scale only where metric
  for k, gk in grads.items():
    gk = np.asarray(gk)
    assert np.all(np.isfinite(gk)), k
    assert np.abs(gk).max() > 0, k
  gm = np.asarray(grads["metric_scale"])
  assert gm[0, 0] == 0.0 and gm[1, 0] != 0.0

  # B: the real, non-metric sample carries a very different (noisy) prediction: the normal, edge
  # and metric-scale terms (and sample 0's scale) must still be exactly the fixture's.
  batch = _stack(_sample(io, synthetic=1, metric=1),
                 _sample(io, synthetic=0, metric=0, noise_seed=0))
  (_, (p, d, c)), grads = _all_grad(*batch)
  for prefix, aux in (("loss_pi3__", p), ("loss_distill__", d)):
    for k in ("normal_loss", "edge_loss", "metric_scale_loss"):
      assert rel(aux[k], io[prefix + k]) <= TOL, (prefix, k)
    assert rel(aux["local_pts_loss"], io[prefix + "local_pts_loss"]) > 1e-2  # noisy sample pooled
    assert rel(aux["align_scale"][:1], io["lossaux_pi3__align_scale"]) <= TOL
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))

  # C: no synthetic and no metric sample -> those terms are exactly 0; the rest still match.
  batch = _stack(_sample(io, synthetic=0, metric=0), _sample(io, synthetic=0, metric=0))
  (_, (p, d, c)), _ = _all_grad(*batch)
  for aux in (p, d):
    for k in ("normal_loss", "edge_loss", "metric_scale_loss"):
      assert float(aux[k]) == 0.0, k
  assert rel(p["local_pts_loss"], io["loss_pi3__local_pts_loss"]) <= TOL
  assert rel(p["rot_loss"], io["loss_pi3__rot_loss"]) <= TOL

  # D: a placeholder sample (no GT depth) in the distillation batch: the GT terms see only the
  # first sample (= fixture values), the distillation terms use the teacher-confidence mask.
  batch = _stack(_sample(io, synthetic=1, metric=1),
                 _sample(io, synthetic=1, metric=1, has_gt=False, noise_seed=1))
  (_, (_, d, _)), grads = _all_grad(*batch)
  for k in PI3_TERMS[:-1]:
    assert rel(d[k], io["loss_distill__" + k]) <= TOL, k
  assert all(np.isfinite(float(d[k])) for k in DISTILL_TERMS)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------------------------
# helpers (no fixture needed)


@pytest.mark.parametrize("count", [1, 1000, 2048, 4096, 5000, 37632])
def test_resample_valid_is_torch_legacy_nearest(count):
  rng = np.random.default_rng(count)
  total = 40000
  mask = np.zeros(total, bool)
  mask[rng.choice(total, count, replace=False)] = True
  vals = np.arange(total, dtype=np.float32)
  out = _resample(jnp.asarray(vals).reshape(1, 1, 200, 200, 1),
                  jnp.asarray(mask).reshape(1, 1, 200, 200), 4096)
  # torch's legacy nearest (upsample_nearest1d): src = min(floor(dst * float(n / 4096)), n - 1)
  # in float32 (n == 4096: identity; 2 n == 4096: dst >> 1, both the same formula here)
  src = np.floor(np.arange(4096, dtype=np.float32) * (np.float32(count) / np.float32(4096)))
  want = vals[mask][np.minimum(src.astype(np.int64), count - 1)]
  np.testing.assert_array_equal(np.asarray(out)[0, :, 0], want)
  empty = _resample(jnp.ones((1, 1, 4, 4, 3)) * 7, jnp.zeros((1, 1, 4, 4), bool), 16)
  np.testing.assert_array_equal(np.asarray(empty), 1.0)


def test_teacher_conf_mask_per_view_quantile():
  conf = np.random.default_rng(0).normal(size=(2, 3, 8, 10, 1)).astype(np.float32)
  m = np.asarray(L.teacher_conf_mask(conf, 0.3))
  sig = 1 / (1 + np.exp(-conf[..., 0].astype(np.float64)))
  q = np.quantile(sig.reshape(2, 3, -1), 0.3, axis=-1)
  np.testing.assert_array_equal(m, sig > q[..., None, None])


def test_gt_from_pipeline_round_trip():
  rng = np.random.default_rng(0)
  b, n, h, w = 1, 2, 12, 18
  depth = rng.uniform(1, 3, (b, n, h, w)).astype(np.float32)
  valid = rng.uniform(size=(b, n, h, w)) > 0.2
  k_px = np.array([[15.0, 0, 8.3], [0, 14.0, 5.6], [0, 0, 1]], np.float32)
  k_px = np.broadcast_to(k_px, (b, n, 3, 3))
  c2w = np.tile(np.eye(4, dtype=np.float32), (b, n, 1, 1))
  c2w[0, 1, :3, 3] = [0.3, -0.1, 0.2]
  w2c = np.linalg.inv(c2w).astype(np.float32)
  g = L.gt_from_pipeline(dict(depth=depth, valid=valid, intrinsics=k_px, extrinsics=w2c))
  np.testing.assert_allclose(g["intrinsics"][0, 0, 0], [15 / w, 0, 8.8 / w], rtol=1e-6)
  np.testing.assert_allclose(g["cam2world"], c2w, atol=1e-6)
  out = _prepare_gt(g["depth"], g["intrinsics"], g["cam2world"], g["valid_mask"])
  # view 0 is the reference: its local points are the camera points / gt_norm_factor, with
  # pixel (i, j) at pixel coordinates (j, i) for a pipeline (offset 0) K
  x = (np.arange(w) - 8.3) / 15.0 * depth[0, 0]
  np.testing.assert_allclose(out["local_points"][0, 0, ..., 0] * out["norm_factor"][0], x,
                             rtol=1e-5, atol=1e-6)


def test_edge_loss_rejects_too_small_maps():
  z = jnp.ones((1, 1, 20, 40))
  with pytest.raises(ValueError, match="3x3"):
    L.edge_loss(z, z, jnp.ones((1, 1)), z > 0)
