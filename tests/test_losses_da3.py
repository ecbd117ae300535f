"""Tests of the DA3 training objective (geojax.losses.da3); tiny shapes, no model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geojax.geometry import camera, rotation, unproject
from geojax.losses import da3 as L

H = W = 14  # ray map 8 x 8
B, S = 2, 3


def _scene(seed: int = 0, valid_frac: float = 0.8) -> dict:
  """Random cameras looking roughly along +z at random positive depths (pipeline layout)."""
  rng = np.random.default_rng(seed)
  aa = rng.normal(scale=0.2, size=(B, S, 3))
  rot = np.asarray(rotation.axis_angle_to_mat(jnp.asarray(aa, jnp.float32)))
  trans = rng.normal(scale=0.5, size=(B, S, 3))
  w2c = np.zeros((B, S, 4, 4), np.float32)
  w2c[..., :3, :3] = rot
  w2c[..., :3, 3] = trans
  w2c[..., 3, 3] = 1.0
  f = rng.uniform(10.0, 16.0, size=(B, S))
  k = np.zeros((B, S, 3, 3), np.float32)
  k[..., 0, 0] = f
  k[..., 1, 1] = f * rng.uniform(0.9, 1.1, size=(B, S))
  k[..., 0, 2] = (W - 1) / 2 + rng.uniform(-1, 1, size=(B, S))
  k[..., 1, 2] = (H - 1) / 2 + rng.uniform(-1, 1, size=(B, S))
  k[..., 2, 2] = 1.0
  depth = rng.uniform(1.0, 4.0, size=(B, S, H, W)).astype(np.float32)
  valid = rng.uniform(size=(B, S, H, W)) < valid_frac
  valid[:, :, 0, 0] = True
  depth = np.where(valid, depth, 0.0).astype(np.float32)
  images = rng.integers(0, 255, size=(B, S, H, W, 3), dtype=np.uint8)
  return {"images": images, "depth": depth, "valid": valid, "intrinsics": k, "extrinsics": w2c}


def _perfect_pred(batch: dict) -> dict:
  gt, _ = L.normalize_scene(batch)
  return {"depth": gt["depth"], "depth_conf": jnp.ones_like(gt["depth"]),
          "ray": gt["ray_target"], "ray_conf": jnp.ones(gt["ray_target"].shape[:-1]),
          "extrinsics": gt["extrinsics"][..., :3, :], "intrinsics": gt["intrinsics"]}


def test_config_defaults():
  cfg = L.DA3LossConfig()
  assert (cfg.depth_weight, cfg.ray_weight, cfg.point_weight, cfg.camera_weight,
          cfg.grad_weight) == (1, 1, 1, 1, 1)
  assert cfg.conf_lambda == 0.2 and cfg.pose_cond_prob == 0.2
  assert cfg.teacher_switch_step == 120_000
  assert L.DA3LossConfig(total_steps=1000).teacher_switch_step == 600
  assert L.default_ray_hw((504, 336)) == (288, 192)


def test_normalize_scene_unit_norm_and_frame():
  batch = _scene(1)
  gt, scale = L.normalize_scene(batch)
  v = gt["valid"]
  norms = jnp.linalg.norm(gt["points"], axis=-1)
  mean = jnp.sum(jnp.where(v, norms, 0), (1, 2, 3)) / jnp.sum(v, (1, 2, 3))
  np.testing.assert_allclose(mean, 1.0, rtol=1e-5)
  np.testing.assert_allclose(gt["extrinsics"][:, 0], jnp.broadcast_to(jnp.eye(4), (B, 4, 4)),
                             atol=1e-5)
  assert gt["ray_target"].shape == (B, S, 8, 8, 6)
  assert gt["pose_enc"].shape == (B, S, 9) and scale.shape == (B,)
  # GT points agree with points composed from depth and a full-resolution ray map
  pts = unproject.points_from_depth_and_rays(
      gt["depth"], unproject.cameras_to_ray_map(gt["intrinsics"], gt["extrinsics"], H, W))
  np.testing.assert_allclose(jnp.where(v[..., None], pts, 0),
                             jnp.where(v[..., None], gt["points"], 0), atol=1e-5)


def test_normalize_scene_invariant_to_similarity():
  batch = _scene(2)
  gt, scale = L.normalize_scene(batch)
  a = 3.7
  # global rigid motion of the world (w2c @ inv(G)) and a global scale a
  g = np.eye(4, dtype=np.float32)
  g[:3, :3] = np.asarray(rotation.axis_angle_to_mat(jnp.array([0.3, -0.2, 0.5])))
  g[:3, 3] = [1.0, -2.0, 0.5]
  w2c = np.asarray(batch["extrinsics"] @ np.linalg.inv(g), np.float32)
  w2c[..., :3, 3] *= a
  moved = dict(batch, depth=batch["depth"] * a, extrinsics=w2c)
  gt2, scale2 = L.normalize_scene(moved)
  np.testing.assert_allclose(scale2, a * scale, rtol=1e-4)
  for key in ("depth", "points", "ray_target", "pose_enc", "extrinsics"):
    np.testing.assert_allclose(gt2[key], gt[key], atol=2e-4, err_msg=key)


def test_perfect_prediction_zero_loss():
  batch = _scene(3)
  pred = _perfect_pred(batch)
  total, terms = L.da3_loss(pred, batch, L.DA3LossConfig())
  for key in ("depth", "ray", "point", "camera", "grad"):
    assert abs(float(terms[key])) < 2e-5, (key, terms[key])
  assert abs(float(total)) < 1e-4
  # with conf != 1 only the -λ log c part remains for depth (mean over valid pixels)
  conf = jnp.full_like(pred["depth"], 2.0)
  _, terms = L.da3_loss(dict(pred, depth_conf=conf), batch, L.DA3LossConfig(conf_lambda=0.3))
  np.testing.assert_allclose(terms["depth"], -0.3 * math.log(2.0), atol=2e-5)


def test_depth_loss_hand_computed():
  pred = jnp.array([1.0, 2.0, 3.0, 5.0]).reshape(1, 1, 2, 2)
  gt = jnp.array([1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
  conf = jnp.array([1.0, 2.0, 1.0, 4.0]).reshape(1, 1, 2, 2)
  mask = jnp.array([True, True, True, False]).reshape(1, 1, 2, 2)
  lam = 0.2
  expect = (0.0 + (2 * 1 - lam * math.log(2)) + (1 * 2)) / 3
  np.testing.assert_allclose(L.depth_loss(pred, conf, gt, mask, lam), expect, rtol=1e-6)


def test_ray_loss_hand_computed():
  pred = jnp.zeros((1, 1, 1, 2, 6))
  gt = jnp.stack([jnp.arange(6.0), -jnp.ones(6)])[None, None]
  conf = jnp.array([[[[0.5, 3.0]]]])
  lam = 0.1
  expect = ((0.5 * 15 - lam * math.log(0.5)) + (3.0 * 6 - lam * math.log(3.0))) / 2
  np.testing.assert_allclose(L.ray_loss(pred, conf, gt, None, lam), expect, rtol=1e-6)
  mask = jnp.array([[[[True, False]]]])
  np.testing.assert_allclose(L.ray_loss(pred, conf, gt, mask, lam),
                             0.5 * 15 - lam * math.log(0.5), rtol=1e-6)


def test_point_camera_gradient_hand_computed():
  p = jnp.zeros((1, 1, 1, 2, 3))
  g = jnp.array([[1.0, -2.0, 0.5], [9.0, 9.0, 9.0]])[None, None, None]
  mask = jnp.array([[[[True, False]]]])
  np.testing.assert_allclose(L.point_loss(p, g, mask), 3.5, rtol=1e-6)

  e1 = jnp.zeros((1, 2, 9))
  e2 = e1.at[0, 0, 0].set(1.0).at[0, 1, 8].set(-3.0).at[0, 1, 3].set(0.5)
  np.testing.assert_allclose(L.camera_loss(e1, e2), (1.0 + 3.5) / 2, rtol=1e-6)

  pred = jnp.array([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])[None, None]
  gt = jnp.zeros((1, 1, 2, 3))
  mask = jnp.array([[True, True, True], [True, False, True]])[None, None]
  # x pairs valid: (0,0-1) |1|, (0,1-2) |2|; row 1 pairs touch the invalid pixel -> 2 pairs
  # y pairs valid: col 0 |2-0|=2, col 2 |2-3|=1 -> 2 pairs
  np.testing.assert_allclose(L.gradient_loss(pred, gt, mask), 1.5 + 1.5, rtol=1e-6)


def test_compose_points_exact_upsampling():
  batch = _scene(4)
  gt, _ = L.normalize_scene(batch)
  pts = L.compose_points(gt["depth"], gt["ray_target"])
  v = gt["valid"][..., None]
  np.testing.assert_allclose(jnp.where(v, pts, 0), jnp.where(v, gt["points"], 0), atol=2e-5)


def test_camera_encoding_matches_decoder_convention():
  batch = _scene(5)
  gt, _ = L.normalize_scene(batch)
  c2w, k = camera.decode_pose(gt["pose_enc"], (H, W))
  np.testing.assert_allclose(camera.to_homogeneous(c2w),
                             camera.rigid_inverse(gt["extrinsics"]), atol=1e-5)
  pred = {"pose_enc": gt["pose_enc"] + 0.1}
  np.testing.assert_allclose(L.predicted_pose_enc(pred, (H, W)), gt["pose_enc"] + 0.1)


def test_masks_respected():
  batch = _scene(6, valid_frac=0.6)
  rng = np.random.default_rng(0)
  pred = _perfect_pred(batch)
  pred = {k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in pred.items()}
  pred["depth_conf"] = 1.0 + jnp.abs(pred["depth_conf"])
  pred["ray_conf"] = 1.0 + jnp.abs(pred["ray_conf"])
  cfg = L.DA3LossConfig()
  total, _ = L.da3_loss(pred, batch, cfg)
  inv = ~batch["valid"]
  junk = rng.uniform(-50, 50, size=inv.shape).astype(np.float32)
  batch2 = dict(batch, depth=np.where(inv, junk, batch["depth"]))
  pred2 = dict(pred, depth=jnp.where(inv, junk * 3, pred["depth"]),
               depth_conf=jnp.where(inv, jnp.nan, pred["depth_conf"]))
  total2, _ = L.da3_loss(pred2, batch2, cfg)
  np.testing.assert_allclose(total2, total, rtol=1e-6)


def test_grad_finite_and_jit():
  batch = _scene(7)
  rng = np.random.default_rng(1)
  pred = _perfect_pred(batch)
  pred = {k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in pred.items()}
  raw = {"dc": jnp.zeros_like(pred["depth_conf"]), "rc": jnp.zeros_like(pred["ray_conf"])}
  params = {"depth": pred["depth"], "ray": pred["ray"], "extrinsics": pred["extrinsics"],
            "intrinsics": pred["intrinsics"], **raw}
  cfg = L.DA3LossConfig()

  def loss_fn(p, b):
    out = {"depth": p["depth"], "ray": p["ray"], "extrinsics": p["extrinsics"],
           "intrinsics": p["intrinsics"], "depth_conf": 1.0 + jnp.exp(p["dc"]),
           "ray_conf": 1.0 + jnp.exp(p["rc"])}
    return L.da3_loss(out, b, cfg)[0]

  jb = {k: batch[k] for k in ("depth", "valid", "intrinsics", "extrinsics")}
  val, grads = jax.jit(jax.value_and_grad(loss_fn))(params, jb)
  np.testing.assert_allclose(val, loss_fn(params, jb), rtol=1e-5)
  assert np.isfinite(float(val)) and float(val) > 0
  for k, g in grads.items():
    assert np.all(np.isfinite(np.asarray(g))), k
  assert float(jnp.abs(grads["depth"]).sum()) > 0 and float(jnp.abs(grads["ray"]).sum()) > 0


def test_teacher_alignment_recovers_scale_shift():
  rng = np.random.default_rng(2)
  teacher = rng.uniform(0.5, 2.0, size=(2, 2, 16, 16)).astype(np.float32)
  s_true = np.array([[2.5, 0.7], [1.3, 4.0]], np.float32)
  t_true = np.array([[0.3, -0.1], [1.0, 0.0]], np.float32)
  gt = s_true[..., None, None] * teacher + t_true[..., None, None]
  mask = rng.uniform(size=gt.shape) < 0.3
  outl = mask & (rng.uniform(size=gt.shape) < 0.1)
  gt_noisy = np.where(outl, gt + 5.0, gt).astype(np.float32)
  labels, s, t = L.teacher_labels(teacher, gt_noisy, mask, seed=0)
  np.testing.assert_allclose(s, s_true, rtol=1e-3)
  np.testing.assert_allclose(t, t_true, atol=1e-3)
  np.testing.assert_allclose(labels, gt, rtol=1e-3, atol=1e-3)


def test_depth_target_switch():
  cfg = L.DA3LossConfig(total_steps=100)
  gt, teacher = jnp.zeros((1, 1, 2, 2)), jnp.ones((1, 1, 2, 2))
  f = jax.jit(lambda s: L.depth_target(s, gt, teacher, cfg))
  assert float(f(59).sum()) == 0.0
  assert float(f(60).sum()) == 4.0
  assert float(L.depth_target(0, gt, teacher).sum()) == 0.0


@pytest.mark.parametrize("prob", [0.2])
def test_pose_condition_mask_rate(prob):
  m = L.pose_condition_mask(jax.random.PRNGKey(0), 20_000, prob)
  assert m.shape == (20_000,) and m.dtype == jnp.bool_
  assert abs(float(m.mean()) - prob) < 0.015
  m2 = L.pose_condition_mask(jax.random.PRNGKey(1), 20_000, prob)
  assert not np.array_equal(np.asarray(m), np.asarray(m2))
