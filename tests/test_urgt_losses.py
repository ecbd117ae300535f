"""URGT objective, targets and training priors (geojax.losses.urgt): values that would change if
any term were wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geojax.losses import urgt as L


def test_disparity_target_normalises_and_inverts():
  depth = jnp.array([[[1.0, 2.0], [4.0, 0.0]]])  # one invalid pixel
  valid = depth > 0
  t, lo, hi = L.disparity_target(depth, valid)
  np.testing.assert_allclose(t[0], [[1.0, 1 / 3], [0.0, 0.0]], atol=1e-6)
  assert float(lo[0]) == pytest.approx(0.25) and float(hi[0]) == pytest.approx(1.0)
  back = L.to_depth(t, lo, hi)
  np.testing.assert_allclose(back[0][valid[0]], depth[0][valid[0]], rtol=1e-5)


def test_gradient_matching_scales_and_ignores_offsets():
  x = jnp.tile(jnp.arange(16.0), (1, 16, 1))  # residual = column index
  mask = jnp.ones((1, 16, 16), bool)
  # x-differences 1, 2, 4, 8 at the four scales, y-differences 0: (1 + 2 + 4 + 8) / 4
  assert float(L.gradient_matching(x, mask)) == pytest.approx(3.75)
  assert float(L.gradient_matching(x * 0 + 5.0, mask)) == 0.0  # a constant offset is free
  # pairs touching an invalid pixel do not count
  m = mask.at[:, :, 8].set(False)
  assert float(L.gradient_matching(x, m, scales=1)) == pytest.approx(1.0)


def test_urgt_loss_terms():
  b, h, w = 1, 8, 8
  t = jnp.linspace(0, 1, h * w).reshape(b, h, w)
  n = jnp.zeros((b, h, w, 3)).at[..., 2].set(-1.0)
  valid = jnp.ones((b, h, w), bool)
  loss, parts = L.urgt_loss(t, n, t, valid, n, valid)
  # zero but for the angle's floor, arccos(1 - 1e-6) = 1.4e-3 rad (finite gradients)
  assert float(loss) == pytest.approx(np.arccos(1 - 1e-6), abs=1e-5)
  # depth off by a constant 0.1: MSE 0.01, no gradient term; normals at 90 degrees
  n90 = jnp.zeros((b, h, w, 3)).at[..., 0].set(1.0)
  loss, parts = L.urgt_loss(t + 0.1, n90, t, valid, n, valid, grad_weight=0.5)
  assert float(parts["depth_mse"]) == pytest.approx(0.01, rel=1e-4)
  assert float(parts["depth_grad"]) == pytest.approx(0.0, abs=1e-6)
  assert float(parts["normal_angle_deg"]) == pytest.approx(90.0, abs=1e-3)
  assert float(parts["normal_mse"]) == pytest.approx(2.0, rel=1e-5)
  assert float(loss) == pytest.approx(0.01 + np.pi / 2 + 2.0, rel=1e-4)
  g = jax.grad(lambda d: L.urgt_loss(d, n90, t, valid, n, valid)[0])(t + 0.1)
  assert np.isfinite(np.asarray(g)).all()


def test_pseudo_normals_of_a_plane():
  """A fronto-parallel wall at depth 2 and a floor: the fitted normals face the camera."""
  h, w = 12, 16
  k = jnp.array([[[10.0, 0, (w - 1) / 2], [0, 10.0, (h - 1) / 2], [0, 0, 1]]])
  depth = jnp.full((1, h, w), 2.0)
  n, ok = L.pseudo_normals(depth, k, depth > 0)
  np.testing.assert_allclose(n[0][ok[0]], np.tile([0, 0, -1.0], (int(ok.sum()), 1)),
                             atol=1e-4)


def test_degraded_prior_is_coarse_distorted_and_normalised():
  """The training prior keeps the target's layout (strong correlation) but not its values (a
  systematic gamma and blur), lies in [0, 1], and is deterministic in the key."""
  yy, xx = np.mgrid[0:64, 0:64]
  depth = jnp.asarray(1.0 + (xx > 32) * 2.0 + yy / 64.0, jnp.float32)[None]
  valid = jnp.ones_like(depth, bool)
  t, lo, hi = L.disparity_target(depth, valid)
  key = jax.random.key(0)
  p = L.degraded_prior(t, valid, key, factor=8, gamma=0.7, noise=0.05)
  assert float(p.min()) == pytest.approx(0.0, abs=1e-6)
  assert float(p.max()) == pytest.approx(1.0, abs=1e-6)
  corr = np.corrcoef(np.ravel(p), np.ravel(t))[0, 1]
  err = float(jnp.abs(p - t).mean())
  assert corr > 0.9 and err > 0.02, (corr, err)
  np.testing.assert_array_equal(p, L.degraded_prior(t, valid, key, factor=8))
  n = L.prior_normals(p, lo, hi, jnp.array([[[40.0, 0, 31.5], [0, 40.0, 31.5], [0, 0, 1]]]))
  np.testing.assert_allclose(jnp.linalg.norm(n, axis=-1), 1.0, atol=1e-4)
