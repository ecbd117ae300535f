"""D4RT network pieces, each against an independent computation: tubelets against torch's
Conv3d, the position-table resize against torch's trilinear interpolation, Fourier features and
RGB patches against hand values, the encoder's local/global schedule against an unrolled
re-implementation, and the decoder's independence of queries (chunks, added queries, devices);
released-size parameter counts and an ahead-of-time compile of ``d4rt-g``; clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.models import d4rt
from geojax.nn import layers, queries as qf, video as vid
from geojax.nn.layers import count_params
from geojax.parallel.sharding import creation_context
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, S = 4, 64  # tiny clip: 4 frames at 64 x 64 -> 2 slots x 16 tokens


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def tiny():
  return d4rt.D4RT.from_preset("d4rt-tiny", rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def clip():
  rng = np.random.default_rng(0)
  return rng.random((2, T, S, S, 3), dtype=np.float32)


def _queries(rng, b, n, t=T):
  return np.stack([rng.random((b, n)), rng.random((b, n)), rng.integers(0, t, (b, n)),
                   rng.integers(0, t, (b, n)), rng.integers(0, t, (b, n))], -1).astype(np.float32)


# ------------------------------------------------------------------------------ shared pieces


def test_tubelet_embed_equals_torch_conv3d():
  torch = pytest.importorskip("torch")
  with creation_context():
    emb = vid.TubeletEmbed(2, 4, 5, rngs=nnx.Rngs(1))
  x = np.random.default_rng(1).standard_normal((2, 6, 8, 12, 3)).astype(np.float32)
  ours = np.asarray(emb(jnp.asarray(x)))  # (B, 3 slots, 2*3 tokens, 5)
  w = np.asarray(emb.kernel[...]).transpose(4, 3, 0, 1, 2)  # (D, C, kt, p, p)
  ref = torch.nn.functional.conv3d(torch.from_numpy(x).permute(0, 4, 1, 2, 3),
                                   torch.from_numpy(w), torch.from_numpy(np.asarray(emb.bias[...])),
                                   stride=(2, 4, 4))
  ref = ref.permute(0, 2, 3, 4, 1).reshape(2, 3, 6, 5).numpy()
  assert ours.shape == ref.shape and _rel(ours, ref) < 1e-5


def test_space_time_resize_equals_torch_trilinear():
  torch = pytest.importorskip("torch")
  table = np.random.default_rng(2).standard_normal((3, 4, 4, 6)).astype(np.float32)
  assert vid.resize_space_time(jnp.asarray(table), (3, 4, 4)) is not None
  np.testing.assert_array_equal(np.asarray(vid.resize_space_time(jnp.asarray(table), (3, 4, 4))),
                                table)
  for grid in ((5, 6, 3), (2, 4, 7)):
    ours = np.asarray(vid.resize_space_time(jnp.asarray(table), grid))
    ref = torch.nn.functional.interpolate(torch.from_numpy(table).permute(3, 0, 1, 2)[None],
                                          size=grid, mode="trilinear", align_corners=False)
    assert _rel(ours, ref[0].permute(1, 2, 3, 0).numpy()) < 1e-5


def test_sinusoid_table_formula():
  t = vid.sinusoid_table(7, 6)
  i, j = 5, 3  # odd channel: cosine of i / 10000^(2 * (3 // 2) / 6)
  assert np.isclose(t[i, j], np.cos(i / 10000 ** (2 / 6)))
  assert np.isclose(t[i, 4], np.sin(i / 10000 ** (4 / 6)))
  np.testing.assert_array_equal(t[0, ::2], 0)


def test_fourier_features_layout():
  uv = jnp.array([[0.25, 0.75]])
  f = np.asarray(qf.fourier_features(uv, 3))[0]
  assert f.shape == (qf.feature_dim(3),) == (14,)
  fr = np.pi * 2.0 ** np.arange(3)
  want = np.concatenate([[0.25, 0.75], np.stack([np.sin(fr * 0.25), np.sin(fr * 0.75)], 1).ravel(),
                         np.stack([np.cos(fr * 0.25), np.cos(fr * 0.75)], 1).ravel()])
  np.testing.assert_allclose(f, want, atol=1e-6)


def test_rgb_patches_read_pixels_interpolate_and_clamp():
  rng = np.random.default_rng(3)
  frames = rng.random((1, 2, 10, 12, 3), dtype=np.float32)
  h, w = 10, 12
  # a query at the centre of pixel (x=5, y=4) of frame 1 reads the 3 x 3 neighbourhood exactly
  uv = jnp.array([[[(5 + 0.5) / w, (4 + 0.5) / h]]])
  p = np.asarray(qf.sample_patches(jnp.asarray(frames), jnp.array([[1]]), uv, 3))
  np.testing.assert_allclose(p.reshape(3, 3, 3), frames[0, 1, 3:6, 4:7], atol=1e-6)
  # half a pixel right: the mean of two neighbouring columns
  uv = jnp.array([[[(5 + 1.0) / w, (4 + 0.5) / h]]])
  p = np.asarray(qf.sample_patches(jnp.asarray(frames), jnp.array([[0]]), uv, 3)).reshape(3, 3, 3)
  np.testing.assert_allclose(p[1, 1], frames[0, 0, 4, 5:7].mean(0), atol=1e-6)
  # at the corner: outside pixels repeat the border
  uv = jnp.array([[[0.5 / w, 0.5 / h]]])
  p = np.asarray(qf.sample_patches(jnp.asarray(frames), jnp.array([[0]]), uv, 3)).reshape(3, 3, 3)
  np.testing.assert_allclose(p[0, 0], frames[0, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(p[2, 2], frames[0, 0, 1, 1], atol=1e-6)


# ---------------------------------------------------------------------------------- encoder


def _encoder_unrolled(enc, video, aspect):
  """The encoder written out layer by layer: even layers attend within a temporal slot (no
  aspect token), odd layers across the clip with the aspect token appended."""
  c = enc.cfg
  x = (video - layers.IMAGENET_MEAN) / layers.IMAGENET_STD
  x = enc.patch_embed(jnp.asarray(x))  # (B, s, n, C)
  b, s, n, d = x.shape
  pos = vid.resize_space_time(enc.pos_embed[...], enc.patch_embed.grid(*video.shape[1:4]))
  x = x + pos.reshape(1, s, n, d)
  a = enc.aspect_embed(jnp.log(jnp.full((b, 1, 1), aspect, jnp.float32)))
  for i in range(c.enc_depth):
    blk = enc.blocks.layer(i)
    if i % 2 == 0:
      x = blk(x.reshape(b * s, n, d)).reshape(b, s, n, d)
    else:
      y = blk(jnp.concatenate([x.reshape(b, s * n, d), a], 1))
      x, a = y[:, :s * n].reshape(b, s, n, d), y[:, s * n:]
  return enc.norm(jnp.concatenate([x.reshape(b, s * n, d), a], 1))


def test_encoder_schedule_equals_unrolled(tiny, clip):
  f = nnx.jit(lambda m, v: m.encode(v, 1.5))(tiny, jnp.asarray(clip))
  assert f.shape == (2, (T // 2) * (S // 16) ** 2 + 1, 96)
  ref = _encoder_unrolled(tiny.encoder, clip, 1.5)
  assert _rel(f, ref) < 1e-4
  # the aspect ratio reaches every token through the global layers
  g = nnx.jit(lambda m, v: m.encode(v, 0.5))(tiny, jnp.asarray(clip))
  assert np.abs(np.asarray(g - f))[:, :-1].max() > 1e-4


def test_local_layers_keep_slots_apart(tiny, clip):
  """With only the local layers (even) run, changing frames 2-3 (slot 1) leaves slot 0 alone."""
  enc = tiny.encoder
  other = clip.copy()
  other[:, 2:] = 1 - other[:, 2:]

  def local_only(v):
    x = enc.patch_embed(jnp.asarray((v - layers.IMAGENET_MEAN) / layers.IMAGENET_STD))
    b, s, n, d = x.shape
    return enc.blocks.layer(0)(x.reshape(b * s, n, d)).reshape(b, s, n, d)

  a, b = np.asarray(local_only(clip)), np.asarray(local_only(other))
  np.testing.assert_array_equal(a[:, 0], b[:, 0])
  assert np.abs(a[:, 1] - b[:, 1]).max() > 1e-3


def test_position_table_resizes_to_other_clips(tiny):
  v = np.random.default_rng(4).random((1, 6, 48, 48, 3), dtype=np.float32)  # 3 slots, 3 x 3
  f = tiny.encode(jnp.asarray(v))
  assert f.shape == (1, 3 * 9 + 1, 96) and np.isfinite(np.asarray(f)).all()


# ---------------------------------------------------------------------------------- decoder


def test_chunked_decoding_equals_one_shot_and_queries_are_independent(tiny, clip):
  rng = np.random.default_rng(5)
  q = _queries(rng, 2, 50)
  feats = nnx.jit(lambda m, v: m.encode(v))(tiny, jnp.asarray(clip))
  dec = nnx.jit(lambda m, f, q, v, chunk: m.decode(f, q, v, chunk=chunk), static_argnums=4)
  full = dec(tiny, feats, q, clip, None)
  for chunk in (7, 16, 50):
    out = dec(tiny, feats, q, clip, chunk)
    for k in ("raw", "points", "visibility", "normal", "confidence"):
      assert _rel(out[k], full[k]) < 1e-5, (chunk, k)
  # the answers to the first 20 queries do not change when 30 others are decoded with them,
  # in any order
  few = dec(tiny, feats, q[:, :20], clip, None)
  perm = rng.permutation(50)
  shuffled = dec(tiny, feats, q[:, perm], clip, None)
  inv = np.argsort(perm)
  assert _rel(few["raw"], full["raw"][:, :20]) < 1e-5
  assert _rel(np.asarray(shuffled["raw"])[:, inv], full["raw"]) < 1e-5
  # every part of the query token matters
  for col in range(5):
    q2 = q.copy()
    q2[..., col] = (1 - q2[..., col]) if col < 2 else (q2[..., col] + 1) % T
    assert np.abs(np.asarray(dec(tiny, feats, q2, clip, None)["raw"] - full["raw"])).max() > 1e-4


def test_readout_heads(tiny, clip):
  out = tiny(jnp.asarray(clip), _queries(np.random.default_rng(6), 2, 9))
  assert out["points"].shape == (2, 9, 3) and out["uv"].shape == (2, 9, 2)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out["normal"]), axis=-1), 1, atol=1e-5)
  assert (np.asarray(out["confidence"]) > 1).all()
  v = np.asarray(out["visibility"])
  assert ((v > 0) & (v < 1)).all()
  raw = np.asarray(out["raw"])
  np.testing.assert_array_equal(np.asarray(out["displacement"]), raw[..., 6:9])


def test_patches_come_from_full_resolution_frames(tiny, clip):
  """``frames`` at a higher resolution than the encoder's input feed the RGB patches."""
  q = _queries(np.random.default_rng(7), 2, 8)
  big = np.repeat(np.repeat(clip, 2, axis=2), 2, axis=3)  # (2, T, 128, 128, 3)
  a = tiny(jnp.asarray(clip), q)
  b = tiny(jnp.asarray(clip), q, frames=jnp.asarray(big))
  assert np.abs(np.asarray(a["raw"] - b["raw"])).max() > 1e-5
  with pytest.raises(ValueError, match="batch and frame count"):
    tiny(jnp.asarray(clip), q, frames=jnp.asarray(big[:, :2]))


QUERY_SPLIT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
jax.config.update("jax_default_matmul_precision", "highest")
from geojax.models import d4rt
from geojax.parallel.sharding import make_view_mesh
m = d4rt.D4RT.from_preset("d4rt-tiny", rngs=nnx.Rngs(0))
rng = np.random.default_rng(0)
v = rng.random((1, 4, 64, 64, 3), dtype=np.float32)
q = np.stack([rng.random((1, 32)), rng.random((1, 32))] + [rng.integers(0, 4, (1, 32))] * 3,
             -1).astype(np.float32)
run = nnx.jit(lambda m, v, q: m(v, q)["raw"])
ref = np.asarray(run(m, v, q))
with jax.set_mesh(make_view_mesh(4)):
  out = run(m, v, q)
  spec = str(out.sharding.spec)
print(json.dumps({"err": float(np.abs(np.asarray(out) - ref).max()), "spec": spec,
                  "shards": len(out.addressable_shards)}))
"""


def test_queries_split_over_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"))
  r = subprocess.run([sys.executable, "-c", QUERY_SPLIT], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert res["err"] < 1e-5 and "view" in res["spec"], res


# --------------------------------------------------------------------- sizes, compile, errors


def _counts(name):
  with creation_context():
    m = nnx.eval_shape(lambda: d4rt.D4RT(d4rt.get_config(name), rngs=nnx.Rngs(0)))
  return count_params(m.encoder), count_params(m.decoder)


def test_parameter_counts():
  enc, dec = _counts("d4rt-g")
  assert (enc, dec) == (1_020_827_520, 147_857_741)  # README; the paper: ~1B and 144M
  assert abs(enc - 1e9) / 1e9 < 0.03 and abs(dec - 144e6) / 144e6 < 0.03
  assert _counts("d4rt-l")[0] == 310_178_816 and _counts("d4rt-b")[0] == 90_956_544


def test_d4rt_g_compiles_ahead_of_time():
  """The full model on a 48-frame 256^2 clip with 2048 queries lowers and compiles on CPU."""
  cfg = d4rt.get_config("d4rt-g", dtype=jnp.bfloat16)
  with creation_context():
    abstract = nnx.eval_shape(lambda: d4rt.D4RT(cfg, rngs=nnx.Rngs(0)))
  gd, state = nnx.split(abstract)

  def fwd(state, video, q):
    return nnx.merge(gd, state)(video, q, chunk=1024)["points"]

  video = jax.ShapeDtypeStruct((1, 48, 256, 256, 3), jnp.float32)
  q = jax.ShapeDtypeStruct((1, 2048, 5), jnp.float32)
  compiled = jax.jit(fwd).lower(state, video, q).compile()
  assert compiled is not None


def test_bad_inputs_are_clear(tiny, clip):
  q = _queries(np.random.default_rng(8), 2, 4)
  with pytest.raises(ValueError, match="1 frame"):
    tiny(jnp.asarray(clip[:, :1]), q)
  with pytest.raises(ValueError, match="3 frame"):
    tiny(jnp.asarray(clip[:, :3]), q)
  with pytest.raises(ValueError, match="square"):
    tiny(jnp.asarray(clip[:, :, :48]), q)
  with pytest.raises(ValueError, match="at most 8"):
    tiny(jnp.asarray(np.zeros((1, 10, 64, 64, 3), np.float32)), q[:1])
  bad = q.copy()
  bad[1, 2, 0] = 1.2
  with pytest.raises(ValueError, match=r"queries\[1, 2\].*\[0, 1\]"):
    tiny(jnp.asarray(clip), bad)
  bad = q.copy()
  bad[0, 3, 4] = T
  with pytest.raises(ValueError, match="asks for frame 4 .t_cam.; the clip has frames 0 .. 3"):
    tiny(jnp.asarray(clip), bad)
  with pytest.raises(ValueError, match=r"\(B, N, 5\)"):
    tiny(jnp.asarray(clip), q[..., :4])
  with pytest.raises(ValueError, match="chunk"):
    tiny(jnp.asarray(clip), q, chunk=0)
  with pytest.raises(ValueError, match="unknown D4RT preset"):
    d4rt.get_config("d4rt-xl")
