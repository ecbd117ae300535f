"""URGT beyond the fixture: roi_align semantics (whole-image box, larger-than-crop native
patches), crop layouts (8 x 8 -> 11 x 11 overlap crops, flush last crop, non-square splits),
the official and true RoPE layouts, batch > 1, non-square grids, and bad inputs in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.models import urgt
from geojax.nn import resize


@pytest.fixture(scope="module")
def tiny():
  return urgt.URGT.from_preset("urgt-tiny", rngs=nnx.Rngs(0))


def _inputs(b, h, w, seed=0):
  rng = np.random.default_rng(seed)
  img = jnp.asarray(rng.uniform(size=(b, h, w, 3)), jnp.float32)
  depth = jnp.asarray(rng.uniform(size=(b, h, w)), jnp.float32)
  n = rng.normal(size=(b, h, w, 3))
  normal = jnp.asarray(n / np.linalg.norm(n, axis=-1, keepdims=True), jnp.float32)
  return img, depth, normal


def test_roi_align_whole_image_box_is_half_pixel_bilinear():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 10, 2)), jnp.float32)
  up = resize.roi_align(x, [(0, 0, 10, 12)], (30, 25))[0]
  np.testing.assert_allclose(up, resize.resize_bilinear(x, (30, 25)), atol=1e-5)


def test_roi_align_large_native_patch_averages_samples():
  """A box twice the output size takes 2 x 2 samples per bin; with aligned=True they land on
  pixel centres, so every bin is the mean of a 2 x 2 block of the crop."""
  x = np.random.default_rng(1).normal(size=(20, 24, 1)).astype(np.float32)
  out = resize.roi_align(jnp.asarray(x), [(4, 2, 20, 18)], (8, 8))[0]
  crop = x[2:18, 4:20]
  want = crop.reshape(8, 2, 8, 2, 1).mean((1, 3))
  np.testing.assert_allclose(out, want, atol=1e-5)
  wy, _ = resize.roi_align_matrices((0, 0, 4, 4), (4, 4), (4, 4))
  np.testing.assert_allclose(wy, np.eye(4))  # an identity crop


def test_layouts():
  lay = urgt.crop_layout((2160, 3840), (8, 8))
  assert lay.grid == (11, 11) and lay.patch_hw == (270, 480)
  assert lay.boxes[-1].tolist() == [3360, 1890, 3840, 2160]  # last crop flush with the border
  grid = urgt.crop_layout((2160, 3840), (8, 8), overlap=False)
  assert grid.grid == (8, 8) and len(grid.starts) == 64
  assert urgt.crop_layout((80, 96), (2, 3), overlap=False).grid == (2, 3)
  assert urgt.aligned_size(2161, 3845) == (2160, 3840)
  with pytest.raises(ValueError, match=r"resize it to 3840x2160"):
    urgt.crop_layout((2161, 3845), (8, 8))


def test_rope_layouts():
  grid = urgt.crop_layout((80, 96), (2, 2), overlap=False)
  np.testing.assert_array_equal(urgt.layout_positions(grid, 5, "true"),
                                urgt.layout_positions(grid, 5, "official"))
  ovl = urgt.crop_layout((80, 96), (2, 2))  # starts y 0, 28, 40; x 0, 34, 48
  true = urgt.layout_positions(ovl, 5, "true")
  np.testing.assert_allclose(true[1, 5], [1.0, 34 * 5 / 48 + 1.0])  # fractional, real offset
  np.testing.assert_array_equal(true[:, :5], 0.0)  # special tokens at (0, 0)
  official = urgt.layout_positions(ovl, 5, "official")
  np.testing.assert_array_equal(official[1, 5], [1.0, 6.0])  # abutting: the next 5-token block
  with pytest.raises(ValueError, match="square number of crops"):
    urgt.layout_positions(urgt.crop_layout((80, 96), (2, 3), overlap=False), 5, "official")
  with pytest.raises(ValueError, match="'official' or 'true'"):
    urgt.layout_positions(grid, 5, "global")


def test_batch_matches_single_images_and_non_square_grid(tiny):
  img, depth, normal = _inputs(2, 56, 84)
  both = urgt.refine(tiny, img, depth, normal, patch_split=(2, 3), overlap=False, crop_size=28,
                     rope_positions="true")
  assert both["depth"].shape == (2, 56, 84) and both["normal"].shape == (2, 56, 84, 3)
  one = urgt.refine(tiny, img[1:], depth[1:], normal[1:], patch_split=(2, 3), overlap=False,
                    crop_size=28, rope_positions="true")
  np.testing.assert_allclose(both["depth"][1], one["depth"][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(both["normal"][1], one["normal"][0], rtol=1e-5, atol=1e-6)
  # the offsets change the prior: zeroing the heads' last conv gives the prior back
  m = nnx.clone(tiny)
  for head in (m.depth_head, m.normal_head):
    conv = head.output_conv2.conv2
    conv.kernel[...] = jnp.zeros_like(conv.kernel[...])
    conv.bias[...] = jnp.zeros_like(conv.bias[...])
  flat = urgt.refine(m, img, depth, normal, patch_split=(2, 2), overlap=False, crop_size=28)
  crop_prior = jax.vmap(lambda x: resize.roi_align(x, flat["layout"].boxes, (28, 28)))(
      depth[..., None])
  back = resize.resize_bilinear_align_corners(crop_prior[:, 0], (28, 42))[..., 0]
  np.testing.assert_allclose(flat["depth"][:, :28, :42], back, atol=1e-6)
  assert float(jnp.abs(both["depth"] - depth).max()) > 1e-3


def test_bad_inputs(tiny):
  img, depth, normal = _inputs(1, 56, 84)
  with pytest.raises(ValueError, match="coarse_depth must have shape"):
    urgt.refine(tiny, img, depth[..., None], normal)
  with pytest.raises(ValueError, match="coarse_normal must have shape"):
    urgt.refine(tiny, img, depth, normal[..., :2])
  with pytest.raises(ValueError, match="crop_size must be a positive multiple of 14"):
    urgt.refine(tiny, img, depth, normal, patch_split=(2, 2), crop_size=30)
  with pytest.raises(ValueError, match=r"image must be a float array \(B, H, W, 3\)"):
    urgt.refine(tiny, img[0], depth, normal)
  crops = jnp.zeros((1, 4, 28, 28, 3))
  with pytest.raises(ValueError, match="depth_prior has shape"):
    tiny(crops, jnp.zeros((1, 4, 14, 14, 1)), jnp.zeros((1, 4, 28, 28, 3)))
  with pytest.raises(ValueError, match=r"normal_prior must be a float array \(B, S, P, P, 3\)"):
    tiny(crops, jnp.zeros((1, 4, 28, 28, 1)), jnp.zeros((1, 4, 28, 28)))
  with pytest.raises(ValueError, match="positions must have shape"):
    tiny(crops, jnp.zeros((1, 4, 28, 28, 1)), jnp.zeros((1, 4, 28, 28, 3)),
         positions=np.zeros((4, 8, 2)))


def test_crop_size_off_the_stored_grid_interpolates_inside_the_network(tiny):
  """Crops of 84 px give a 6 x 6 token grid against the stored 5 x 5: the position embedding is
  resized (antialiased bicubic, size-based) inside the network, as officially."""
  rng = np.random.default_rng(3)
  crops = jnp.asarray(rng.uniform(size=(2, 84, 84, 3)), jnp.float32)
  dp = jnp.asarray(rng.uniform(size=(2, 84, 84, 1)), jnp.float32)
  npr = jnp.asarray(rng.normal(size=(2, 84, 84, 3)), jnp.float32)
  enc = tiny.patch_embed
  got = tiny.embed(crops, dp, npr)
  x = (crops - jnp.asarray([0.485, 0.456, 0.406])) / jnp.asarray([0.229, 0.224, 0.225])
  tok = enc.patch_embed(x) + tiny.patch_embed_depth(dp) + tiny.patch_embed_normal(npr)
  cls = jnp.broadcast_to(enc.cls_token[...], (2, 1, tok.shape[-1]))
  grid = resize.resize_pos_embed_antialias(enc.pos_embed[...][0, 1:].reshape(5, 5, -1), (6, 6))
  pe = jnp.concatenate([enc.pos_embed[...][:, :1], grid.reshape(1, 36, -1)], 1)
  want = jnp.concatenate([cls, tok], 1) + pe
  reg = jnp.broadcast_to(enc.register_tokens[...], (2, 4, tok.shape[-1]))
  want = jnp.concatenate([want[:, :1], reg, want[:, 1:]], 1)
  want = enc.norm(enc.run_layers(want, 0, enc.depth))[:, 5:]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  out = urgt.refine(tiny, *_inputs(1, 48, 48), patch_split=(2, 2), overlap=False, crop_size=84)
  assert out["depth"].shape == (1, 48, 48) and bool(jnp.isfinite(out["depth"]).all())


@pytest.mark.parametrize("split,overlap,crops", [((3, 3), False, 9), ((4, 4), False, 16),
                                                 ((3, 3), True, 16)])
def test_other_splits(tiny, split, overlap, crops):
  """3 x 3 and 4 x 4 splits: the official square layout places crop k at block
  (k // n, k % n); the network runs on every crop and stitching covers the image."""
  img, depth, normal = _inputs(1, 84, 84, seed=4)
  res = urgt.refine(tiny, img, depth, normal, patch_split=split, overlap=overlap, crop_size=28)
  lay = res["layout"]
  assert len(lay.starts) == crops
  n = int(np.sqrt(crops))
  pos = urgt.layout_positions(lay, 2, "official")
  for k in range(crops):
    np.testing.assert_array_equal(pos[k, 5], [(k // n) * 2 + 1, (k % n) * 2 + 1])
  assert res["depth"].shape == (1, 84, 84) and bool(jnp.isfinite(res["normal"]).all())


def test_training_start_refines_to_the_prior():
  """After init_training_start the prior embeddings and the heads' last convs are N(0, 1e-4)
  with zero biases, so in grid mode with crops at their native size (where cropping and
  resizing back are exact) the refinement returns the priors up to tiny offsets; a randomly
  initialised head does not."""
  import jax
  from flax import nnx

  from geojax.models import urgt
  keys = jax.random.split(jax.random.key(0), 3)
  image = jax.random.uniform(keys[0], (1, 56, 56, 3))
  depth = jax.random.uniform(keys[1], (1, 56, 56))
  normal = jax.random.normal(keys[2], (1, 56, 56, 3))
  opts = dict(patch_split=(2, 2), overlap=False, crop_size=28)
  model = urgt.URGT.from_preset("urgt-tiny", rngs=nnx.Rngs(0))
  random_out = urgt.refine(model, image, depth, normal, **opts)
  model = urgt.init_training_start(model)
  k = model.depth_head.output_conv2.conv2
  assert float(jnp.abs(k.bias[...]).max()) == 0.0
  assert 0 < float(jnp.std(k.kernel[...])) < 2e-4
  out = urgt.refine(model, image, depth, normal, **opts)
  np.testing.assert_allclose(out["depth"], depth, atol=1e-2)
  np.testing.assert_allclose(out["normal"], normal, atol=1e-2)
  assert float(jnp.abs(random_out["depth"] - depth).max()) > 0.1
