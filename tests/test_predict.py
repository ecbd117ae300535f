"""``geojax predict`` end to end, the Python API and one-line errors on bad input."""

from __future__ import annotations

import html.parser
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from geojax.data.formats import colmap, scene_folder
from geojax.data.synthetic import render_scene
from geojax.io import pointcloud
from geojax.predict import cli, core, export, inputs
from xla_env import xla_flags

RES = 98  # processing resolution: small images keep the CPU forward cheap
N_VIEWS = 3


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A randomly initialised da3-tiny, saved as a geojax model checkpoint (numpy-drawn weights:
  no initialiser compilation)."""
  from flax import nnx

  from geojax.io import checkpoint
  from geojax.models import da3
  from test_view_parallel import random_state
  model = nnx.merge(*random_state(lambda: da3.DA3.from_preset("da3-tiny", rngs=nnx.Rngs(0))))
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
  checkpoint.save_model(path, model, "da3", {"preset": "da3-tiny"})
  return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  scene = render_scene(0, 1, num_views=N_VIEWS, height=84, width=126)
  folder = tmp_path_factory.mktemp("photos") / "garden"
  folder.mkdir()
  for i, img in enumerate(scene["images"]):
    Image.fromarray(img).save(folder / f"IMG_{i:03d}.jpg", quality=95)
  (folder / "notes.txt").write_text("not an image")
  return str(folder)


def _geojax_cmd() -> list[str]:
  exe = os.path.join(os.path.dirname(sys.executable), "geojax")
  return [exe] if os.path.exists(exe) else [sys.executable, "-m", "geojax.cli"]


class _Links(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.links = []

  def handle_starttag(self, tag, attrs):
    self.links += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.fixture(scope="module")
def predicted(tiny_checkpoint, image_folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pred") / "out")
  r = subprocess.run(_geojax_cmd() + ["predict", "--weights", tiny_checkpoint, "--out", out,
                                      "--process-res", str(RES), "--max-points", "500",
                                      "--no-progress", image_folder],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  return out, r


def test_end_to_end_outputs(predicted, image_folder, tiny_checkpoint):
  out, r = predicted
  assert re.search(r"1 scene\(s\), 3 views .* views/s", r.stdout), r.stdout
  root = os.path.join(out, "garden")
  stems = [f"IMG_{i:03d}" for i in range(N_VIEWS)]
  h, w = 70, 98  # 84x126 -> longest side 98 -> 65.3 -> nearest multiple of 14
  # Depth / confidence arrays and 16-bit PNGs, colourised depth, processed inputs.
  cams = json.load(open(os.path.join(root, "cameras.json")))
  for i, t in enumerate(stems):
    d = np.load(os.path.join(root, "depth", t + ".npy"))
    assert d.shape == (h, w) and d.dtype == np.float32 and np.all(np.isfinite(d))
    png = np.asarray(Image.open(os.path.join(root, "depth", t + ".png")))
    assert png.shape == (h, w) and png.dtype == np.uint16
    np.testing.assert_allclose(png * cams["depth_png_unit"], d, atol=cams["depth_png_unit"])
    c = np.load(os.path.join(root, "confidence", t + ".npy"))
    cpng = np.asarray(Image.open(os.path.join(root, "confidence", t + ".png")))
    assert c.shape == cpng.shape == (h, w) and cpng.dtype == np.uint16
    np.testing.assert_allclose(cpng * cams["conf_png_unit"], c, atol=cams["conf_png_unit"])
    assert np.asarray(Image.open(os.path.join(root, "depth_vis", t + ".png"))).shape == (h, w, 3)
    assert np.asarray(Image.open(os.path.join(root, "images", t + ".png"))).shape == (h, w, 3)
    assert cams["frames"][i]["source"] == t + ".jpg"
    assert (cams["frames"][i]["input_height"], cams["frames"][i]["input_width"]) == (84, 126)
  assert cams["cameras"] == "predicted" and cams["model"]["preset"] == "da3-tiny"
  # The folder is a geojax scene folder.
  sc = scene_folder.read_scene(root)
  assert sc["images"].shape == (N_VIEWS, h, w, 3)
  # PLY parses and has the stated number of points (cap 500).
  ply = pointcloud.read_ply(os.path.join(root, "points.ply"))
  page = open(os.path.join(root, "index.html")).read()
  stated = int(re.search(r"(\d+) points in the cloud", page).group(1))
  assert len(ply["xyz"]) == stated == 500 and ply["rgb"].shape == (500, 3)
  assert np.all(np.isfinite(ply["xyz"]))
  # COLMAP text reads back through geojax's reader to the same cameras.
  model = colmap.read_model(os.path.join(root, "colmap"), ".txt")
  assert len(model.cameras) == len(model.images) == N_VIEWS and len(model.points3D) > 0
  by_name = {im.name: im for im in model.images.values()}
  for fr in cams["frames"]:
    im = by_name[fr["name"]]
    k = colmap.camera_to_pinhole(model.cameras[im.camera_id], np.float64)
    np.testing.assert_allclose(k, [[fr["fx"], 0, fr["cx"]], [0, fr["fy"], fr["cy"]], [0, 0, 1]],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(colmap.image_to_w2c(im, np.float64), fr["extrinsics"], atol=1e-5)
  # index.html references files that exist, including every view's pictures and the preview.
  parser = _Links()
  parser.feed(page)
  assert "preview.png" in parser.links and "points.ply" in parser.links
  for link in parser.links:
    assert os.path.isfile(os.path.join(root, link)), link
  assert np.asarray(Image.open(os.path.join(root, "preview.png"))).shape == (480, 640, 3)


def test_json_and_arrays_match_python_api(predicted, image_folder, tiny_checkpoint):
  """cameras.json and the .npy files hold what ``geojax.predict.run`` returns."""
  from geojax.predict import load_model, run
  out, _ = predicted
  root = os.path.join(out, "garden")
  model, info = load_model(tiny_checkpoint)
  assert info["format"] == "geojax" and info["preset"] == "da3-tiny"
  files = sorted(f for f in os.listdir(image_folder) if f.endswith(".jpg"))
  pred = run(model, [os.path.join(image_folder, f) for f in files], process_res=RES, names=files)
  cams = json.load(open(os.path.join(root, "cameras.json")))
  for i, (fr, t) in enumerate(zip(cams["frames"], export.view_stems(files))):
    k = pred.intrinsics[i]
    np.testing.assert_allclose([fr["fx"], fr["fy"], fr["cx"], fr["cy"]],
                               [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fr["extrinsics"], pred.extrinsics[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(os.path.join(root, "depth", t + ".npy")), pred.depth[i],
                               rtol=1e-5, atol=1e-6)
  # World points are the depth lifted with those cameras.
  assert pred.world_points.shape == pred.depth.shape + (3,)
  cam = np.einsum("ij,hwj->hwi", pred.extrinsics[0, :3, :3], pred.world_points[0]) + \
      pred.extrinsics[0, :3, 3]
  np.testing.assert_allclose(cam[..., 2], pred.depth[0], rtol=1e-4, atol=1e-4)


def test_official_checkpoint_directory(tmp_path):
  """An official-layout directory (model.safetensors + config.json with model_name) loads."""
  from flax import nnx

  from geojax.convert.da3 import save_official
  from geojax.models import da3
  from geojax.nn.layers import count_params
  from geojax.predict import load_model
  from test_view_parallel import random_state
  model = nnx.merge(*random_state(lambda: da3.DA3.from_preset("da3-tiny", rngs=nnx.Rngs(1)), 1))
  save_official(model, str(tmp_path / "hub"))
  (tmp_path / "hub" / "config.json").write_text(json.dumps({"model_name": "da3-tiny"}))
  loaded, info = load_model(str(tmp_path / "hub"))
  assert info == {"weights": str(tmp_path / "hub"), "format": "official", "preset": "da3-tiny"}
  assert count_params(loaded) == count_params(model)
  a = nnx.state(model, nnx.Param)
  b = nnx.state(loaded, nnx.Param)
  assert all(np.array_equal(x, y) for x, y in zip(jax_leaves(a), jax_leaves(b)))


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _cli(argv, capsys):
  code = cli.main(argv)
  err = capsys.readouterr().err
  return code, err


def test_bad_input_errors_are_one_line(tmp_path, tiny_checkpoint, image_folder, capsys):
  base = ["--weights", tiny_checkpoint, "--no-progress", "--process-res", str(RES)]
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.md").write_text("x")
  code, err = _cli(base + ["--out", str(tmp_path / "o1"), str(empty)], capsys)
  assert code == 2 and "no images found" in err and str(empty) in err
  assert err.count("\n") == 1 and "Traceback" not in err

  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  code, err = _cli(base + ["--out", str(tmp_path / "o2"), str(broken)], capsys)
  assert code == 2 and "a.png" in err and "cannot decode" in err and err.count("\n") == 1

  code, err = _cli(base + ["--out", str(tmp_path / "o3"), str(tmp_path / "missing")], capsys)
  assert code == 2 and "no such file or folder" in err and err.count("\n") == 1

  existing = tmp_path / "exists"
  existing.mkdir()
  code, err = _cli(base + ["--out", str(existing), image_folder], capsys)
  assert code == 2 and "exists" in err and "--overwrite" in err and err.count("\n") == 1

  code, err = _cli(["--out", str(tmp_path / "o4"), image_folder], capsys)
  assert code == 2 and "--weights" in err and err.count("\n") == 1

  code, err = _cli(base + ["--process-res-method", "nearest", "--out", str(tmp_path / "o5"),
                           image_folder], capsys)
  assert code == 2 and "process-res-method" in err and err.count("\n") == 1
  assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_non_pinhole_colmap_is_refused(tmp_path, tiny_checkpoint, capsys):
  scene = render_scene(0, 2, num_views=2, height=28, width=42)
  model = colmap.model_from_scene(scene, points_per_view=5)
  cam = model.cameras[1]
  model.cameras[1] = colmap.Camera(cam.id, "OPENCV_FISHEYE", cam.width, cam.height,
                                   np.concatenate([cam.params, [0.1, 0, 0, 0]]))
  root = tmp_path / "colmap_scene"
  colmap.write_model(model, root / "sparse" / "0", binary=True)
  (root / "images").mkdir()
  for i, im in enumerate(scene["images"]):
    Image.fromarray(im).save(root / "images" / f"{i:06d}.png")
  code, err = _cli(["--weights", tiny_checkpoint, "--out", str(tmp_path / "o"), str(root)], capsys)
  assert code == 2 and "fisheye" in err and "camera 1" in err and err.count("\n") == 1


def test_inputs_resolve_kinds(tmp_path, image_folder):
  """Image files, folders, scene folders and COLMAP folders become scenes with the right poses."""
  scene = render_scene(0, 3, num_views=2, height=28, width=42)
  sf = scene_folder.write_scene(scene, tmp_path / "posed")
  cm = tmp_path / "cm"
  colmap.write_model(colmap.model_from_scene(scene, points_per_view=5), cm / "sparse", binary=False)
  (cm / "images").mkdir()
  for i, im in enumerate(scene["images"]):
    Image.fromarray(im).save(cm / "images" / f"{i:06d}.png")
  files = sorted(os.path.join(image_folder, f) for f in os.listdir(image_folder)
                 if f.endswith(".jpg"))
  got = inputs.resolve(files[:2] + [sf, str(cm), image_folder, files[2]])
  assert [s.kind for s in got] == ["images", "scene", "colmap", "folder", "images"]
  assert [s.name for s in got] == ["garden", "posed", "cm", "garden-2", "garden-3"]
  assert [len(s.images) for s in got] == [2, 2, 2, 3, 1]
  for s in got[1:3]:
    np.testing.assert_allclose(s.extrinsics, scene["extrinsics"], atol=1e-5)
    np.testing.assert_allclose(s.intrinsics, scene["intrinsics"], atol=1e-4)
  with pytest.raises(ValueError, match="not an image"):
    inputs.resolve([os.path.join(image_folder, "notes.txt")])


def test_mixed_sizes_and_known_poses(tmp_path, tiny_checkpoint, capsys):
  """Mixed sizes are centre-cropped with a one-line warning; known poses come back as given."""
  scene = render_scene(0, 4, num_views=2, height=56, width=84)
  folder = tmp_path / "mixed"
  folder.mkdir()
  Image.fromarray(scene["images"][0]).save(folder / "a.png")
  Image.fromarray(scene["images"][1][:, :60]).save(folder / "b.png")
  posed = scene_folder.write_scene(scene, tmp_path / "posed")
  out = tmp_path / "out"
  code = cli.main(["--weights", tiny_checkpoint, "--out", str(out), "--no-progress",
                   "--process-res", "56", "--max-points", "100", str(folder), posed])
  err = capsys.readouterr().err
  assert code == 0, err
  warn = [line for line in err.splitlines() if "warning" in line]
  # The untrained checkpoint's cameras are degenerate, which is reported in one more line each.
  sizes = [line for line in warn if "degenerate predicted camera" not in line]
  assert len(sizes) == 1 and "differ in size" in sizes[0] and "b.png: 60x56" in sizes[0]
  mixed = json.load(open(out / "mixed" / "cameras.json"))
  assert {(f["width"], f["height"]) for f in mixed["frames"]} == {(56, 42)}
  given = json.load(open(out / "posed" / "cameras.json"))
  assert given["cameras"] == "given"
  for fr, e in zip(given["frames"], scene["extrinsics"]):
    np.testing.assert_allclose(fr["extrinsics"], e, atol=1e-5)
  # Intrinsics were rescaled to the processed size (84 -> 56: factor 2/3, pixel centres kept).
  k = scene["intrinsics"][0]
  np.testing.assert_allclose(given["frames"][0]["fx"], k[0, 0] * 56 / 84, rtol=1e-5)
  np.testing.assert_allclose(given["frames"][0]["cx"], (k[0, 2] + 0.5) * 56 / 84 - 0.5, rtol=1e-5)
  # A second run into the same directory needs --overwrite, then replaces the scene.
  code = cli.main(["--weights", tiny_checkpoint, "--out", str(out), "--no-progress",
                   "--process-res", "56", str(folder)])
  assert code == 2 and "--overwrite" in capsys.readouterr().err
  code = cli.main(["--weights", tiny_checkpoint, "--out", str(out), "--no-progress", "--overwrite",
                   "--process-res", "56", "--max-points", "50", str(folder)])
  assert code == 0
  assert len(pointcloud.read_ply(out / "mixed" / "points.ply")["xyz"]) == 50
  assert (out / "posed" / "index.html").exists()  # other scenes are left alone
  assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary folders left


def test_run_rejects_bad_cameras():
  img = np.zeros((28, 28, 3), np.uint8)
  k = np.eye(3)[None]
  with pytest.raises(ValueError, match="together"):
    core.run(None, [img], extrinsics=np.eye(4)[None])
  with pytest.raises(ValueError, match=r"extrinsics must be \(1, 4, 4\)"):
    core.run(None, [img], extrinsics=np.eye(4), intrinsics=k)
  with pytest.raises(ValueError, match="finite"):
    core.run(None, [img], extrinsics=np.full((1, 4, 4), np.nan), intrinsics=k)


def test_world_points_without_cameras():
  d = np.full((1, 4, 6), 2.0, np.float32)
  pts = core.world_points(d, None, None)
  np.testing.assert_allclose(pts[..., 2], 2.0)
  assert pts[0, 0, 0, 0] < 0 < pts[0, 0, -1, 0]


def test_view_parallel_command_matches_single_device(predicted, tiny_checkpoint, image_folder,
                                                     tmp_path):
  """``--view-devices`` (views split over 3 simulated CPU devices) and ``--head-chunk`` give the
  single-device outputs."""
  out = str(tmp_path / "vp")
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=3"),
             JAX_PLATFORMS="cpu")
  r = subprocess.run(_geojax_cmd() + ["predict", "--weights", tiny_checkpoint, "--out", out,
                                      "--process-res", str(RES), "--max-points", "500",
                                      "--no-progress", "--view-devices", "3", "--head-chunk", "1",
                                      image_folder],
                     capture_output=True, text=True, timeout=600, env=env)
  assert r.returncode == 0, r.stderr
  ref_root, root = os.path.join(predicted[0], "garden"), os.path.join(out, "garden")
  for t in (f"IMG_{i:03d}" for i in range(N_VIEWS)):
    a = np.load(os.path.join(root, "depth", t + ".npy"))
    b = np.load(os.path.join(ref_root, "depth", t + ".npy"))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
  a, b = (json.load(open(os.path.join(d, "cameras.json")))["model"] for d in (root, ref_root))
  assert a["devices"] == 3 and b["devices"] == 1
