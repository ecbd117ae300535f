"""Tests for geojax.data.formats: scene folders, COLMAP models, videos and their error messages."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image as PILImage

from geojax.data.formats import colmap, scene_folder, video
from geojax.data.synthetic import render_scene

H, W, S = 24, 32, 3


@pytest.fixture(scope="module")
def scene():
  return render_scene(7, 0, num_views=S, height=H, width=W)


def _write(scene, path, **kw):
  return scene_folder.write_scene(scene, str(path), **kw)


# ------------------------------------------------------------------------------------------------
# Scene folder.


def test_scene_folder_npy_lossless(scene, tmp_path):
  _write(scene, tmp_path / "s")
  out = scene_folder.read_scene(tmp_path / "s")
  assert out["names"] == ["000000.png", "000001.png", "000002.png"]
  for k in ("images", "depth", "valid", "normals", "intrinsics", "extrinsics"):
    assert out[k].dtype == scene[k].dtype, k
    np.testing.assert_array_equal(out[k], scene[k], err_msg=k)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # temp dir renamed away


def test_scene_folder_png16_to_1mm(scene, tmp_path):
  _write(scene, tmp_path / "s", depth_format="png16")
  assert os.path.isfile(tmp_path / "s" / "depth" / "000000.png")
  out = scene_folder.read_scene(tmp_path / "s")
  assert out["depth"].dtype == np.float32
  np.testing.assert_array_equal(out["depth"] > 0, scene["depth"] > 0)
  assert np.abs(out["depth"] - scene["depth"]).max() <= 1e-3
  np.testing.assert_array_equal(out["images"], scene["images"])


def test_png16_range_and_small_depths():
  d = np.array([[0.0, 0.0002, 1.2344], [65.535, np.nan, 3.0]], np.float32)
  mm = scene_folder.encode_depth_png16(d)
  np.testing.assert_array_equal(mm, [[0, 1, 1234], [65535, 0, 3000]])
  with pytest.raises(ValueError, match="65.535 m"):
    scene_folder.encode_depth_png16(np.full((2, 2), 70.0))


def test_no_overwrite_without_flag(scene, tmp_path):
  _write(scene, tmp_path / "s")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    _write(scene, tmp_path / "s")
  small = {k: v[:1] for k, v in scene.items()}
  _write(small, tmp_path / "s", overwrite=True)
  assert len(scene_folder.read_scene(tmp_path / "s")["names"]) == 1
  assert sorted(os.listdir(tmp_path)) == ["s"]


def test_load_depth_false_and_jpeg(scene, tmp_path):
  _write(scene, tmp_path / "s", image_format="jpg")
  out = scene_folder.read_scene(tmp_path / "s", load_depth=False, load_normals=False)
  assert "depth" not in out and "normals" not in out
  assert out["names"][0].endswith(".jpg") and out["images"].shape == (S, H, W, 3)
  assert np.abs(out["images"].astype(int) - scene["images"]).mean() < 8


def test_missing_image_names_file(scene, tmp_path):
  _write(scene, tmp_path / "s")
  os.remove(tmp_path / "s" / "images" / "000001.png")
  with pytest.raises(FileNotFoundError, match="000001.png"):
    scene_folder.read_scene(tmp_path / "s")
  with pytest.raises(ValueError, match="000001.png"):  # also a ValueError
    scene_folder.read_scene(tmp_path / "s")


def test_corrupt_image_names_file(scene, tmp_path):
  _write(scene, tmp_path / "s")
  p = tmp_path / "s" / "images" / "000002.png"
  p.write_bytes(p.read_bytes()[:60])
  with pytest.raises(ValueError, match=r"000002\.png.*(corrupt|decode)"):
    scene_folder.read_scene(tmp_path / "s")


def test_wrong_size_depth_names_file(scene, tmp_path):
  _write(scene, tmp_path / "s")
  np.save(tmp_path / "s" / "depth" / "000001.npy", np.ones((H, W + 1), np.float32))
  with pytest.raises(ValueError, match=r"depth[/\\]000001\.npy.*size"):
    scene_folder.read_scene(tmp_path / "s")
  scene_folder.read_scene(tmp_path / "s", load_depth=False)  # fine without depth


@pytest.mark.parametrize("field,value", [("fx", float("nan")), ("extrinsics", "inf")])
def test_nonfinite_camera_names_file(scene, tmp_path, field, value):
  _write(scene, tmp_path / "s")
  p = tmp_path / "s" / "cameras.json"
  data = json.loads(p.read_text())
  if field == "extrinsics":
    data["frames"][1]["extrinsics"][0][3] = float(value)
  else:
    data["frames"][1][field] = value
  p.write_text(json.dumps(data))  # json writes NaN / Infinity
  with pytest.raises(ValueError, match=r"cameras\.json.*000001\.png.*non-finite"):
    scene_folder.read_scene(tmp_path / "s")


def test_missing_camera_entries(scene, tmp_path):
  _write(scene, tmp_path / "s")
  p = tmp_path / "s" / "cameras.json"
  data = json.loads(p.read_text())
  del data["frames"][0]["cy"]
  p.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"cameras\.json.*frames\[0\].*'cy'"):
    scene_folder.read_scene(tmp_path / "s")
  os.remove(p)
  with pytest.raises(FileNotFoundError, match="cameras.json"):
    scene_folder.read_scene(tmp_path / "s")


def test_write_rejects_nonfinite_cameras(scene, tmp_path):
  bad = dict(scene, intrinsics=scene["intrinsics"].copy())
  bad["intrinsics"][2, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"non-finite.*\[2\]"):
    _write(bad, tmp_path / "s")
  assert not os.listdir(tmp_path)  # nothing left behind


def test_scene_folder_source(scene, tmp_path):
  for i in range(3):
    _write({k: v[: i + 1] for k, v in scene.items()}, tmp_path / f"scene_{i}")
  src = scene_folder.SceneFolderSource(tmp_path)
  assert len(src) == 3
  item = src[1]
  assert item["scene"] == "scene_1" and item["images"].shape == (2, H, W, 3)
  # corrupt scene 1: raise by default, skip (counted) on request
  os.remove(tmp_path / "scene_1" / "images" / "000000.png")
  with pytest.raises(FileNotFoundError, match="scene_1"):
    src[1]
  skipping = scene_folder.SceneFolderSource(tmp_path, on_error="skip", load_normals=False)
  assert skipping[1]["scene"] == "scene_2" and skipping.skipped == 1
  assert skipping[1]["scene"] == "scene_2" and skipping.skipped == 1  # known bad, not re-read
  assert skipping[0]["scene"] == "scene_0"
  with pytest.raises(IndexError):
    skipping[3]


def test_scene_folder_source_with_grain(scene, tmp_path):
  grain = pytest.importorskip("grain")
  _write(scene, tmp_path / "a")
  _write({k: v[:1] for k, v in scene.items()}, tmp_path / "b")
  ds = grain.MapDataset.source(scene_folder.SceneFolderSource(tmp_path)).map(
      lambda x: x["images"].shape[0])
  assert list(ds) == [3, 1]


# ------------------------------------------------------------------------------------------------
# COLMAP.


@pytest.fixture(scope="module")
def model(scene):
  return colmap.model_from_scene(scene, points_per_view=40, seed=1)


def test_model_from_scene_is_consistent(model, scene):
  assert len(model.cameras) == S and len(model.images) == S and len(model.points3D) == 3 * 40
  assert any(len(p.image_ids) > 1 for p in model.points3D.values())
  for p in model.points3D.values():
    for iid, idx in zip(p.image_ids, p.point2D_idxs):
      im = model.images[int(iid)]
      assert im.point3D_ids[idx] == p.id
      k = colmap.camera_to_pinhole(model.cameras[im.camera_id], np.float64)
      w2c = colmap.image_to_w2c(im, np.float64)
      pc = w2c[:3, :3] @ p.xyz + w2c[:3, 3]
      uv = (k @ pc)[:2] / pc[2]
      np.testing.assert_allclose(uv + 0.5, im.xys[idx], atol=1e-3)  # COLMAP pixel centres
  np.testing.assert_allclose(colmap.image_to_w2c(model.images[2]), scene["extrinsics"][1],
                             atol=1e-6)


def test_colmap_round_trips(model, tmp_path):
  colmap.write_model(model, tmp_path / "txt", binary=False)
  txt = colmap.read_model(tmp_path / "txt")
  assert colmap.models_equal(txt, model)
  colmap.write_model(txt, tmp_path / "bin", binary=True)
  assert sorted(os.listdir(tmp_path / "bin")) == ["cameras.bin", "images.bin", "points3D.bin"]
  binm = colmap.read_model(tmp_path / "bin")
  assert colmap.models_equal(binm, txt)
  colmap.write_model(binm, tmp_path / "txt2", binary=False)
  for f in ("cameras.txt", "images.txt", "points3D.txt"):
    assert (tmp_path / "txt" / f).read_text() == (tmp_path / "txt2" / f).read_text()
  colmap.write_model(binm, tmp_path / "bin2", binary=True)
  for f in ("cameras.bin", "images.bin", "points3D.bin"):
    assert (tmp_path / "bin" / f).read_bytes() == (tmp_path / "bin2" / f).read_bytes()


def test_colmap_text_parsing_details(tmp_path):
  (tmp_path / "cameras.txt").write_text("# c\n3 SIMPLE_RADIAL 640 480 500 320.5 240.5 0\n")
  (tmp_path / "images.txt").write_text(
      "# i\n# j\n5 1 0 0 0 0.5 0 2 3 my image.jpg\n\n6 1 0 0 0 0 0 0 3 b.jpg\n1.5 2.5 -1 3 4 9\n")
  (tmp_path / "points3D.txt").write_text("9 1 2 3 255 0 10 0.25 6 1\n")
  m = colmap.read_model(tmp_path)
  assert m.images[5].name == "my image.jpg" and m.images[5].xys.shape == (0, 2)
  np.testing.assert_array_equal(m.images[6].xys, [[1.5, 2.5], [3, 4]])
  np.testing.assert_array_equal(m.images[6].point3D_ids, [-1, 9])
  np.testing.assert_array_equal(m.points3D[9].rgb, [255, 0, 10])
  np.testing.assert_allclose(colmap.camera_to_pinhole(m.cameras[3]),
                             [[500, 0, 320], [0, 500, 240], [0, 0, 1]])


@pytest.mark.parametrize("model_name,params,ok", [
    ("SIMPLE_PINHOLE", [100, 16.5, 12.5], True),
    ("PINHOLE", [100, 110, 16.5, 12.5], True),
    ("SIMPLE_RADIAL", [100, 16.5, 12.5, 0.0], True),
    ("RADIAL", [100, 16.5, 12.5, 0.0, 0.0], True),
    ("OPENCV", [100, 110, 16.5, 12.5, 0, 0, 0, 0], True),
    ("FULL_OPENCV", [100, 110, 16.5, 12.5] + [0] * 8, True),
    ("SIMPLE_RADIAL", [100, 16.5, 12.5, 0.1], False),
    ("OPENCV", [100, 110, 16.5, 12.5, 0, 0, 0.01, 0], False),
    ("OPENCV_FISHEYE", [100, 110, 16.5, 12.5, 0, 0, 0, 0], False),
])
def test_camera_to_pinhole(model_name, params, ok):
  cam = colmap.Camera(4, model_name, 32, 24, np.array(params, np.float64))
  if ok:
    k = colmap.camera_to_pinhole(cam)
    fy = params[0] if model_name.startswith(("SIMPLE", "RADIAL")) else params[1]
    np.testing.assert_allclose(k, [[100, 0, 16], [0, fy, 12], [0, 0, 1]])
    assert k.dtype == np.float32
    back = colmap.pinhole_camera(4, k, 32, 24)
    np.testing.assert_allclose(back.params[2:], [16.5, 12.5])
  else:
    with pytest.raises(ValueError, match=rf"camera 4.*{model_name}.*image_undistorter") as e:
      colmap.camera_to_pinhole(cam)
    if "FISHEYE" not in model_name:
      assert "p1" in str(e.value) or "'k'" in str(e.value)


def test_read_colmap_scene(scene, model, tmp_path):
  colmap.write_model(model, tmp_path / "sparse" / "0")
  os.makedirs(tmp_path / "images")
  for i in range(S):
    PILImage.fromarray(scene["images"][i]).save(tmp_path / "images" / f"{i:06d}.png")
  out = colmap.read_colmap_scene(tmp_path / "sparse" / "0", tmp_path / "images")
  assert out["names"] == [f"{i:06d}.png" for i in range(S)]
  np.testing.assert_array_equal(out["images"], scene["images"])
  np.testing.assert_allclose(out["intrinsics"], scene["intrinsics"], rtol=1e-6)
  np.testing.assert_allclose(out["extrinsics"], scene["extrinsics"], atol=1e-6)
  assert out["intrinsics"].dtype == out["extrinsics"].dtype == np.float32
  os.remove(tmp_path / "images" / "000001.png")
  with pytest.raises(ValueError, match=r"000001\.png.*not found"):
    colmap.read_colmap_scene(tmp_path / "sparse" / "0", tmp_path / "images")


def test_colmap_corrupt_and_missing(model, tmp_path):
  with pytest.raises(FileNotFoundError, match="no complete COLMAP model"):
    colmap.read_model(tmp_path)
  colmap.write_model(model, tmp_path)
  p = tmp_path / "images.bin"
  p.write_bytes(p.read_bytes()[:-7])
  with pytest.raises(ValueError, match=r"images\.bin.*truncated"):
    colmap.read_model(tmp_path)


# ------------------------------------------------------------------------------------------------
# Video.


def _frames(t=12):
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (4, 5, 3)).astype(np.float32)
  big = np.kron(base, np.ones((16, 16, 1)))  # smooth blocks survive lossy codecs
  return np.stack([np.clip(big * 0.5 + 10 * i, 0, 255).astype(np.uint8) for i in range(t)])


def test_folder_as_video(tmp_path):
  frames = _frames(10)
  for i in (3, 0, 9, 1, 2, 4, 5, 6, 7, 8):  # written out of order: sorted by name
    PILImage.fromarray(frames[i]).save(tmp_path / f"f{i:03d}.png")
  (tmp_path / "notes.txt").write_text("ignored")
  out, ts = video.read_video(tmp_path, folder_fps=10)
  np.testing.assert_array_equal(out, frames)
  np.testing.assert_allclose(ts, np.arange(10) / 10)
  sub, ts = video.read_video(tmp_path, folder_fps=10, fps=5, max_frames=3)
  np.testing.assert_array_equal(sub, frames[[0, 2, 4]])
  np.testing.assert_allclose(ts, [0, 0.2, 0.4])
  _, ts = video.read_video(tmp_path, folder_fps=10, fps=3)
  np.testing.assert_allclose(ts, [0, 0.4, 0.7])  # slots 0, 1/3, 2/3 (1.0 is past the end)


def test_missing_video(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.mp4"):
    video.read_video(tmp_path / "nope.mp4")


def test_video_round_trip(tmp_path):
  try:
    import imageio.v3 as iio
    import imageio_ffmpeg  # noqa: F401
  except ImportError:
    pytest.skip("imageio / imageio-ffmpeg not installed (optional extra 'video')")
  frames = _frames(12)
  p = str(tmp_path / "clip.mp4")
  iio.imwrite(p, frames, fps=10, plugin="FFMPEG")
  out, ts = video.read_video(p)
  assert out.shape == frames.shape and out.dtype == np.uint8
  np.testing.assert_allclose(ts, np.arange(12) / 10)
  assert np.abs(out.astype(np.float32) - frames).mean(axis=(1, 2, 3)).max() < 6
  sub, ts = video.read_video(p, fps=5, max_frames=4)
  np.testing.assert_allclose(ts, [0, 0.2, 0.4, 0.6])
  np.testing.assert_array_equal(sub, out[[0, 2, 4, 6]])
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"not a video")
  with pytest.raises(ValueError, match="bad.mp4"):
    video.read_video(bad)


def test_video_import_hint(monkeypatch, tmp_path):
  import builtins
  real = builtins.__import__

  def fake(name, *a, **kw):
    if name.startswith("imageio"):
      raise ImportError("no imageio")
    return real(name, *a, **kw)
  monkeypatch.setattr(builtins, "__import__", fake)
  p = tmp_path / "x.mp4"
  p.write_bytes(b"")
  with pytest.raises(ImportError, match="pip install imageio imageio-ffmpeg"):
    video.read_video(p)
