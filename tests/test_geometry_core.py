"""Geometry core against independent references: SciPy rotations (float64), NumPy closed forms,
round trips through the DA3 ray solver, analytic planes, and synthetic edge images."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from geojax import geometry as g
from geojax.geometry import camera


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """These tests compile many small programs; XLA's optimisation passes dominate their cost."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


class _Jitted:
  """``J.name`` is ``jax.jit(geojax.geometry.name)`` with its shape-like arguments static (eager
  dispatch compiles every primitive separately, which is slow on small CPU machines)."""

  _static = {
      "pixel_grid": ("h", "w", "offset", "dtype"), "camera_rays": ("h", "w", "offset"),
      "depth_to_camera_points": ("offset",), "depth_to_world_points": ("offset",),
      "project": ("eps",), "cameras_to_ray_map": ("h", "w", "offset"),
      "normals_from_depth": ("window", "offset", "min_points"),
      "depth_edges": ("rtol", "kernel_size", "atol"), "intrinsics_from_fov": ("h", "w"),
      "fov_from_intrinsics": ("h", "w"), "scale_intrinsics": ("offset",),
      "relative_pose": ("c2w",), "encode_pose": ("image_hw",),
      "pose_from_rays": ("image_hw", "seed"),
  }

  def __getattr__(self, name):
    fn = jax.jit(getattr(g, name), static_argnames=self._static.get(name, ()))
    setattr(self, name, fn)
    return fn


J = _Jitted()


def _rotations(n, seed):
  return Rotation.random(n, random_state=seed)


def _near_pi(n, seed):
  rng = np.random.default_rng(seed)
  axis = rng.normal(size=(n, 3))
  axis /= np.linalg.norm(axis, axis=1, keepdims=True)
  angle = np.pi - 10.0 ** rng.uniform(-6, -1, n)
  return Rotation.from_rotvec(axis * angle[:, None])


def _near_zero(n, seed):
  rng = np.random.default_rng(seed)
  axis = rng.normal(size=(n, 3))
  axis /= np.linalg.norm(axis, axis=1, keepdims=True)
  rv = axis * 10.0 ** rng.uniform(-7, -2, n)[:, None]
  rv[:3] = [[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [3e-4, -2e-4, 1e-4]]  # incl. exactly the identity
  return Rotation.from_rotvec(rv)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _w2c(n, seed):
  rng = np.random.default_rng(seed)
  r = _rotations(n, seed).as_matrix()
  return np.concatenate([r, rng.normal(size=(n, 3, 1))], -1)


# ---------------------------------------------------------------- rotations


@pytest.mark.parametrize("make", [_rotations, _near_pi, _near_zero])
def test_quaternion_matrix_against_scipy(make):
  rot = make(300, 1)
  m = rot.as_matrix()
  q_ref = rot.as_quat()
  q_ref = np.where(q_ref[:, 3:] < 0, -q_ref, q_ref)
  q = np.asarray(J.mat_to_quat(_f32(m)))
  assert (q[:, 3] >= 0).all()
  # w can be ~0 near 180 degrees, where q and -q both satisfy w >= 0 up to rounding
  err = np.minimum(np.abs(q - q_ref).max(1), np.abs(q + q_ref).max(1))
  np.testing.assert_array_less(err, 1e-6)
  np.testing.assert_allclose(np.asarray(J.quat_to_mat(_f32(q_ref))), m, atol=1e-6)
  # not-unit quaternions are normalised through 2 / |q|^2
  np.testing.assert_allclose(np.asarray(J.quat_to_mat(_f32(3.0 * q_ref))), m, atol=1e-6)
  # matrix -> quaternion -> matrix
  np.testing.assert_allclose(np.asarray(J.quat_to_mat(J.mat_to_quat(_f32(m)))), m, atol=1e-6)


def test_camera_module_still_exports_quaternions():
  assert camera.quat_to_mat is g.rotation.quat_to_mat
  assert camera.mat_to_quat is g.rotation.mat_to_quat


@pytest.mark.parametrize("make", [_rotations, _near_pi, _near_zero])
def test_axis_angle_against_scipy(make):
  rot = make(300, 2)
  m, rv = rot.as_matrix(), rot.as_rotvec()
  np.testing.assert_allclose(np.asarray(J.axis_angle_to_mat(_f32(rv))), m, atol=1e-6)
  rv_j = np.asarray(J.mat_to_axis_angle(_f32(m)), np.float64)
  # compare as rotations (near pi, rv and -rv are the same rotation) and by angle
  np.testing.assert_allclose(Rotation.from_rotvec(rv_j).as_matrix(), m, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(rv_j, axis=-1), rot.magnitude(), atol=1e-6,
                             rtol=1e-5)
  far = rot.magnitude() < np.pi - 1e-3
  np.testing.assert_allclose(rv_j[far], rv[far], atol=1e-6, rtol=1e-5)
  q = np.asarray(J.axis_angle_to_quat(_f32(rv)))
  q_ref = rot.as_quat()
  err = np.minimum(np.abs(q - q_ref).max(1), np.abs(q + q_ref).max(1))
  np.testing.assert_array_less(err, 1e-6)


def test_axis_angle_is_smooth_at_the_identity():
  # values near and at zero are covered by the parametrised SciPy tests (_near_zero)
  grad = jax.jit(jax.grad(lambda v: g.axis_angle_to_mat(v)[0, 1]))(jnp.zeros(3))
  np.testing.assert_allclose(np.asarray(grad), [0.0, 0.0, -1.0], atol=1e-7)
  grad = jax.jit(jax.grad(lambda m: g.mat_to_axis_angle(m).sum()))(jnp.eye(3))
  assert np.isfinite(np.asarray(grad)).all()


def test_geodesic_distance_against_scipy():
  a, b = _rotations(300, 3), _rotations(300, 4)
  want = (a.inv() * b).magnitude()
  got = np.asarray(J.geodesic_distance(_f32(a.as_matrix()), _f32(b.as_matrix())))
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(
      np.asarray(J.geodesic_distance_deg(_f32(a.as_matrix()), _f32(b.as_matrix()))),
      np.rad2deg(want), atol=2e-4)
  # tiny and near-pi angles (where arccos of the trace loses everything in float32)
  for rot in (_near_zero(300, 5), _near_pi(300, 6)):
    got = np.asarray(J.rotation_angle(_f32(rot.as_matrix())))
    np.testing.assert_allclose(got, rot.magnitude(), atol=1e-6, rtol=1e-4)
  # identical inputs: exactly zero with a finite gradient
  eye = jnp.eye(3)
  assert float(J.geodesic_distance(eye, eye)) == 0.0
  grad = jax.jit(jax.grad(lambda m: g.geodesic_distance(m, eye)))(eye)
  assert np.isfinite(np.asarray(grad)).all()
  # slightly non-orthogonal input stays finite (no arccos domain error)
  assert np.isfinite(float(J.rotation_angle(1.0001 * eye)))


def test_svd_orthogonalize():
  rng = np.random.default_rng(0)
  r = _rotations(50, 7).as_matrix()
  # exact rotations with arbitrary row scales are returned unchanged
  scaled = r * rng.uniform(0.5, 3.0, (50, 3, 1))
  out = np.asarray(J.svd_orthogonalize(_f32(scaled.reshape(50, 9))))
  np.testing.assert_allclose(out, r, atol=1e-5)
  # noisy rotations: a proper rotation, equal to the projection of the row-normalised matrix
  noisy = r + 0.05 * rng.normal(size=r.shape)
  out = np.asarray(J.svd_orthogonalize(_f32(noisy)), np.float64)
  np.testing.assert_allclose(out @ np.swapaxes(out, -1, -2), np.broadcast_to(np.eye(3), out.shape),
                             atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(out), 1.0, atol=1e-5)
  rows = noisy / np.linalg.norm(noisy, axis=-1, keepdims=True)
  u, _, vt = np.linalg.svd(rows)  # nearest rotation (Kabsch) to the row-normalised matrix
  d = np.sign(np.linalg.det(u @ vt))
  want = u @ (np.eye(3)[None] * np.stack([np.ones(50), np.ones(50), d], -1)[:, None]) @ vt
  np.testing.assert_allclose(out, want, atol=1e-5)
  assert geodesic_close(out, r, 0.2)
  # reflections are turned into proper rotations
  refl = r.copy()
  refl[:, :, 0] *= -1
  np.testing.assert_allclose(np.linalg.det(np.asarray(J.svd_orthogonalize(_f32(refl)))), 1.0,
                             atol=1e-5)
  # bf16 input is computed in float32
  assert J.svd_orthogonalize(jnp.asarray(noisy, jnp.bfloat16)).dtype == jnp.float32


def geodesic_close(a, b, tol):
  return bool((np.asarray(J.geodesic_distance(_f32(a), _f32(b))) < tol).all())


# ---------------------------------------------------------------- camera


def test_pose_algebra():
  w2c = _w2c(6, 8)
  inv = np.linalg.inv(np.asarray(J.to_homogeneous(_f32(w2c)), np.float64))
  np.testing.assert_allclose(np.asarray(J.invert_pose(_f32(w2c))), inv[:, :3], atol=1e-5)
  np.testing.assert_allclose(np.asarray(J.w2c_to_c2w(J.to_homogeneous(_f32(w2c)))), inv,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(J.camera_center(_f32(w2c))), inv[:, :3, 3], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(J.to_3x4(J.to_homogeneous(_f32(w2c)))),
                                np.float32(w2c))
  np.testing.assert_array_equal(np.asarray(J.make_pose(_f32(w2c[..., :3]), _f32(w2c[..., 3]))),
                                np.float32(w2c))
  a, b = _f32(w2c[:3]), _f32(w2c[3:])
  ha = np.concatenate([w2c[:3], np.tile([[[0, 0, 0, 1.0]]], (3, 1, 1))], 1)
  hb = np.concatenate([w2c[3:], np.tile([[[0, 0, 0, 1.0]]], (3, 1, 1))], 1)
  rel = np.asarray(J.relative_pose(a, b))
  np.testing.assert_allclose(rel, (hb @ np.linalg.inv(ha))[:, :3], atol=1e-5)
  # the relative pose maps a's camera coordinates to b's
  x_world = np.random.default_rng(0).normal(size=(3, 3))
  x_a = np.einsum("nij,nj->ni", ha[:, :3, :3], x_world) + ha[:, :3, 3]
  x_b = np.einsum("nij,nj->ni", hb[:, :3, :3], x_world) + hb[:, :3, 3]
  np.testing.assert_allclose(np.einsum("nij,nj->ni", rel[:, :, :3], x_a) + rel[:, :, 3], x_b,
                             atol=1e-5)
  rel_c2w = np.asarray(J.relative_pose(J.invert_pose(a), J.invert_pose(b), c2w=True))
  np.testing.assert_allclose(rel_c2w, np.linalg.inv(hb @ np.linalg.inv(ha))[:, :3], atol=1e-5)
  assert J.relative_pose(J.to_homogeneous(a), b).shape == (3, 4, 4)
  np.testing.assert_allclose(np.asarray(J.relative_pose(a, a)), np.tile(np.eye(4)[:3], (3, 1, 1)),
                             atol=1e-5)


def test_intrinsics_fov_round_trip():
  h, w = 280, 504
  fov_h, fov_w = np.deg2rad([40.0, 55.0]), np.deg2rad([65.0, 80.0])
  k = np.asarray(J.intrinsics_from_fov(_f32(fov_h), _f32(fov_w), h, w))
  assert k.shape == (2, 3, 3) and k.dtype == np.float32
  np.testing.assert_allclose(k[:, 1, 1], (h / 2) / np.tan(fov_h / 2), rtol=1e-6)
  np.testing.assert_allclose(k[:, 0, 0], (w / 2) / np.tan(fov_w / 2), rtol=1e-6)
  np.testing.assert_allclose(k[:, :2, 2], [[w / 2, h / 2]] * 2)
  got_h, got_w = J.fov_from_intrinsics(_f32(k), h, w)
  np.testing.assert_allclose(np.asarray(got_h), fov_h, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got_w), fov_w, rtol=1e-6)
  # consistent with the 9-D pose encoding
  enc = J.encode_pose(jnp.eye(4)[None].repeat(2, 0), _f32(k), (h, w))
  np.testing.assert_allclose(np.asarray(enc[:, 7:]), np.stack([fov_h, fov_w], -1), rtol=1e-6)
  k2 = np.asarray(J.intrinsics_from_fov(got_h, got_w, h, w))
  np.testing.assert_allclose(k2, k, rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_scale_intrinsics_matches_resize_mapping(offset):
  k = np.array([[300.0, 0.0, 250.0], [0.0, 280.0, 140.0], [0.0, 0.0, 1.0]])
  sx, sy = 0.25, 2.0
  ks = np.asarray(J.scale_intrinsics(_f32(k), sx, sy, offset=offset), np.float64)
  pts = np.random.default_rng(1).uniform([-1, -1, 2], [1, 1, 5], (20, 3))
  uv = (pts @ k.T)[:, :2] / pts[:, 2:]
  uv_s = (pts @ ks.T)[:, :2] / pts[:, 2:]
  s = np.array([sx, sy])
  # pixel index i (centre at i + offset) of the old image lands at index (i + 0.5) s - 0.5 of the
  # new one (area alignment, as geojax.nn.resize): coordinate c -> (c - offset + 0.5) s - 0.5 + offset
  np.testing.assert_allclose(uv_s, (uv - offset + 0.5) * s - 0.5 + offset, atol=1e-3)


# ---------------------------------------------------------------- unprojection and ray maps


def _camera(h, w):
  return np.array([[0.9 * w, 0.0, w / 2 + 3.0], [0.0, 0.85 * w, h / 2 - 2.0], [0.0, 0.0, 1.0]])


def test_pixel_grid_convention():
  grid = np.asarray(J.pixel_grid(3, 4))
  assert grid.shape == (3, 4, 2) and grid.dtype == np.float32
  np.testing.assert_array_equal(grid[2, 1], [1.0, 2.0])  # (u = column, v = row)
  np.testing.assert_array_equal(np.asarray(J.pixel_grid(3, 4, offset=0.5))[0, 0], [0.5, 0.5])


def test_depth_points_project_round_trip():
  h, w = 12, 16
  rng = np.random.default_rng(2)
  depth = rng.uniform(1.0, 5.0, (2, h, w)).astype(np.float32)
  k = np.stack([_camera(h, w), _camera(h, w) * [[1.1], [1.0], [1.0]]])
  pts = J.depth_to_camera_points(_f32(depth), _f32(k))
  assert pts.shape == (2, h, w, 3) and pts.dtype == jnp.float32
  pts = np.asarray(pts, np.float64)
  # NumPy closed form
  vv, uu = np.mgrid[:h, :w].astype(np.float64)
  for i in range(2):
    fx, fy, cx, cy = k[i, 0, 0], k[i, 1, 1], k[i, 0, 2], k[i, 1, 2]
    want = np.stack([(uu - cx) / fx * depth[i], (vv - cy) / fy * depth[i], depth[i]], -1)
    np.testing.assert_allclose(pts[i], want, rtol=1e-5, atol=1e-5)
  uv, z = J.project(_f32(pts), _f32(k))
  np.testing.assert_allclose(np.asarray(z), depth, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(uv), np.broadcast_to(np.stack([uu, vv], -1), uv.shape),
                             atol=1e-4)


def test_world_transforms_and_ray_map():
  h, w = 10, 14
  rng = np.random.default_rng(3)
  w2c = _w2c(3, 9)
  k = np.stack([_camera(h, w)] * 3)
  depth = rng.uniform(1.0, 4.0, (3, h, w)).astype(np.float32)
  world = np.asarray(J.depth_to_world_points(_f32(depth), _f32(k), _f32(w2c)), np.float64)
  cam = np.asarray(J.depth_to_camera_points(_f32(depth), _f32(k)), np.float64)
  # independent: x_world = inv(w2c) x_cam in homogeneous coordinates
  hom = np.concatenate([w2c, np.tile([[[0, 0, 0, 1.0]]], (3, 1, 1))], 1)
  c2w = np.linalg.inv(hom)
  want = np.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], cam) + c2w[:, None, None, :3, 3]
  np.testing.assert_allclose(world, want, atol=1e-4)
  np.testing.assert_allclose(np.asarray(J.world_to_camera(_f32(world), _f32(w2c))), cam, atol=1e-4)
  np.testing.assert_allclose(np.asarray(J.camera_to_world(_f32(cam), _f32(hom))), want, atol=1e-4)
  ray = np.asarray(J.cameras_to_ray_map(_f32(k), _f32(w2c), h, w))
  assert ray.shape == (3, h, w, 6)
  np.testing.assert_allclose(ray[..., 3:], np.broadcast_to(c2w[:, None, None, :3, 3], (3, h, w, 3)),
                             atol=1e-5)
  # the direction is unnormalised with camera-frame z = 1
  d_cam = np.einsum("bij,bhwj->bhwi", hom[:, :3, :3], ray[..., :3].astype(np.float64))
  np.testing.assert_allclose(d_cam[..., 2], 1.0, atol=1e-5)
  pts = np.asarray(J.points_from_depth_and_rays(_f32(depth), _f32(ray)))
  np.testing.assert_allclose(pts, want, atol=1e-4)
  # a single camera for a batch of maps broadcasts
  one = np.asarray(J.depth_to_world_points(_f32(depth), _f32(k[0]), _f32(w2c[0])))
  np.testing.assert_allclose(one[0], world[0], atol=1e-5)


def test_ray_map_round_trip_through_pose_from_rays():
  hh, ww = 48, 64
  w2c = _w2c(3, 10)
  k = np.array([[[60.0, 0.0, ww / 2], [0.0, 55.0, hh / 2], [0.0, 0.0, 1.0]],
                [[45.0, 0.0, ww / 2], [0.0, 50.0, hh / 2], [0.0, 0.0, 1.0]],
                [[80.0, 0.0, ww / 2], [0.0, 80.0, hh / 2], [0.0, 0.0, 1.0]]])
  # DA3's solver reads pixel j at j + 0.5 and assumes a centred principal point
  ray = J.cameras_to_ray_map(_f32(k), _f32(w2c), hh, ww, offset=0.5)
  conf = jnp.ones(ray.shape[:-1])
  got_w2c, got_k = J.pose_from_rays(ray[None], conf[None], (hh, ww), seed=0)
  assert got_w2c.shape == (1, 3, 3, 4)  # w2c 3x4
  np.testing.assert_allclose(np.asarray(got_w2c[0]), w2c, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got_k[0]), k, rtol=1e-4, atol=1e-3)
  # integer pixel centres (default): centred means c = ((w-1)/2, (h-1)/2), returned +0.5
  k0 = k.copy()
  k0[:, 0, 2], k0[:, 1, 2] = (ww - 1) / 2, (hh - 1) / 2
  ray = J.cameras_to_ray_map(_f32(k0), _f32(w2c), hh, ww)
  got_w2c, got_k = J.pose_from_rays(ray[None], conf[None], (hh, ww), seed=0)
  np.testing.assert_allclose(np.asarray(got_w2c[0]), w2c, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got_k[0]), k, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- normals and depth edges


def _plane_depth(h, w, k, normal, point):
  """Z-depth of the plane {x : n.(x - point) = 0} (float64)."""
  vv, uu = np.mgrid[:h, :w].astype(np.float64)
  rays = np.stack([uu, vv, np.ones_like(uu)], -1) @ np.linalg.inv(k).T
  return (normal @ point) / (rays @ normal)


def test_normals_of_a_tilted_plane():
  h, w = 40, 40
  k = _camera(h, w)
  n = np.array([0.35, -0.25, -1.0])
  n /= np.linalg.norm(n)  # faces the camera: n . x < 0 on the plane below
  depth = _plane_depth(h, w, k, n, np.array([0.2, -0.1, 4.0]))
  assert (depth > 0).all()
  normals, valid = J.normals_from_depth(_f32(depth), _f32(k), window=5)
  assert bool(valid.all())
  np.testing.assert_allclose(np.asarray(normals), np.broadcast_to(n, (h, w, 3)), atol=1e-4)
  pts = J.depth_to_camera_points(_f32(depth), _f32(k))
  m_normals, m_valid = J.moge_normals(pts)
  assert bool(m_valid.all())
  np.testing.assert_allclose(np.asarray(m_normals), np.broadcast_to(n, (h, w, 3)), atol=1e-4)
  # another tilt, 3x3 windows
  n2 = np.array([-0.5, 0.3, -1.0])
  n2 /= np.linalg.norm(n2)
  depth_b = _plane_depth(h, w, k, n2, np.array([0.0, 0.3, 3.0]))
  normals_b, valid_b = J.normals_from_depth(_f32(depth_b), _f32(k), 3, np.ones((h, w), bool))
  assert bool(valid_b.all())
  np.testing.assert_allclose(np.asarray(normals_b), np.broadcast_to(n2, (h, w, 3)), atol=1e-4)


def test_normals_masks_and_sphere():
  h, w = 40, 40
  k = np.array([[40.0, 0, 19.5], [0, 40.0, 19.5], [0, 0, 1]])
  centre, radius = np.array([0.0, 0.0, 3.0]), 1.0
  vv, uu = np.mgrid[:h, :w].astype(np.float64)
  d = np.stack([uu, vv, np.ones_like(uu)], -1) @ np.linalg.inv(k).T  # z = 1 rays
  a, b, c = (d * d).sum(-1), -2 * d @ centre, centre @ centre - radius**2
  disc = b * b - 4 * a * c
  hit = disc > 0
  depth = np.where(hit, (-b - np.sqrt(np.where(hit, disc, 0))) / (2 * a), np.inf)
  pts = np.where(hit[..., None], d * np.where(hit, depth, 1.0)[..., None], 0.0)
  true_n = (pts - centre) / radius
  normals, valid = J.normals_from_depth(_f32(depth), _f32(k), 3, np.ones((h, w), bool))
  valid = np.asarray(valid)
  assert not valid[~hit].any() and valid[ndimage.binary_erosion(hit, iterations=2)].all()
  interior = ndimage.binary_erosion(hit, iterations=4)
  cos = (np.asarray(normals) * true_n).sum(-1)
  assert cos[interior].min() > 0.995
  m_normals, m_valid = J.moge_normals(_f32(pts), _f32(hit) > 0)
  m_valid = np.asarray(m_valid)
  assert not m_valid[~hit].any() and m_valid[interior].all()
  assert (np.asarray(m_normals) * true_n).sum(-1)[interior].min() > 0.995
  assert np.abs(np.asarray(m_normals)[~hit]).max() == 0.0
  # masked-out pixels are invalid; the rest is unchanged where the window avoids the mask
  mask = np.ones((h, w), bool)
  mask[:, :20] = False
  normals_m, valid_m = J.normals_from_depth(_f32(depth), _f32(k), 3, mask)
  assert not np.asarray(valid_m)[:, :20].any()
  np.testing.assert_array_equal(np.asarray(valid_m)[:, 21:], valid[:, 21:])
  np.testing.assert_allclose(np.asarray(normals_m)[:, 21:], np.asarray(normals)[:, 21:], atol=1e-6)


def _depth_edges_ref(depth, rtol, k, mask=None):
  if mask is None:
    mx = ndimage.maximum_filter(depth, size=k, mode="nearest")
    mn = ndimage.minimum_filter(depth, size=k, mode="nearest")
  else:
    mx = ndimage.maximum_filter(np.where(mask, depth, -np.inf), size=k, mode="constant",
                                cval=-np.inf)
    mn = ndimage.minimum_filter(np.where(mask, depth, np.inf), size=k, mode="constant",
                                cval=np.inf)
  with np.errstate(invalid="ignore"):
    return np.nan_to_num((mx - mn) / depth) > rtol


def test_depth_edges():
  h, w = 16, 20
  step = np.ones((h, w), np.float32)
  step[:, 10:] = 2.0
  edge = np.asarray(J.depth_edges(_f32(step)))
  want = np.zeros((h, w), bool)
  want[:, 9:11] = True
  np.testing.assert_array_equal(edge, want)
  wide = np.asarray(J.depth_edges(_f32(step), kernel_size=5))
  np.testing.assert_array_equal(wide.any(0), (np.arange(w) >= 8) & (np.arange(w) < 12))
  # a smooth ramp below the tolerance has no edges
  ramp = np.tile(np.linspace(1.0, 1.2, w, dtype=np.float32), (h, 1))
  assert not np.asarray(J.depth_edges(_f32(ramp))).any()
  rng = np.random.default_rng(4)
  depth = rng.uniform(1.0, 1.2, (2, h, w)).astype(np.float32)
  mask = rng.uniform(size=(2, h, w)) > 0.2
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(J.depth_edges(_f32(depth), rtol=0.1))[i],
                                  _depth_edges_ref(depth[i], 0.1, 3))
    np.testing.assert_array_equal(
        np.asarray(J.depth_edges(_f32(depth), rtol=0.1, kernel_size=5, mask=mask))[i],
        _depth_edges_ref(depth[i], 0.1, 5, mask[i]))
  assert np.asarray(J.depth_edges(_f32(depth), rtol=None, atol=0.15)).any()


# ---------------------------------------------------------------- canny


def _square(size=48, lo=20, hi=32, value=200):
  img = np.zeros((size, size), np.uint8)
  img[lo:hi, lo:hi] = value
  return img


def test_canny_square():
  img = _square()
  edges = g.canny(img, 100, 200)
  assert edges.dtype == bool and edges.shape == img.shape
  # everything lies within one pixel of the square's boundary (between pixels 19|20 and 31|32)
  inside = np.zeros_like(edges)
  inside[18:34, 18:34] = True
  core = np.zeros_like(edges)
  core[22:30, 22:30] = True
  assert not edges[~inside].any() and not edges[core].any()
  # each side is found and is one pixel thin along its middle
  mid = slice(22, 30)
  for side in (edges[mid, 18:26], edges[mid, 26:34], edges[18:26, mid].T, edges[26:34, mid].T):
    np.testing.assert_array_equal(side.sum(1), 1)
  # OpenCV's tie-breaking: left/top edges on the dark side, right/bottom on the bright side
  assert edges[mid, 19].all() and edges[mid, 31].all()
  assert edges[19, mid].all() and edges[31, mid].all()
  # float input with the same values gives the same result
  np.testing.assert_array_equal(g.canny(img.astype(np.float32), 100, 200), edges)
  # stacks are processed image by image
  np.testing.assert_array_equal(g.canny(np.stack([img, img]), 100, 200)[1], edges)


def test_canny_thresholds_and_hysteresis():
  # a step of contrast c gives an L1 Sobel magnitude of 4c
  img = np.zeros((40, 60), np.uint8)
  img[:, 10:] = 60  # strong: 240 > 200
  img[:, 30:] = 90  # weak only: 120 in (100, 200], isolated -> dropped
  img[:20, 45:] = 150  # top half of the third step: strong (240)
  img[20:, 45:] = 120  # bottom half: weak (120) but connected to the strong top half -> kept
  edges = g.canny(img, 100, 200)
  rows = slice(2, 38)
  assert edges[rows, 9].all()
  assert not edges[:, 25:35].any()
  assert edges[3:18, 44].all() and edges[22:38, 44].all()
  # independent Sobel (SciPy, replicated border): every edge exceeds `low`; none above the max
  mag = (np.abs(ndimage.sobel(img.astype(float), 1, mode="nearest"))
         + np.abs(ndimage.sobel(img.astype(float), 0, mode="nearest")))
  assert (mag[edges] > 100).all()
  assert not g.canny(img, mag.max(), mag.max() + 1).any()
  assert not g.canny(np.full((20, 20), 77, np.uint8), 1, 2).any()
  # low > high is swapped like OpenCV
  np.testing.assert_array_equal(g.canny(img, 200, 100), edges)
  # optional blur still finds the strong step
  assert g.canny(img.astype(np.float64), 10, 20, sigma=1.0)[rows, 9:11].any(1).all()


def test_canny_matches_opencv_when_available():
  cv2 = pytest.importorskip("cv2")
  rng = np.random.default_rng(0)
  smooth = ndimage.gaussian_filter(rng.normal(128, 80, (57, 83)), 1.5)
  for img in (rng.integers(0, 256, (41, 64)).astype(np.uint8),
              np.clip(smooth, 0, 255).astype(np.uint8), _square()):
    for low, high in ((100, 200), (30, 90)):
      np.testing.assert_array_equal(g.canny(img, low, high), cv2.Canny(img, low, high) > 0)


# ---------------------------------------------------------------- jit, vmap, dtypes


def test_jit_vmap_and_default_dtypes():
  rv = _f32(_rotations(8, 11).as_rotvec())
  m = J.axis_angle_to_mat(rv)
  assert m.dtype == jnp.float32
  m_v = jax.jit(jax.vmap(g.axis_angle_to_mat))(rv)
  np.testing.assert_allclose(np.asarray(m_v), np.asarray(m), atol=1e-6)
  h, w = 6, 7
  depth = _f32(np.random.default_rng(5).uniform(1, 2, (3, h, w)))
  k = _f32(np.stack([_camera(h, w)] * 3))
  w2c = _f32(_w2c(3, 12))
  batched = J.depth_to_world_points(depth, k, w2c)
  mapped = jax.jit(jax.vmap(g.depth_to_world_points))(depth, k, w2c)
  assert batched.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(batched), atol=1e-5)
  pts = J.depth_to_camera_points(depth, k)
  mn, mv = J.moge_normals(pts)
  mn_v, mv_v = jax.jit(jax.vmap(g.moge_normals))(pts)
  np.testing.assert_allclose(np.asarray(mn_v), np.asarray(mn), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mv_v), np.asarray(mv))
  assert mn.dtype == jnp.float32 and mv.dtype == jnp.bool_ and mv.shape == (3, h, w)
  edge = J.depth_edges(depth)
  edge_v = jax.jit(jax.vmap(g.depth_edges))(depth)
  np.testing.assert_array_equal(np.asarray(edge), np.asarray(edge_v))
  # Python scalars and float64 NumPy inputs give float32
  assert J.make_intrinsics(100, 100, 3, 3).dtype == jnp.float32
  assert J.scale_intrinsics(np.eye(3), 2, 2).dtype == jnp.float32
  assert J.svd_orthogonalize(np.ones(9)).dtype == jnp.float32
