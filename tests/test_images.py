"""Images as users have them (issue 17): EXIF-rotated phone photos read upright, with their
cameras, depth, masks and normals turned alike; grey, 16-bit, palette, RGBA, CMYK and 1-bit
images read as RGB; tiny, wide and unicode-named inputs predict; bad image files name the file."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from geojax.predict import cli as predict_cli
from reliability_helpers import one_error_line as _one_error_line
from test_predict import tiny_checkpoint  # noqa: F401  (a module-scoped fixture)


# ----------------------------------------------------------------------- EXIF orientation


def _save_with_orientation(path, pixels, tag, **kw):
  exif = Image.Exif()
  exif[0x0112] = tag
  Image.fromarray(pixels).save(path, exif=exif.tobytes(), **kw)


def _asymmetric(h=5, w=7):
  return np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) * 2


@pytest.mark.parametrize("tag", range(1, 9))
def test_exif_orientation_matches_pillow_and_pixel_map(tmp_path, tag):
  """``load_rgb`` turns an image as Pillow's ``exif_transpose`` does, for all eight tags;
  ``pixel_map`` sends each stored pixel to where the turned array holds it; ``exif=False``
  and ``read_rgb`` give the stored pixels."""
  from PIL import ImageOps

  from geojax.data.formats import orientation
  from geojax.data.formats.scene_folder import load_rgb, read_rgb
  stored = _asymmetric()
  p = tmp_path / "im.png"
  _save_with_orientation(p, stored, tag)
  with Image.open(p) as im:
    want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  np.testing.assert_array_equal(load_rgb(p), want)
  np.testing.assert_array_equal(load_rgb(p, exif=False), stored)
  arr, o = read_rgb(p)
  assert o == tag and np.array_equal(arr, stored)
  assert orientation.upright_size(stored.shape[:2], tag) == want.shape[:2]
  h, w = stored.shape[:2]
  m = orientation.pixel_map(tag, (h, w))
  v, u = np.mgrid[:h, :w]
  up = m @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
  uu, vv = up[0].astype(int), up[1].astype(int)
  np.testing.assert_array_equal(want[vv, uu], stored[v.ravel(), u.ravel()])


@pytest.mark.parametrize("tag", [3, 6, 8])
def test_camera_turns_with_the_image(tag):
  """World points project, through the turned camera, to the turned pixel of their stored
  projection; K stays upper triangular with positive focals and R a rotation. Mirroring tags
  are refused with a message naming the camera."""
  from geojax.data.formats import orientation
  rng = np.random.default_rng(tag)
  h, w = 30, 50
  k = np.array([[40.0, 0, 23.5], [0, 44.0, 13.0], [0, 0, 1]])
  a = rng.normal(size=3)
  c, s = np.cos(a[0]), np.sin(a[0])
  rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
  w2c = np.eye(4)
  w2c[:3, :3], w2c[:3, 3] = rot, rng.normal(size=3)
  world = rng.normal(size=(20, 3)) + rot.T @ (np.array([0, 0, 6.0]) - w2c[:3, 3])

  def project(k_, e_):
    cam = world @ e_[:3, :3].T + e_[:3, 3]
    p = cam @ k_.T
    return p[:, :2] / p[:, 2:]

  k2, e2 = orientation.camera(k, w2c, tag, (h, w))
  got = project(k2, e2)
  stored = project(k, w2c)
  want = (np.c_[stored, np.ones(len(stored))] @ orientation.pixel_map(tag, (h, w)).T)[:, :2]
  np.testing.assert_allclose(got, want, atol=1e-9)
  assert k2[0, 1] == k2[1, 0] == k2[2, 0] == k2[2, 1] == 0 and k2[0, 0] > 0 and k2[1, 1] > 0
  np.testing.assert_allclose(e2[:3, :3] @ e2[:3, :3].T, np.eye(3), atol=1e-12)
  assert np.linalg.det(e2[:3, :3]) > 0
  for mirrored in (2, 4, 5, 7):
    with pytest.raises(ValueError, match=f"cam0: EXIF orientation {mirrored} mirrors"):
      orientation.camera(k, w2c, mirrored, (h, w), where="cam0")


def _world_points(depth, ks, w2c):
  s, h, w = depth.shape
  v, u = np.mgrid[:h, :w]
  pix = np.stack([u, v, np.ones_like(u)], -1).astype(np.float64)
  out = []
  for i in range(s):
    cam = pix @ np.linalg.inv(ks[i]).T * depth[i][..., None]
    r, t = w2c[i, :3, :3], w2c[i, :3, 3]
    out.append((cam - t) @ r)
  return np.stack(out)


def test_scene_folder_with_phone_rotated_images(tmp_path):
  """A scene folder whose images carry EXIF tag 6 (cameras, depth, masks and normals on the
  stored grid, as a phone and COLMAP see them) reads upright: the images are the stored ones
  turned, and every pixel lifts to the same world point, with the same world normal, as the
  stored reading; cameras given for the upright size are used as they are; ``exif=False`` is
  the stored scene."""
  from geojax.data.formats import orientation
  from geojax.data.formats.scene_folder import read_scene, write_scene
  from geojax.data.synthetic import render_scene
  scene = render_scene(0, 0, num_views=2, height=24, width=40)
  root = tmp_path / "scene"
  write_scene(scene, root, names=["a.png", "b.png"])
  for i, name in enumerate(["a.png", "b.png"]):
    _save_with_orientation(root / "images" / name, scene["images"][i], 6)
  flat = read_scene(root, exif=False)
  np.testing.assert_array_equal(flat["images"], scene["images"])
  up = read_scene(root)
  assert up["images"].shape == (2, 40, 24, 3)
  for i in range(2):
    np.testing.assert_array_equal(up["images"][i], orientation.apply(scene["images"][i], 6))
  p_up = _world_points(up["depth"], up["intrinsics"].astype(np.float64),
                       up["extrinsics"].astype(np.float64))
  p_flat = _world_points(flat["depth"], flat["intrinsics"].astype(np.float64),
                         flat["extrinsics"].astype(np.float64))
  ok = up["valid"]
  for i in range(2):
    np.testing.assert_array_equal(ok[i], orientation.apply(flat["valid"][i], 6))
    np.testing.assert_allclose(p_up[i][ok[i]], orientation.apply(p_flat[i], 6)[ok[i]],
                               rtol=1e-4, atol=1e-4)
    n_up = up["normals"][i] @ up["extrinsics"][i, :3, :3]  # camera -> world: R^T n
    n_flat = flat["normals"][i] @ flat["extrinsics"][i, :3, :3]
    np.testing.assert_allclose(n_up, orientation.apply(n_flat, 6), atol=1e-5)
  _save_with_orientation(root / "images" / "b.png", scene["images"][1], 2)  # mirrored
  with pytest.raises(ValueError, match="b.png.*EXIF orientation 2 mirrors"):
    read_scene(root)
  _save_with_orientation(root / "images" / "b.png", scene["images"][1], 6)
  # cameras.json written for the upright image: nothing is turned but the pixels
  cams = json.loads((root / "cameras.json").read_text())
  for fr, k in zip(cams["frames"], up["intrinsics"]):
    fr.update(width=24, height=40, fx=float(k[0, 0]), fy=float(k[1, 1]), cx=float(k[0, 2]),
              cy=float(k[1, 2]))
  (root / "cameras.json").write_text(json.dumps(cams))
  for sub in ("depth", "masks", "normals"):
    for f in (root / sub).iterdir():
      f.unlink()
  again = read_scene(root)
  np.testing.assert_array_equal(again["images"], up["images"])
  np.testing.assert_allclose(again["intrinsics"], up["intrinsics"], rtol=1e-6)
  np.testing.assert_array_equal(again["extrinsics"], flat["extrinsics"])
  _save_with_orientation(root / "images" / "a.png", scene["images"][0], 5)  # mirrored + turned
  assert read_scene(root)["images"].shape == (2, 40, 24, 3)  # upright cameras: no need to turn



def test_predict_turns_phone_photos_upright(tmp_path, capsys, tiny_checkpoint):  # noqa: F811
  """A phone-style JPEG (landscape pixels, EXIF tag 6) predicts as a portrait image, with
  depth and cameras equal to its upright twin (the same decoded pixels turned and stored as
  PNG); ``--ignore-exif`` predicts the stored landscape pixels, as the official code does."""
  from geojax.data.formats import orientation
  from geojax.data.synthetic import render_scene
  stored = render_scene(0, 3, num_views=1, height=56, width=84)["images"][0]
  for d in ("phone", "twin", "flat"):
    (tmp_path / d).mkdir()
  _save_with_orientation(tmp_path / "phone" / "IMG_0001.jpg", stored, 6, quality=90)
  with Image.open(tmp_path / "phone" / "IMG_0001.jpg") as im:
    decoded = np.asarray(im.convert("RGB"))
  Image.fromarray(orientation.apply(decoded, 6)).save(tmp_path / "twin" / "IMG_0001.png")
  Image.fromarray(decoded).save(tmp_path / "flat" / "IMG_0001.png")
  base = ["--weights", tiny_checkpoint, "--no-progress", "--process-res", "98",
          "--max-points", "500"]

  def outputs(out, scene):
    cams = json.loads((out / scene / "cameras.json").read_text())["frames"][0]
    return np.load(out / scene / "depth" / "IMG_0001.npy"), cams

  out = tmp_path / "upright"
  assert predict_cli.main(base + ["--out", str(out), str(tmp_path / "phone"),
                                  str(tmp_path / "twin")]) == 0, capsys.readouterr().err
  (d_phone, c_phone), (d_twin, c_twin) = outputs(out, "phone"), outputs(out, "twin")
  assert d_phone.shape[0] > d_phone.shape[1] and c_phone["width"] < c_phone["height"]
  np.testing.assert_allclose(d_phone, d_twin, rtol=1e-6)
  for key in ("fx", "fy", "cx", "cy"):
    assert abs(c_phone[key] - c_twin[key]) <= 1e-6 * abs(c_twin[key]) + 1e-9, key
  np.testing.assert_allclose(c_phone["extrinsics"], c_twin["extrinsics"], atol=1e-6)

  out = tmp_path / "stored"
  assert predict_cli.main(base + ["--ignore-exif", "--out", str(out), str(tmp_path / "phone"),
                                  str(tmp_path / "flat")]) == 0, capsys.readouterr().err
  (d_phone, c_phone), (d_flat, _) = outputs(out, "phone"), outputs(out, "flat")
  assert d_phone.shape[1] > d_phone.shape[0] and c_phone["width"] > c_phone["height"]
  np.testing.assert_allclose(d_phone, d_flat, rtol=1e-6)


# ------------------------------------------------------------- images a user expects to work


def _mode_cases(rgb):
  """name -> (PIL image to save, file suffix, save kwargs, the RGB we expect back, tolerance)."""
  grey = np.asarray(Image.fromarray(rgb).convert("L"))
  grey16 = grey.astype(np.uint16) * 257
  cmyk = Image.fromarray(rgb).convert("CMYK")
  pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 90, np.uint8)], -1)
  grey3 = np.repeat(grey[..., None], 3, -1)
  return {
      "grey-8bit": (Image.fromarray(grey), ".png", {}, grey3, 0),
      "grey-16bit": (Image.fromarray(grey16), ".png", {}, grey3, 0),
      "grey-alpha": (Image.fromarray(grey).convert("LA"), ".png", {}, grey3, 0),
      "palette": (pal, ".png", {}, np.asarray(pal.convert("RGB")), 0),
      "rgba": (Image.fromarray(rgba), ".png", {}, rgb, 0),
      "cmyk-jpeg": (cmyk, ".jpg", {"quality": 95}, rgb, 12),
      "bilevel": (Image.fromarray(grey > 128), ".png", {}, np.where(grey3 > 128, 255, 0), 0),
  }


@pytest.mark.parametrize("case", sorted(_mode_cases(np.zeros((2, 2, 3), np.uint8))))
def test_image_modes_read_as_rgb(tmp_path, case):
  """Grey (8 and 16 bit), grey+alpha, palette, RGBA, CMYK JPEG and 1-bit images read as
  ``(H, W, 3)`` uint8 RGB with the values a viewer shows (alpha dropped; 16 bit scaled)."""
  from geojax.data.formats.scene_folder import load_rgb
  from geojax.data.synthetic import render_scene
  rgb = render_scene(0, 4, num_views=1, height=24, width=32)["images"][0]
  im, suffix, kw, want, tol = _mode_cases(rgb)[case]
  p = tmp_path / f"img{suffix}"
  im.save(p, **kw)
  got = load_rgb(p)
  assert got.dtype == np.uint8 and got.shape == (24, 32, 3)
  err = np.abs(got.astype(int) - np.asarray(want).astype(int))
  assert err.mean() <= tol, (case, err.mean())


@pytest.mark.parametrize("bad", ["zero-byte", "truncated-png", "truncated-jpeg", "text-as-jpg",
                                 "float-image", "32bit-depth"])
def test_bad_images_name_the_file(tmp_path, bad):
  from geojax.data.formats.scene_folder import load_rgb
  rgb = np.full((16, 16, 3), 100, np.uint8)
  p = tmp_path / ("x.png" if "png" in bad or bad in ("zero-byte", "float-image") else "x.jpg")
  if bad == "zero-byte":
    p.write_bytes(b"")
  elif bad.startswith("truncated"):
    Image.fromarray(rgb).save(p)
    p.write_bytes(p.read_bytes()[:40])
  elif bad == "text-as-jpg":
    p.write_text("this is not a picture")
  elif bad == "float-image":
    p = tmp_path / "x.tiff"
    Image.fromarray(np.ones((4, 4), np.float32)).save(p)
  else:
    p = tmp_path / "x.tiff"
    Image.fromarray(np.full((4, 4), 1 << 20, np.int32)).save(p)
  with pytest.raises(ValueError, match=str(p)):
    load_rgb(p)


def test_predict_tiny_wide_and_unicode_names(tmp_path, capsys, tiny_checkpoint):  # noqa: F811
  """A 3x2 image, a 300x45 panorama strip and a file with spaces and non-ASCII letters in a
  folder with the same all predict: exit 0, finite depth of the input's aspect. A strip too
  thin for the processing size is one line naming the file and the fix."""
  from geojax.data.synthetic import render_scene
  rgb = render_scene(0, 5, num_views=1, height=60, width=300)["images"][0]
  cases = {"tiny": rgb[:2, :3], "wide": rgb[:45], "Ferien 2026 — Čapek": rgb[10:12, 5:8]}
  for folder, px in cases.items():
    (tmp_path / folder).mkdir()
    Image.fromarray(np.ascontiguousarray(px)).save(tmp_path / folder / "фото 1.png")
  out = tmp_path / "out"
  code = predict_cli.main(["--weights", tiny_checkpoint, "--no-progress", "--process-res", "98",
                           "--max-points", "500", "--out", str(out),
                           *[str(tmp_path / f) for f in cases]])
  assert code == 0, capsys.readouterr().err
  for folder, px in cases.items():
    scene = [d for d in out.iterdir() if d.name.startswith(folder.split()[0])]
    assert len(scene) == 1, sorted(os.listdir(out))
    depth = np.load(next((scene[0] / "depth").glob("*.npy")))
    assert np.isfinite(depth).all() and (depth > 0).all()
    assert (depth.shape[1] > depth.shape[0]) == (px.shape[1] > px.shape[0])
  capsys.readouterr()
  (tmp_path / "strip").mkdir()
  Image.fromarray(np.ascontiguousarray(rgb[:12])).save(tmp_path / "strip" / "pano.png")
  code = predict_cli.main(["--weights", tiny_checkpoint, "--no-progress", "--process-res", "98",
                           "--out", str(tmp_path / "out2"), str(tmp_path / "strip")])
  assert code == 2
  _one_error_line(capsys.readouterr().err, "pano.png", "300x12", "--process-res")
