"""DAGE branches the parity fixture does not take (``../shared/fixtures/dage/README.md`` §12),
each checked against PyTorch's own ops or the reference's stated rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.models import dage as dage_lib
from geojax.nn import resize, rope

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.fixture(scope="module")
def tiny():
  return dage_lib.DAGE.from_preset("dage-tiny", rngs=nnx.Rngs(3))


def _video(seed, b, n, h, w):
  return jax.random.uniform(jax.random.key(seed), (b, n, h, w, 3))


@pytest.mark.parametrize("hw,out,aa", [((56, 84), (23, 31), True), ((56, 84), (23, 31), False),
                                       ((20, 30), (45, 71), True), ((112, 168), (128, 192), False),
                                       ((128, 192), (112, 168), False), ((97, 61), (14, 28), True)])
def test_resize_bilinear_matches_torch(hw, out, aa):
  x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), out, mode="bilinear",
                       align_corners=False, antialias=aa).permute(0, 2, 3, 1).numpy()
  got = np.asarray(resize.resize_bilinear(jnp.asarray(x), out, antialias=aa))
  np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("n_in,n_out", [(12, 74), (4, 8), (6, 12), (5, 13), (7, 7), (9, 4),
                                         (37, 100), (12, 45)])
def test_legacy_nearest_matches_torch(n_in, n_out):
  src = torch.arange(n_in, dtype=torch.float32)[None, None, :, None].expand(1, 1, n_in, 1)
  want = F.interpolate(src, size=(n_out, 1), mode="nearest")[0, 0, :, 0].long().numpy()
  assert np.array_equal(resize.legacy_nearest_index(n_in, n_out), want)
  if (n_in, n_out) == (12, 74):
    assert want[37] == 5  # float32 scale; exact arithmetic would give 6


def test_snapped_positions_fractional_grid():
  """Non-integer LR -> HR ratio: every HR token takes the (1-based) LR cell it falls in."""
  lr, hr = (5, 7), (13, 17)
  grid = torch.stack(torch.meshgrid(torch.arange(5.), torch.arange(7.), indexing="ij"))[None]
  want = F.interpolate(grid, size=hr, mode="nearest")[0].permute(1, 2, 0).reshape(-1, 2) + 1
  assert np.array_equal(rope.snapped_positions(lr, hr), want.numpy())


@pytest.mark.parametrize("rows,cols", [(40, 12), (12, 45), (33, 50), (31, 31)])
def test_interpolated_rope_either_axis(rows, cols):
  """RoPE2DInterpolated: an axis with max position + 1 > 32 is rescaled by 32 / (max + 1),
  via cos/sin tables of the scaled integer range (official), per axis."""
  pos = rope.grid_positions(rows, cols, offset=1.0)
  s = rope.interpolation_scales(pos)
  assert s[0] == (np.float32(32 / (rows + 1)) if rows + 1 > 32 else 1.0)
  assert s[1] == (np.float32(32 / (cols + 1)) if cols + 1 > 32 else 1.0)
  d = 16
  x = np.random.default_rng(1).standard_normal((1, rows * cols, 2, d)).astype(np.float32)
  got = np.asarray(rope.apply_rope_2d(jnp.asarray(x), rope.interpolated_positions(pos)[None]))
  # reference: per-axis tables t * scale (float32), gathered by the integer positions
  half = d // 2
  inv = 1.0 / (100.0 ** (torch.arange(0, half, 2).float() / half))
  outs = []
  for axis, part in ((0, x[..., :half]), (1, x[..., half:])):
    n = int(pos[:, axis].max()) + 1
    t = torch.arange(n, dtype=torch.float32)
    if s[axis] != 1.0:
      t = t * float(32 / n)
    fr = torch.einsum("i,j->ij", t, inv)
    fr = torch.cat([fr, fr], -1)
    idx = torch.from_numpy(pos[:, axis].astype(np.int64))
    cos, sin = fr.cos()[idx][None, :, None], fr.sin()[idx][None, :, None]
    tt = torch.from_numpy(part)
    rot = torch.cat([-tt[..., half // 2:], tt[..., :half // 2]], -1)
    outs.append((tt * cos + rot * sin).numpy())
  np.testing.assert_allclose(got, np.concatenate(outs, -1), atol=2e-5)


def test_size_rules():
  # LR: landscape / portrait, the floor to multiples of 14, lr_resolution
  assert dage_lib.lr_size(112, 168, 84) == (56, 84)
  assert dage_lib.lr_size(168, 112, 84) == (84, 56)
  assert dage_lib.lr_size(1080, 1920, 252) == (140, 252)
  assert dage_lib.lr_size(100, 75) == (98, 70)  # portrait, not multiples of 14
  assert dage_lib.lr_size(50, 50, 100) == (42, 42)
  assert dage_lib.lr_size(300, 400, None, (70, 98)) == (70, 98)
  with pytest.raises(ValueError, match="lr_resolution"):
    dage_lib.lr_size(300, 400, None, (70, 100))
  # HR: token budgets that truncate (README §11.7)
  assert dage_lib.hr_grid(112, 168, 1000) == (25, 38)
  assert dage_lib.hr_grid(1080, 1920) == (45, 80)
  assert dage_lib.hr_grid(480, 640) == (51, 69)
  assert dage_lib.hr_grid(1000, 1000) == (60, 60)
  assert dage_lib.hr_grid(436, 1024) == (39, 91)
  assert dage_lib.hr_grid(168, 112, 96) == (12, 8)


def test_lr_video_absent_resizes_hr_antialiased(tiny):
  hr = _video(0, 1, 2, 60, 90)
  lh, lw = dage_lib.lr_size(60, 90, 56)
  assert (lh, lw) == (28, 56)
  lr_t = F.interpolate(torch.from_numpy(np.array(hr[0])).permute(0, 3, 1, 2), (lh, lw),
                       mode="bilinear", antialias=True).clamp(0, 1).permute(0, 2, 3, 1)
  lr = jnp.asarray(lr_t.numpy())[None]
  a = tiny(hr, lr_max_size=56, hr_num_tokens=40)
  b = tiny(hr, lr, lr_max_size=56, hr_num_tokens=40)
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=2e-4, atol=2e-5)
  # a plain (not antialiased) resize would have given other cameras
  lr_plain = jax.image.resize(hr, (1, 2, lh, lw, 3), "linear", antialias=False)
  c = tiny(hr, lr_plain, lr_max_size=56, hr_num_tokens=40)
  assert not np.allclose(np.asarray(c["camera_poses"]), np.asarray(a["camera_poses"]),
                         atol=1e-5)


def test_portrait_batch_and_chunks(tiny):
  """Portrait input of a size that is no multiple of 14, B = 2: shapes, per-sample
  independence, and the chunked HR path equal to the one-shot one."""
  hr = _video(1, 2, 3, 75, 50)
  kw = dict(lr_max_size=70, hr_num_tokens=30)
  out = tiny(hr, **kw)
  assert out["local_points"].shape == (2, 3, 75, 50, 3)
  assert out["conf"].shape == (2, 3, 75, 50)
  assert out["camera_poses"].shape == (2, 3, 4, 4)
  assert out["metric_scale"].shape == (2, 1)
  one = tiny(hr[1:], **kw)
  for k in out:
    np.testing.assert_allclose(np.asarray(out[k][1:]), np.asarray(one[k]), rtol=2e-4, atol=2e-5)
  r = np.asarray(out["camera_poses"][..., :3, :3])
  np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape),
                             atol=1e-5)
  assert np.all(np.asarray(out["local_points"][..., 2]) > 0)
  chunked = tiny(hr, chunk=2, **kw)
  for k in ("local_points", "conf", "camera_poses"):
    np.testing.assert_allclose(np.asarray(chunked[k]), np.asarray(out[k]), rtol=2e-4,
                               atol=2e-5)
  assert np.all(np.isfinite(np.asarray(chunked["metric_scale"])))
  np.testing.assert_allclose(np.asarray(tiny(hr, chunk=3, **kw)["metric_scale"]),
                             np.asarray(out["metric_scale"]), rtol=1e-5)


def test_bad_inputs(tiny):
  hr = _video(2, 1, 2, 56, 84)
  with pytest.raises(ValueError, match="hr_max_size"):
    tiny(hr, hr_max_size=168)
  with pytest.raises(ValueError, match=r"hr_video must be .*\(B, N, H, W, 3\)"):
    tiny(hr[0])
  with pytest.raises(ValueError, match="hr_video must be floating point"):
    tiny((hr * 255).astype(jnp.uint8))
  with pytest.raises(ValueError, match="lr_video has"):
    tiny(hr, hr[:, :1])
  with pytest.raises(ValueError, match="chunk"):
    tiny(hr, chunk=0)


def test_infer_postprocessing(tiny):
  hr = _video(4, 1, 2, 56, 84)
  raw = tiny(hr, lr_max_size=56, hr_num_tokens=24)
  out = dage_lib.infer(tiny, hr, lr_max_size=56, hr_num_tokens=24)
  s = np.asarray(raw["metric_scale"])[0, 0]
  np.testing.assert_allclose(np.asarray(out["local_points"]),
                             np.asarray(raw["local_points"]) * s, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["camera_poses"][..., :3, 3]),
                             np.asarray(raw["camera_poses"][..., :3, 3]) * s, rtol=1e-5)
  pose = np.asarray(out["camera_poses"])[0, 1]
  p = np.asarray(out["local_points"])[0, 1, 10, 20]
  np.testing.assert_allclose(np.asarray(out["global_points"])[0, 1, 10, 20],
                             pose[:3, :3] @ p + pose[:3, 3], rtol=1e-4, atol=1e-5)
  k = np.asarray(out["intrinsics"])
  assert k.shape == (1, 2, 3, 3) and np.all(k[..., 0, 2] == 0.5) and np.all(k[..., 2, 2] == 1)
  np.testing.assert_allclose(k[..., 0, 0] / k[..., 1, 1], 56 / 84, rtol=1e-5)  # fx/W vs fy/H
  assert np.array_equal(np.asarray(out["mask"]), np.asarray(jax.nn.sigmoid(raw["conf"]) > 0.2))
