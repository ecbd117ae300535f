"""DA3 pieces that need no reference network: errors, scan vs loop, ray pose, I/O."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.convert import da3 as conv
from geojax.geometry import camera
from geojax.geometry.ray_pose import pose_from_rays
from geojax.models.da3 import DA3
from xla_env import xla_flags


@pytest.fixture(scope="module")
def small():
  return DA3.from_preset("da3-small", rngs=nnx.Rngs(0))


def test_bad_inputs_raise_clear_errors(small):
  x = jnp.zeros((1, 2, 28, 42, 3))
  with pytest.raises(ValueError, match="multiples of 14"):
    small(jnp.zeros((1, 2, 30, 42, 3)))
  with pytest.raises(ValueError, match=r"\(B, S, H, W, 3\)"):
    small(jnp.zeros((2, 28, 42, 3)))
  with pytest.raises(ValueError, match="extrinsics"):
    small(x, jnp.zeros((1, 3, 4, 4)), jnp.zeros((1, 2, 3, 3)))
  with pytest.raises(ValueError, match="together"):
    small(x, jnp.zeros((1, 2, 4, 4)))
  with pytest.raises(ValueError, match="ref_view_strategy"):
    small(x, ref_view_strategy="best")
  with pytest.raises(ValueError, match="unknown DA3 preset"):
    DA3.from_preset("da3-huge", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="export_feat_layers"):
    small(x, export_feat_layers=(12,))


def test_scan_equals_unrolled(small):
  loop = conv.from_torch_state_dict(conv.to_torch_state_dict(small), "da3-small", scan=False)
  x = jax.random.normal(jax.random.key(1), (1, 3, 28, 42, 3))
  a, b = small(x), loop(x)
  for k in ("depth", "ray", "extrinsics"):
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-5)


def test_wrong_checkpoint_is_rejected(small):
  sd = conv.to_torch_state_dict(small)
  with pytest.raises(ValueError, match="does not fit preset|missing"):
    conv.from_torch_state_dict(sd, "da3-base")
  sd2 = dict(sd)
  sd2["backbone.pretrained.mask_token"] = np.zeros((1, 384), np.float32)
  with pytest.warns(UserWarning, match="mask_token"):
    conv.from_torch_state_dict(sd2, "da3-small")


def test_safetensors_round_trip_and_preset_inference(small, tmp_path):
  conv.save_official(small, tmp_path / "ckpt")
  with pytest.raises(FileExistsError):
    conv.save_official(small, tmp_path / "ckpt")
  back = conv.load_official(tmp_path / "ckpt")  # preset inferred from shapes
  a, b = conv.to_torch_state_dict(small), conv.to_torch_state_dict(back)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(ValueError, match="no such checkpoint"):
    conv.load_official(tmp_path / "nothing")


def _synthetic_rays(h, w, k_img, c2w, image_hw):
  hh, ww = image_hw
  # pixel centres of an (h, w) map in image pixels
  u = (np.arange(w) + 0.5) * ww / w
  v = (np.arange(h) + 0.5) * hh / h
  uu, vv = np.meshgrid(u, v)
  pix = np.stack([uu, vv, np.ones_like(uu)], -1)
  d_cam = pix @ np.linalg.inv(k_img).T
  d_world = d_cam @ c2w[:3, :3].T
  origin = np.broadcast_to(c2w[:3, 3], d_world.shape)
  return np.concatenate([d_world, origin], -1).astype(np.float32)


def test_ray_pose_recovers_exact_camera():
  hh, ww, h, w = 280, 504, 40, 72
  rng = np.random.RandomState(0)
  q, r = np.linalg.qr(rng.randn(3, 3))
  q = q * np.sign(np.diag(r))
  q[:, 0] *= np.sign(np.linalg.det(q))
  c2w = np.eye(4)
  c2w[:3, :3], c2w[:3, 3] = q, rng.randn(3)
  k = np.array([[400.0, 0, ww / 2], [0, 380.0, hh / 2], [0, 0, 1]])
  ray = _synthetic_rays(h, w, k, c2w, (hh, ww))[None, None]
  conf = np.ones((1, 1, h, w), np.float32)
  w2c, kk = pose_from_rays(jnp.asarray(ray), jnp.asarray(conf), (hh, ww), seed=0)
  want = np.linalg.inv(c2w)[:3]
  np.testing.assert_allclose(np.asarray(w2c)[0, 0], want, atol=2e-4)
  np.testing.assert_allclose(np.asarray(kk)[0, 0], k, rtol=2e-4, atol=0.05)


def test_ray_pose_matches_official_on_noise_free_rays():
  torch = pytest.importorskip("torch")
  pytest.importorskip("depth_anything_3")
  from depth_anything_3.utils.ray_utils import get_extrinsic_from_camray
  hh, ww, h, w = 112, 168, 32, 48
  c2w = np.eye(4)
  c2w[:3, :3] = np.asarray(camera.quat_to_mat(jnp.array([0.1, -0.2, 0.05, 0.97])))
  c2w[:3, 3] = [0.3, -0.1, 1.0]
  k = np.array([[150.0, 0, ww / 2], [0, 140.0, hh / 2], [0, 0, 1]])
  ray = _synthetic_rays(h, w, k, c2w, (hh, ww))[None, None]
  conf = (1 + np.random.RandomState(1).rand(1, 1, h, w)).astype(np.float32)
  ext, f, pp = get_extrinsic_from_camray(torch.from_numpy(ray), torch.from_numpy(conf), h, w)
  w2c_ref = np.linalg.inv(ext[0, 0].numpy())[:3]
  w2c, kk = pose_from_rays(jnp.asarray(ray), jnp.asarray(conf), (hh, ww))
  np.testing.assert_allclose(np.asarray(w2c)[0, 0], w2c_ref, atol=1e-4)
  np.testing.assert_allclose(np.asarray(kk)[0, 0, 0, 0], f[0, 0, 0].item() / 2 * ww, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(kk)[0, 0, 1, 2], pp[0, 0, 1].item() * hh / 2, rtol=1e-4)


def test_ray_pose_through_model(small):
  out = small(jnp.zeros((1, 2, 28, 42, 3)), use_ray_pose=True)
  assert out["extrinsics"].shape == (1, 2, 3, 4) and out["intrinsics"].shape == (1, 2, 3, 3)


def test_pose_normalisation():
  ext = np.tile(np.eye(4, dtype=np.float32), (1, 3, 1, 1))
  ext[0, 1, :3, 3] = [2, 0, 0]
  ext[0, 2, :3, 3] = [0, 4, 0]
  n = np.asarray(camera.normalize_extrinsics(jnp.asarray(ext)))
  np.testing.assert_allclose(n[0, 0], np.eye(4), atol=1e-6)
  np.testing.assert_allclose(n[0, 1, :3, 3], [1, 0, 0], atol=1e-6)  # lower median = 2


def test_quaternion_round_trip():
  q = jax.random.normal(jax.random.key(0), (16, 4))
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  q = jnp.where(q[:, 3:] < 0, -q, q)
  np.testing.assert_allclose(np.asarray(camera.mat_to_quat(camera.quat_to_mat(q))),
                             np.asarray(q), atol=1e-5)


def test_tree_mode_and_mesh():
  """Same model under NNX tree mode, and created sharded on an 8-device CPU mesh."""
  code = r"""
import jax, numpy as np
from flax import nnx
from geojax.models.da3 import DA3
from geojax.parallel import sharding
fwd = nnx.jit(lambda m, x: m(x)["depth"])  # compiled: eager op-by-op dispatch is slow on CPU
m = DA3.from_preset("da3-small", rngs=nnx.Rngs(0))
y = {"depth": fwd(m, np.zeros((1, 2, 28, 28, 3), np.float32))}
mesh = sharding.make_mesh((2, 2, 2))
with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
  ms = nnx.jit(lambda: DA3.from_preset("da3-small", rngs=nnx.Rngs(0)))()
  spec = ms.backbone.vit.stacks[1].layers.mlp.fc1.kernel[...].sharding.spec
  ys = {"depth": fwd(ms, np.zeros((1, 2, 28, 28, 3), np.float32))}
print("SPEC", spec, float(np.abs(np.asarray(ys["depth"]) - np.asarray(y["depth"])).max()))
"""
  env = dict(os.environ, NNX_GRAPH_MODE="false", NNX_GRAPH_UPDATES="false",
             XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  line = [l for l in r.stdout.splitlines() if l.startswith("SPEC")][0]
  assert "fsdp" in line and "tensor" in line, line
  assert float(line.split()[-1]) < 1e-4, line
