"""Tests for geojax.io.pointcloud and geojax.io.render: PLY round trips against an independent
parser, ASCII and foreign PLY layouts, clear errors, DA3-style filtering, the NumPy renderer
(z-buffer, cameras, empty and degenerate inputs) and GLB scenes read back with trimesh."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest

from geojax.io.pointcloud import filter_points, read_ply, write_glb, write_ply
from geojax.io.render import camera_colors, frustum_lines, render_point_cloud

RED, BLUE = np.array([255, 0, 0], np.uint8), np.array([0, 0, 255], np.uint8)


def _cloud(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  xyz = (rng.normal(size=(n, 3)) * [1.0, 0.5, 0.5] + [0.0, 0.0, 4.0]).astype(np.float32)
  return xyz, rng.integers(0, 256, (n, 3), dtype=np.uint8)


def _camera(tx: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """One world-to-camera matrix (identity rotation, camera centre at x = -tx) and its K."""
  e = np.eye(4)
  e[0, 3] = tx
  k = np.array([[100.0, 0.0, 99.5], [0.0, 100.0, 49.5], [0.0, 0.0, 1.0]])  # a 100 x 200 image
  return e, k


# -------------------------------------------------------------------------------------------------
# PLY
# -------------------------------------------------------------------------------------------------

_NP = {"float": "f4", "double": "f8", "uchar": "u1", "int": "i4", "ushort": "u2", "short": "i2"}


def _independent_parse(path: str) -> dict[str, np.ndarray]:
  """A minimal reader for binary PLY files with one scalar-only element: header, then frombuffer."""
  with open(path, "rb") as f:
    data = f.read()
  head, body = data.split(b"end_header\n", 1)
  lines = head.decode("ascii").splitlines()
  assert lines[0] == "ply"
  order = {"format binary_little_endian 1.0": "<", "format binary_big_endian 1.0": ">"}[lines[1]]
  (n,) = [int(ln.split()[2]) for ln in lines if ln.startswith("element vertex ")]
  fields = [(ln.split()[2], order + _NP[ln.split()[1]]) for ln in lines
            if ln.startswith("property ")]
  table = np.frombuffer(body, dtype=np.dtype(fields), count=n)
  assert len(body) == n * table.dtype.itemsize  # nothing before or after the vertices
  return {name: table[name] for name, _ in fields}


def test_ply_binary_round_trip_is_exact(tmp_path):
  xyz, rgb = _cloud(1000)
  xyz[0] = [np.float32(1e-30), np.float32(-3.4e38), np.float32(np.pi)]
  path = str(tmp_path / "cloud.ply")
  assert write_ply(path, xyz, rgb) == path
  out = read_ply(path)
  assert out["xyz"].dtype == np.float32 and out["rgb"].dtype == np.uint8
  np.testing.assert_array_equal(out["xyz"], xyz)
  np.testing.assert_array_equal(out["rgb"], rgb)
  with open(path, "rb") as f:
    header = f.read(200)
  assert header.startswith(b"ply\nformat binary_little_endian 1.0\n")
  assert b"element vertex 1000\n" in header
  assert os.listdir(tmp_path) == ["cloud.ply"]  # no temporary file left behind


def test_ply_matches_independent_parser(tmp_path):
  xyz, rgb = _cloud(257, seed=1)
  write_ply(tmp_path / "c.ply", xyz, rgb)
  cols = _independent_parse(str(tmp_path / "c.ply"))
  assert list(cols) == ["x", "y", "z", "red", "green", "blue"]
  np.testing.assert_array_equal(np.stack([cols["x"], cols["y"], cols["z"]], -1), xyz)
  np.testing.assert_array_equal(np.stack([cols["red"], cols["green"], cols["blue"]], -1), rgb)

  write_ply(tmp_path / "plain.ply", xyz.astype(np.float64))  # no colours; doubles stored as float
  cols = _independent_parse(str(tmp_path / "plain.ply"))
  assert list(cols) == ["x", "y", "z"]
  out = read_ply(tmp_path / "plain.ply")
  assert out["rgb"] is None
  np.testing.assert_array_equal(out["xyz"], xyz)


def test_ply_empty_cloud(tmp_path):
  write_ply(tmp_path / "e.ply", np.zeros((0, 3)), np.zeros((0, 3), np.uint8))
  out = read_ply(tmp_path / "e.ply")
  assert out["xyz"].shape == (0, 3) and out["rgb"].shape == (0, 3)


def test_read_ascii_ply_with_extra_properties_and_elements(tmp_path):
  text = "\n".join([
      "ply", "format ascii 1.0", "comment made by hand", "element camera 1",
      "property float fov", "property int id", "element vertex 3", "property double x",
      "property float nx", "property double y", "property double z", "property uchar red",
      "property uchar green", "property uchar blue", "property float alpha",
      "element face 1", "property list uchar int vertex_indices", "end_header",
      "60.0 7", "0.5 9 -1.25 3 1 2 3 0", "1 0 2 255 0 0 0 0.5", "4.5 0  5 6 0 255 0 1",
      "3 0 1 2", ""])
  (tmp_path / "a.ply").write_text(text)
  out = read_ply(tmp_path / "a.ply")
  np.testing.assert_array_equal(out["xyz"], np.array(
      [[0.5, -1.25, 3], [1, 2, 255], [4.5, 5, 6]], np.float32))
  np.testing.assert_array_equal(out["rgb"], np.array([[1, 2, 3], [0, 0, 0], [0, 255, 0]]))


@pytest.mark.parametrize("order,fmt", [("<", "binary_little_endian"), (">", "binary_big_endian")])
def test_read_binary_ply_skips_properties_by_type(tmp_path, order, fmt):
  n = 5
  rng = np.random.default_rng(2)
  meta = np.array([(1, 2), (3, 4)], dtype=[("a", order + "i4"), ("b", order + "i2")])
  vert = np.zeros(n, dtype=[("x", order + "f8"), ("flag", "u1"), ("y", order + "f8"),
                            ("z", order + "f8"), ("id", order + "u2"), ("red", "u1"),
                            ("green", "u1"), ("blue", "u1"), ("alpha", order + "f4")])
  for name in ("x", "y", "z", "alpha"):
    vert[name] = rng.normal(size=n)
  for name in ("flag", "red", "green", "blue"):
    vert[name] = rng.integers(0, 256, n)
  vert["id"] = np.arange(n) + 60000
  header = "\n".join([
      "ply", f"format {fmt} 1.0", "element meta 2", "property int a", "property short b",
      f"element vertex {n}", "property double x", "property uchar flag", "property double y",
      "property double z", "property ushort id", "property uchar red", "property uchar green",
      "property uchar blue", "property float alpha", "element face 1",
      "property list uchar int vertex_indices", "end_header", ""]).encode()
  face = np.array([3], "u1").tobytes() + np.array([0, 1, 2], order + "i4").tobytes()
  (tmp_path / "b.ply").write_bytes(header + meta.tobytes() + vert.tobytes() + face)
  out = read_ply(tmp_path / "b.ply")
  np.testing.assert_array_equal(
      out["xyz"], np.stack([vert["x"], vert["y"], vert["z"]], -1).astype(np.float32))
  np.testing.assert_array_equal(out["rgb"], np.stack([vert["red"], vert["green"],
                                                      vert["blue"]], -1))


def test_ply_errors_name_the_path(tmp_path):
  xyz, rgb = _cloud(10)
  path = str(tmp_path / "x.ply")
  write_ply(path, xyz, rgb)
  with pytest.raises(FileExistsError, match="x.ply"):
    write_ply(path, xyz[:3])
  assert read_ply(path)["xyz"].shape == (10, 3)  # untouched
  write_ply(path, xyz[:3], overwrite=True)
  assert read_ply(path)["xyz"].shape == (3, 3) and read_ply(path)["rgb"] is None

  with pytest.raises(FileNotFoundError, match="missing.ply"):
    read_ply(tmp_path / "missing.ply")

  write_ply(tmp_path / "full.ply", xyz, rgb)
  data = (tmp_path / "full.ply").read_bytes()
  (tmp_path / "cut.ply").write_bytes(data[:-5])
  with pytest.raises(ValueError, match="cut.ply.*truncated"):
    read_ply(tmp_path / "cut.ply")
  (tmp_path / "head.ply").write_bytes(data[:40])
  with pytest.raises(ValueError, match="head.ply.*end_header"):
    read_ply(tmp_path / "head.ply")
  (tmp_path / "cut.txt").write_text(
      "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
      "property float z\nend_header\n1 2 3\n4 5 6\n")
  with pytest.raises(ValueError, match="cut.txt.*truncated"):
    read_ply(tmp_path / "cut.txt")
  (tmp_path / "not.ply").write_bytes(b"\x89PNG\r\n\x1a\nabc\n")
  with pytest.raises(ValueError, match="not.ply.*first line"):
    read_ply(tmp_path / "not.ply")
  (tmp_path / "nox.ply").write_text(
      "ply\nformat ascii 1.0\nelement vertex 1\nproperty float a\nend_header\n1\n")
  with pytest.raises(ValueError, match="nox.ply.*'x'"):
    read_ply(tmp_path / "nox.ply")

  with pytest.raises(ValueError, match="xyz must have shape"):
    write_ply(tmp_path / "bad.ply", np.zeros((4, 2)))
  with pytest.raises(ValueError, match="rgb must be uint8"):
    write_ply(tmp_path / "bad.ply", np.zeros((4, 3)), np.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"rgb must have shape \(4, 3\)"):
    write_ply(tmp_path / "bad.ply", np.zeros((4, 3)), np.zeros((5, 3), np.uint8))
  assert not (tmp_path / "bad.ply").exists()


# -------------------------------------------------------------------------------------------------
# filter_points
# -------------------------------------------------------------------------------------------------


def _point_map(conf_flat: np.ndarray, seed: int = 0):
  """A (2, 10, 50) point map whose colours encode the point index (to track what survives)."""
  rng = np.random.default_rng(seed)
  perm = rng.permutation(conf_flat.size)
  idx = np.arange(conf_flat.size)
  pts = np.stack([idx, idx * 2, idx * 3], -1).astype(np.float32).reshape(2, 10, 50, 3)
  colors = np.stack([idx % 256, idx // 256, np.zeros_like(idx)], -1).astype(np.uint8)
  return pts, colors.reshape(2, 10, 50, 3), conf_flat[perm].reshape(2, 10, 50), perm


def _ids(xyz: np.ndarray) -> np.ndarray:
  return xyz[:, 0].astype(np.int64)


def test_filter_points_percentile_threshold_and_cap():
  conf = 1.0 + np.arange(1000) / 100  # 1.00 ... 10.99: P40 = 4.996 > 1.05, so P40 rules
  pts, colors, c, perm = _point_map(conf)
  xyz, rgb = filter_points(pts, colors, c)
  assert xyz.shape == (600, 3) and xyz.dtype == np.float32 and rgb.dtype == np.uint8
  np.testing.assert_array_equal(np.sort(perm[_ids(xyz)]), np.arange(400, 1000))
  np.testing.assert_array_equal(rgb[:, 0], _ids(xyz) % 256)  # colours travel with their points

  a = filter_points(pts, colors, c, max_points=100, seed=3)
  b = filter_points(pts, colors, c, max_points=100, seed=3)
  other = filter_points(pts, colors, c, max_points=100, seed=4)
  assert a[0].shape == (100, 3)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], other[0])
  assert set(_ids(a[0])) <= set(_ids(xyz)) and len(set(_ids(a[0]))) == 100
  assert np.all(np.diff(_ids(a[0])) > 0)  # original order kept

  everything, _ = filter_points(pts, colors, c, conf_percentile=0, max_points=None)
  assert everything.shape == (1000, 3)
  assert filter_points(pts, colors, None)[0].shape == (1000, 3)


def test_filter_points_base_threshold_and_upper_clamp():
  conf = 1.0 + (np.arange(1000) + 0.5) * 1e-4  # P40 ~ 1.04, P90 ~ 1.09: the base 1.05 rules
  pts, colors, c, _ = _point_map(conf)
  assert filter_points(pts, colors, c)[0].shape == (500, 3)
  conf = np.arange(1000) / 1000  # all below 1.05: the threshold is clamped to P90 = 0.8991
  pts, colors, c, perm = _point_map(conf)
  xyz, _ = filter_points(pts, colors, c)
  np.testing.assert_array_equal(np.sort(perm[_ids(xyz)]), np.arange(900, 1000))


def test_filter_points_drops_non_finite_and_invalid():
  conf = 1.0 + np.arange(1000) / 100
  pts, colors, c, perm = _point_map(conf)
  flat = pts.reshape(-1, 3)
  flat[:10, 1] = np.nan
  flat[10:20, 2] = np.inf
  valid = np.ones(1000, bool)
  valid[20:30] = False
  xyz, _ = filter_points(pts, colors, c, valid=valid.reshape(2, 10, 50), conf_percentile=0)
  assert xyz.shape == (970, 3) and np.isfinite(xyz).all()
  assert not set(range(30)) & set(_ids(xyz))
  # The percentile is taken over the surviving candidates only.
  xyz, _ = filter_points(pts, colors, c, valid=valid.reshape(2, 10, 50))
  kept = np.setdiff1d(np.arange(1000), np.arange(30))
  cut = np.percentile(conf[perm[kept]], 40)
  assert xyz.shape[0] == int((conf[perm[kept]] >= cut).sum())

  with pytest.raises(ValueError, match="colors must have shape"):
    filter_points(pts, colors[0], c)
  with pytest.raises(ValueError, match="conf must have shape"):
    filter_points(pts, colors, c[0])
  with pytest.raises(ValueError, match="colors must be uint8"):
    filter_points(pts, colors.astype(np.float32), c)


# -------------------------------------------------------------------------------------------------
# Rendering
# -------------------------------------------------------------------------------------------------


def _has(image: np.ndarray, color: np.ndarray) -> int:
  return int(np.all(image == color, axis=-1).sum())


def _fibonacci_sphere(n: int, radius: float, centre: np.ndarray) -> np.ndarray:
  i = np.arange(n) + 0.5
  z = 1 - 2 * i / n
  r, phi = np.sqrt(1 - z * z), np.pi * (1 + 5 ** 0.5) * i
  return centre + radius * np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)


def test_render_shape_background_and_colours():
  rng = np.random.default_rng(0)
  xyz = rng.normal(size=(2000, 3)) * 0.05 + [1.0, 2.0, 3.0]
  rgb = np.tile(RED, (2000, 1))
  image = render_point_cloud(xyz, rgb, size=(60, 80), background=(0, 40, 0))
  assert image.shape == (60, 80, 3) and image.dtype == np.uint8
  assert set(map(tuple, image.reshape(-1, 3))) == {(255, 0, 0), (0, 40, 0)}
  assert _has(image, RED) > 100
  assert np.all(image[0, 0] == [0, 40, 0]) and np.all(image[-1, -1] == [0, 40, 0])
  ys, xs = np.nonzero(np.all(image == RED, axis=-1))  # the cluster sits near the centre
  assert abs(ys.mean() - 29.5) < 6 and abs(xs.mean() - 39.5) < 6


def test_render_z_buffer_nearest_point_wins():
  # A dense red shell hides a blue blob at its centre from any viewpoint; input order is moot.
  centre = np.array([0.5, -1.0, 6.0])
  shell = _fibonacci_sphere(20000, 1.0, centre)
  blob = np.random.default_rng(1).normal(size=(500, 3)) * 0.05 + centre
  colours = np.concatenate([np.tile(RED, (20000, 1)), np.tile(BLUE, (500, 1))])
  for order in (slice(None), slice(None, None, -1)):
    image = render_point_cloud(np.concatenate([shell, blob])[order], colours[order],
                               size=(60, 80), point_size=3)
    assert _has(image, BLUE) == 0 and _has(image, RED) > 500
  alone = render_point_cloud(blob, np.tile(BLUE, (500, 1)), size=(60, 80), point_size=3)
  assert _has(alone, BLUE) > 0


def test_render_draws_cameras():
  xyz, rgb = _cloud(3000)
  e0, k = _camera()
  e1, _ = _camera(1.0)
  extr = np.stack([e0, e1])
  plain = render_point_cloud(xyz, rgb, size=(120, 160))
  with_cams = render_point_cloud(xyz, rgb, extrinsics=extr, intrinsics=k, size=(120, 160))
  assert with_cams.shape == plain.shape and np.any(with_cams != plain)
  for c in camera_colors(2):
    assert _has(with_cams, c) > 10
  # 3 x 4 extrinsics, per-camera intrinsics and an explicit image size draw the same picture.
  same = render_point_cloud(xyz, rgb, extrinsics=extr[:, :3], intrinsics=np.stack([k, k]),
                            image_hw=(100, 200), size=(120, 160))
  np.testing.assert_array_equal(same, with_cams)


def test_render_empty_and_degenerate_inputs():
  e, k = _camera()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    empty = render_point_cloud(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), size=(30, 40),
                               background=(1, 2, 3))
    assert np.all(empty == [1, 2, 3])
    cams_only = render_point_cloud(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), extrinsics=e,
                                   intrinsics=k, size=(30, 40))
    assert _has(cams_only, camera_colors(1)[0]) > 10
    same = render_point_cloud(np.full((50, 3), 2.0), np.tile(BLUE, (50, 1)), size=(30, 40))
    assert _has(same, BLUE) > 0
    same_cam = render_point_cloud(np.full((5, 3), 3.0), np.tile(BLUE, (5, 1)), extrinsics=e,
                                  intrinsics=k, size=(30, 40))
    assert _has(same_cam, BLUE) > 0
    nan = np.array([[np.nan, 0, 0], [0, np.inf, 0]])
    assert np.all(render_point_cloud(nan, None, size=(30, 40)) == 255)
  with pytest.raises(ValueError, match="rgb must be uint8"):
    render_point_cloud(np.zeros((3, 3)), np.zeros((3, 3)))
  with pytest.raises(ValueError, match="intrinsics"):
    render_point_cloud(np.zeros((3, 3)), None, extrinsics=e)


def test_render_many_points():
  rng = np.random.default_rng(0)
  xyz = rng.normal(size=(300_000, 3)).astype(np.float32)
  rgb = rng.integers(0, 256, (300_000, 3), dtype=np.uint8)
  image = render_point_cloud(xyz, rgb, max_points=300_000)
  assert image.shape == (480, 640, 3)
  assert (image != 255).any(axis=-1).mean() > 0.2


def test_frustum_lines_geometry():
  e, k = _camera(-2.0)  # camera centre at x = 2
  segs = frustum_lines(e, k, (100, 200), 2.0)
  assert segs.shape == (1, 8, 2, 3)
  corners = np.array([[-2.0, -1.0, 2.0], [2.0, -1.0, 2.0], [2.0, 1.0, 2.0], [-2.0, 1.0, 2.0]])
  corners += [2.0, 0.0, 0.0]
  np.testing.assert_allclose(segs[0, :4, 0], np.tile([2.0, 0.0, 0.0], (4, 1)))
  np.testing.assert_allclose(segs[0, :4, 1], corners)
  np.testing.assert_allclose(segs[0, 4:, 0], corners)
  np.testing.assert_allclose(segs[0, 4:, 1], np.roll(corners, -1, axis=0))
  np.testing.assert_allclose(frustum_lines(e, k, None, 2.0), segs)  # size from the centre


# -------------------------------------------------------------------------------------------------
# GLB
# -------------------------------------------------------------------------------------------------


def test_write_glb_round_trip(tmp_path):
  trimesh = pytest.importorskip("trimesh")
  xyz, rgb = _cloud(400)
  e0, k = _camera()
  e1, _ = _camera(1.0)
  path = str(tmp_path / "scene.glb")
  assert write_glb(path, xyz, rgb, extrinsics=np.stack([e0, e1]), intrinsics=k) == path
  scene = trimesh.load(path, force="scene")
  assert sorted(scene.geometry) == ["camera_000", "camera_001", "points"]
  cloud = scene.geometry["points"]
  assert isinstance(cloud, trimesh.points.PointCloud) and len(cloud.vertices) == 400
  np.testing.assert_allclose(cloud.vertices, xyz, rtol=0, atol=0)
  np.testing.assert_array_equal(np.asarray(cloud.colors)[:, :3], rgb)
  transform, _ = scene.graph["points"]
  np.testing.assert_allclose(transform, np.diag([1.0, -1.0, -1.0, 1.0]))
  scale = 0.03 * np.linalg.norm(np.diff(np.percentile(xyz.astype(np.float64), [5, 95], 0), axis=0))
  want = frustum_lines(np.stack([e0, e1]), k, None, scale)

  def key(seg: np.ndarray) -> tuple[float, ...]:  # a segment, whichever way round
    return tuple(np.round(np.sort(seg, axis=0).ravel(), 5))

  for i in range(2):
    lines = scene.geometry[f"camera_{i:03d}"]
    got = np.asarray(lines.vertices).reshape(-1, 2, 3)  # glTF LINES: consecutive vertex pairs
    assert sorted(map(key, got)) == sorted(map(key, want[i]))

  with pytest.raises(FileExistsError, match="scene.glb"):
    write_glb(path, xyz, rgb)
  write_glb(path, xyz[:10], None, overwrite=True)
  assert len(trimesh.load(path, force="scene").geometry["points"].vertices) == 10
  assert sorted(os.listdir(tmp_path)) == ["scene.glb"]


def test_write_glb_without_trimesh(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "trimesh", None)  # makes `import trimesh` fail
  with pytest.raises(ImportError, match=r"geojax\[glb\]"):
    write_glb(tmp_path / "s.glb", np.zeros((3, 3)), None)
  assert not (tmp_path / "s.glb").exists()
