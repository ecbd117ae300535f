"""geojax's DA3 preprocessing equals the official ``InputProcessor`` (sizes, intrinsics, pixels).

The official processor imports ``torchvision.transforms`` only for ``ToTensor``, ``Normalize``
and ``CenterCrop``. No CPU build of torchvision matches the pinned ``torch==2.13.0+cpu``, so the
test provides those three transforms (their documented maths, written with torch) as a stand-in
module for the duration of each test; everything else - the OpenCV resizing, the rounding to
multiples of 14, the intrinsics updates and the mixed-size crop - is the official code.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cv2")

from geojax.predict import preprocess as pp  # noqa: E402


def _fake_torchvision() -> types.ModuleType:
  tv = types.ModuleType("torchvision")
  t = types.ModuleType("torchvision.transforms")

  class ToTensor:
    def __call__(self, pic):
      a = np.asarray(pic)
      return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float().div(255.0)

  class Normalize:
    def __init__(self, mean, std):
      self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
      self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x):
      return (x - self.mean) / self.std

  class CenterCrop:
    def __init__(self, size):
      self.h, self.w = size

    def __call__(self, x):
      hh, ww = x.shape[-2:]
      top = int(round((hh - self.h) / 2.0))
      left = int(round((ww - self.w) / 2.0))
      return x[..., top:top + self.h, left:left + self.w]

  t.ToTensor, t.Normalize, t.CenterCrop = ToTensor, Normalize, CenterCrop
  tv.transforms = t
  return tv


@pytest.fixture
def official(monkeypatch):
  tv = _fake_torchvision()
  monkeypatch.setitem(sys.modules, "torchvision", tv)
  monkeypatch.setitem(sys.modules, "torchvision.transforms", tv.transforms)
  name = "depth_anything_3.utils.io.input_processor"
  monkeypatch.delitem(sys.modules, name, raising=False)
  mod = importlib.import_module(name)
  yield mod.InputProcessor()
  sys.modules.pop(name, None)


def _smooth_image(rng, h, w):
  """A natural-ish image: smooth gradients plus noise and a few hard edges."""
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0.0, 1.0, 2.0)], -1)
  img = 127.5 + 100 * base + rng.normal(0, 20, (h, w, 3))
  img[h // 3:h // 2, w // 4:w // 2] = rng.integers(0, 256, 3)
  return np.clip(img, 0, 255).astype(np.uint8)


def _k(h, w):
  return np.array([[1.1 * w, 0, (w - 1) / 2 + 3.25], [0, 1.05 * w, (h - 1) / 2 - 2.5], [0, 0, 1]],
                  np.float64)


def _official(proc, images, ks, res, method):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t, _, k = proc(list(images), extrinsics=None if ks is None else np.stack([np.eye(4)] * len(ks)),
                   intrinsics=None if ks is None else np.stack(ks) + _corner, process_res=res,
                   process_res_method=method, num_workers=1)
  return t.permute(0, 2, 3, 1).numpy(), None if k is None else k.numpy() - _corner


# geojax intrinsics put pixel centres at integers, OpenCV/DA3 at +0.5: offset the principal point.
_corner = np.array([[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]])


@pytest.mark.parametrize("hw,res,method", [
    ((300, 451), 504, "upper_bound_resize"),   # upscale (bicubic), then rounding to 14
    ((720, 1280), 504, "upper_bound_resize"),  # downscale (area)
    ((480, 640), 504, "upper_bound_resize"),   # 504 x 378 -> 378 is a multiple of 14
    ((333, 500), 280, "upper_bound_crop"),
    ((400, 300), 336, "lower_bound_resize"),
    ((401, 299), 252, "lower_bound_crop"),
    ((90, 130), 70, "upper_bound_resize"),
])
def test_matches_official(official, hw, res, method):
  rng = np.random.default_rng(hash(hw) % 1000)
  imgs = [_smooth_image(rng, *hw) for _ in range(2)]
  ks = [_k(*hw), _k(*hw) * np.array([[1.02], [1], [1]])]
  ref_x, ref_k = _official(official, imgs, ks, res, method)
  out = pp.preprocess(imgs, np.stack(ks), process_res=res, method=method)
  assert out.images.shape == ref_x.shape
  assert out.images.shape[1:3] == pp.processed_size(hw, res, method)
  unnorm = lambda x: x * pp.IMAGENET_STD + pp.IMAGENET_MEAN
  err = np.abs(unnorm(out.images) - unnorm(ref_x)).max()
  assert err <= 1 / 255 + 1e-6, err
  # Exact normalisation of the uint8 pixels.
  np.testing.assert_array_equal(out.pixels, np.rint(unnorm(out.images) * 255).astype(np.uint8))
  np.testing.assert_allclose(out.intrinsics, ref_k, rtol=1e-6, atol=1e-4)


def test_mixed_sizes_cropped_like_official(official):
  rng = np.random.default_rng(0)
  sizes = [(300, 400), (310, 420), (280, 400)]
  imgs = [_smooth_image(rng, *s) for s in sizes]
  ks = [_k(*s) for s in sizes]
  ref_x, ref_k = _official(official, imgs, ks, 140, "upper_bound_resize")
  with pytest.warns(UserWarning, match="differ in size"):
    out = pp.preprocess(imgs, np.stack(ks), process_res=140, names=["a.png", "b.png", "c.png"])
  assert out.images.shape == ref_x.shape
  unnorm = lambda x: x * pp.IMAGENET_STD + pp.IMAGENET_MEAN
  assert np.abs(unnorm(out.images) - unnorm(ref_x)).max() <= 1 / 255 + 1e-6
  np.testing.assert_allclose(out.intrinsics, ref_k, rtol=1e-6, atol=1e-4)


def test_resize_kernels_match_opencv():
  import cv2
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  for hw in [(74, 106), (50, 61), (41, 53)]:  # upscaling: bicubic
    ref = cv2.resize(img, hw[::-1], interpolation=cv2.INTER_CUBIC)
    assert np.abs(pp._resize_cubic(img, hw).astype(int) - ref).max() <= 1
  for hw in [(18, 26), (25, 40), (37, 20), (12, 53)]:  # shrinking: area
    ref = cv2.resize(img, hw[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(pp._resize_area(img, hw).astype(int) - ref).max() <= 1


def test_bad_arguments():
  img = np.zeros((20, 30, 3), np.uint8)
  with pytest.raises(ValueError, match="process_res_method"):
    pp.preprocess([img], method="bilinear")
  with pytest.raises(ValueError, match="no images"):
    pp.preprocess([])
  with pytest.raises(ValueError, match="view 0: expected uint8 RGB"):
    pp.preprocess([img.astype(np.float32)])
  with pytest.raises(ValueError, match=r"intrinsics must be \(1, 3, 3\)"):
    pp.preprocess([img], np.eye(3))
  with pytest.raises(ValueError, match="at least 14 pixels"):
    pp.preprocess([np.zeros((5, 300, 3), np.uint8)], process_res=100)
