"""PPD pieces beyond the fixture's case: the DiT blocks' conventions, released parameter counts
and an ahead-of-time compile of the full model, other sizes and batches in the sampler, the
schedules, the loss's masking, and clear errors for bad inputs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.diffusion import flow
from geojax.losses import ppd as L
from geojax.models import ppd
from geojax.nn import dit, layers

ROOT = os.environ.get("GEOJAX_SHARED", os.path.join(os.path.dirname(__file__), "..", "..",
                                                    "shared"))
FIX = os.path.join(ROOT, "fixtures", "ppd")


@pytest.fixture(scope="module")
def tiny():
  return ppd.PPD.from_preset("ppd-tiny", rngs=nnx.Rngs(0))


def _sem(b, h, w, key=1):
  return jax.random.normal(jax.random.key(key), (b, (h // 16) * (w // 16), 1024))


def test_timestep_embedding_is_cos_first_on_raw_t():
  e = np.asarray(dit.timestep_embedding(jnp.array([0.0, 737.0]), 8))
  f = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(e[1], np.concatenate([np.cos(737 * f), np.sin(737 * f)]),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(e[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_cascade_split_is_sub_position_major():
  """Token (i, j) with channels [A | B | C | D] (each D wide) becomes the 2 x 2 block
  A B / C D of the finer grid (not pixel_shuffle's interleaved channels)."""
  h, w, d = 2, 3, 5
  x = np.zeros((1, h * w, 4 * d), np.float32)
  for i in range(h):
    for j in range(w):
      for sub in range(4):
        x[0, i * w + j, sub * d:(sub + 1) * d] = 100 * i + 10 * j + sub
  y = np.asarray(dit.cascade_split(jnp.asarray(x), h, w)).reshape(2 * h, 2 * w, d)
  for i in range(h):
    for j in range(w):
      for a in range(2):
        for b in range(2):
          assert (y[2 * i + a, 2 * j + b] == 100 * i + 10 * j + 2 * a + b).all()


def test_unpatchify_channel_order():
  p, h, w = 2, 2, 3
  x = np.arange(h * w * p * p, dtype=np.float32).reshape(1, h * w, p * p)
  img = np.asarray(dit.unpatchify(jnp.asarray(x), h, w, p))[0, ..., 0]
  for i in range(h):
    for j in range(w):
      for a in range(p):
        for b in range(p):
          assert img[p * i + a, p * j + b] == x[0, i * w + j, a * p + b]


def test_sincos_table_equals_the_official_video_pos_embed():
  """The fixed table of the video DiT (x in the first half) equals the stored ``pos_embed``."""
  path = os.path.join(FIX, "weights_video.safetensors")
  if not os.path.exists(path):
    pytest.skip("PPD fixture not found")
  from safetensors.numpy import load_file
  want = load_file(path)["pos_embed"][0]
  got = dit.sincos_2d_table(want.shape[-1], 32)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # column 1 of row 0 differs from row 1 of column 0 in the first (x) half only
  np.testing.assert_array_equal(got[1, 8:], got[0, 8:])
  np.testing.assert_array_equal(got[32, :8], got[0, :8])


def test_released_parameter_count_and_aot_compile():
  """``DiT()`` has 499,842,112 parameters; the full model lowers and compiles for a 1024 x 768
  image on CPU without allocating its weights."""
  abstract = nnx.eval_shape(lambda: ppd.PPD.from_preset("ppd", rngs=nnx.Rngs(0),
                                                        dtype=jnp.bfloat16))
  assert layers.count_params(abstract) == 499_842_112
  assert ppd.get_config("ppd-moge").semantics == "moge2"
  gd, state = nnx.split(abstract)
  h, w = ppd.process_size(1080, 1920)
  assert (h, w) == (672, 1184) and ppd.process_size(768, 1024) == (768, 1024)

  def f(st, x, s, t):
    return nnx.merge(gd, st)(x, s, t)

  lowered = jax.jit(f).lower(state, jax.ShapeDtypeStruct((1, 768, 1024, 4), jnp.float32),
                             jax.ShapeDtypeStruct((1, 48 * 64, 1024), jnp.float32),
                             jax.ShapeDtypeStruct((), jnp.int32))
  assert lowered.compile() is not None


def test_euler_step_algebra():
  key = jax.random.split(jax.random.key(0), 2)
  v, x = jax.random.normal(key[0], (2, 4, 4)), jax.random.normal(key[1], (2, 4, 4))
  s = flow.euler_step(v, x, 750, 500)
  np.testing.assert_allclose(s, x + (500 - 750) / 1000 * v, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flow.euler_step(v, x, 249, -1), x - 0.249 * v, rtol=1e-6)
  # per-sample timesteps broadcast over the pixels
  both = flow.euler_step(v, x, jnp.array([750, 249]), jnp.array([500, -1]))
  np.testing.assert_allclose(both[1], x[1] - 0.249 * v[1], rtol=1e-6)
  np.testing.assert_allclose(both[0], s[0], rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_sampler_matches_a_python_loop(tiny, steps):
  h, w = 32, 48
  img = jax.random.uniform(jax.random.key(2), (1, h, w, 3))
  noise = jax.random.normal(jax.random.key(3), (1, h, w))
  sem = _sem(1, h, w)
  depth = nnx.jit(lambda m, a, s, n: ppd.sample(m, a, s, steps=steps, noise=n))(
      tiny, img, sem, noise)
  lat = noise
  ts, nxt = flow.sampling_timesteps(steps)
  fwd = nnx.jit(lambda m, x, s, t: m(x, s, t))
  for t, s in zip(ts, nxt):
    v = fwd(tiny, jnp.concatenate([lat[..., None], img - 0.5], -1), sem, jnp.int32(t))[..., 0]
    lat = flow.euler_step(v, lat, int(t), int(s))
  np.testing.assert_allclose(depth, lat + 0.5, rtol=0, atol=2e-5)


def test_sampler_batches_images_and_seeds(tiny):
  """Two images (or two noise seeds of one image) in one batch equal separate runs; other
  aspect ratios (portrait, landscape) work at any multiple of 16."""
  run = nnx.jit(lambda m, a, s, n: ppd.sample(m, a, s, steps=2, noise=n))
  for h, w in ((48, 32), (32, 64)):
    img = jax.random.uniform(jax.random.key(h), (2, h, w, 3))
    noise = jax.random.normal(jax.random.key(w), (2, h, w))
    sem = _sem(2, h, w, key=h + w)
    both = run(tiny, img, sem, noise)
    assert both.shape == (2, h, w)
    for i in range(2):
      one = run(tiny, img[i:i + 1], sem[i:i + 1], noise[i:i + 1])
      np.testing.assert_allclose(both[i], one[0], rtol=0, atol=2e-5)
  seeds = run(tiny, jnp.repeat(img[:1], 2, 0), jnp.repeat(sem[:1], 2, 0), noise)
  assert not np.allclose(seeds[0], seeds[1])


def test_loss_ignores_masked_pixels_and_far_depth_saturates(tiny):
  """With the network's output fixed, changing the depth where the mask is off changes
  neither the quantiles nor the loss; pixels beyond 80 m encode to the top of the range;
  noise and integer timesteps are drawn when not given."""
  b, h, w = 2, 32, 32
  key = jax.random.split(jax.random.key(5), 5)
  depth = jnp.exp(jax.random.uniform(key[0], (b, h, w), minval=0.0, maxval=3.0))
  mask = jax.random.uniform(key[1], (b, h, w)) > 0.2
  depth = depth.at[:, :2].set(120.0)
  img = jax.random.uniform(key[2], (b, h, w, 3))
  v = jax.random.normal(key[4], (b, h, w, 1))
  fixed = lambda x, s, t: v
  kw = dict(noise=jax.random.normal(key[3], (b, h, w)), t=jnp.array([100, 900]))
  loss = jax.jit(lambda d: L.flow_matching_loss(fixed, img, None, d, mask, **kw))
  a, c = loss(depth), loss(jnp.where(mask, depth, 7.0))
  np.testing.assert_allclose(a["quantiles"], c["quantiles"], rtol=1e-6)
  for k in ("mse", "grad", "total"):
    assert float(a[k]) == pytest.approx(float(c[k]), rel=1e-6), k
  assert float(a["total"]) == pytest.approx(float(a["mse"] + 0.2 * a["grad"]), rel=1e-6)
  assert np.allclose(np.asarray(a["latent"])[:, :2], 0.5)
  assert float(a["latent"].min()) >= -1.0 and float(a["latent"].max()) <= 0.5
  drawn = jax.jit(lambda k: L.flow_matching_loss(fixed, img, None, depth, mask, key=k))(
      jax.random.key(9))
  assert drawn["t"].dtype == jnp.int32 and np.isfinite(float(drawn["total"]))
  assert 0 <= int(drawn["t"].min()) and int(drawn["t"].max()) <= 1000


@pytest.mark.parametrize("what,needle", [
    ("x_size", "multiples of 16"),
    ("x_channels", r"\(B, H, W, 4\)"),
    ("semantics", "one 1024-d token per 16 x 16 patch"),
    ("t", "t must be a scalar or have shape"),
    ("noise", "noise must be"),
])
def test_bad_inputs_are_named(tiny, what, needle):
  x = jnp.zeros((1, 32, 32, 4))
  sem = _sem(1, 32, 32)
  with pytest.raises(ValueError, match=needle):
    if what == "x_size":
      tiny(jnp.zeros((1, 40, 32, 4)), sem, 10)
    elif what == "x_channels":
      tiny(jnp.zeros((1, 32, 32, 3)), sem, 10)
    elif what == "semantics":
      tiny(x, sem[:, :3], 10)
    elif what == "t":
      tiny(x, sem, jnp.array([1, 2, 3]))
    else:
      ppd.sample(tiny, jnp.zeros((1, 32, 32, 3)), sem, steps=2, noise=jnp.zeros((1, 16, 32)))


def test_video_parameter_count_and_aot_compile():
  """``DiT_Video()`` has 561,754,944 values: 560,706,368 parameters plus the fixed 32 x 32
  sin-cos table; the full model compiles for a 16-frame window."""
  abstract = nnx.eval_shape(lambda: ppd.PPVD.from_preset("ppvd", rngs=nnx.Rngs(0),
                                                         dtype=jnp.bfloat16))
  table = ppd.video_pos_embed(abstract.cfg)
  assert layers.count_params(abstract) == 560_706_368
  assert layers.count_params(abstract) + table.size == 561_754_944
  gd, state = nnx.split(abstract)
  f = jax.jit(lambda st, x, s, t: nnx.merge(gd, st)(x, s, t))
  lowered = f.lower(state, jax.ShapeDtypeStruct((16, 512, 512, 4), jnp.float32),
                    jax.ShapeDtypeStruct((16, 1024, 2048), jnp.float32),
                    jax.ShapeDtypeStruct((), jnp.int32))
  assert lowered.out_info.shape == (16, 512, 512, 1)
  assert lowered.compile() is not None


@pytest.mark.parametrize("what,needle", [
    ("frames", "at least 3 frames"),
    ("size", r"\(N, 512, 512, 4\)"),
    ("t", "one scalar timestep"),
    ("semantics", "Pi3 tokens per frame"),
    ("config", "video presets build PPVD"),
])
def test_video_bad_inputs_are_named(what, needle):
  cfg = ppd.get_config("ppvd-tiny")
  model = nnx.eval_shape(lambda: ppd.PPVD.from_config(cfg, rngs=nnx.Rngs(0)))
  x, sem = jnp.zeros((3, 512, 512, 4)), jnp.zeros((3, 1024, 2048))
  with pytest.raises(ValueError, match=needle):
    if what == "frames":
      model(x[:2], sem[:2], 10)
    elif what == "size":
      model(jnp.zeros((3, 256, 256, 4)), sem, 10)
    elif what == "t":
      model(x, sem, jnp.array([1, 2, 3]))
    elif what == "semantics":
      model(x, sem[..., :1024], 10)
    else:
      ppd.PPD.from_config(cfg, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------- PPVD windows


@pytest.mark.parametrize("length", [1, 2, 3, 4, 10, 16, 17, 28, 29, 30, 55])
def test_video_windows_follow_the_official_plan(length):
  """Padding to 16 + 13 k frames (repeating the last frame), keyframes 0/8/15 of the previous
  window opening the next, frame 0 always the video's first; the aligned output's frame j is
  padded frame j."""
  padded, wins = ppd.video_windows(length)
  if length >= 4:  # the official rule (it breaks below 4 frames; geojax pads to one window)
    r = (length - 16) % 13
    assert padded == length + (13 - r if r else 0)
  assert padded >= 16 and (padded - 16) % 13 == 0 and len(wins) == (padded - 16) // 13 + 1
  order = list(wins[0])
  for prev, cur in zip(wins, wins[1:]):
    np.testing.assert_array_equal(cur[:3], prev[[0, 8, 15]])
    order.extend(cur[3:])
  assert all(w[0] == 0 for w in wins)
  np.testing.assert_array_equal(order, np.minimum(np.arange(padded), length - 1))


def test_window_alignment_undoes_per_window_affine_maps():
  """Windows predicting the true depth up to their own scale and shift align back to it."""
  rng = np.random.default_rng(0)
  padded, wins = ppd.video_windows(42)
  truth = rng.uniform(0.5, 3.0, size=(padded, 6, 7)).astype(np.float32)
  preds = [truth[idx] * (1.0 if i == 0 else rng.uniform(0.5, 2.0)) + (
      0.0 if i == 0 else rng.uniform(-1, 1)) for i, idx in enumerate(wins)]
  np.testing.assert_allclose(ppd.align_video_windows(preds), truth, rtol=1e-4, atol=1e-4)
  assert ppd.lstsq_scale_shift_all(np.ones(4), np.ones(4)) == (1.0, 0.0)  # singular


def test_infer_video_windows_share_noise_and_align():
  """A 20-frame video (2 windows after padding) on a small PPVD: the first 16 output frames are
  window 0's samples resized back; a 2-frame video is padded, not rejected."""
  cfg = ppd.PPVDConfig(dim=16, depth=8, num_heads=2, size=64, ref_start=4, temporal_depth=2)
  model = ppd.PPVD.from_config(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  frames = rng.uniform(size=(20, 48, 80, 3)).astype(np.float32)
  proj = rng.normal(size=(3, cfg.semantics_dim)).astype(np.float32)

  def semantics(window):  # a stand-in encoder: mean colour of each 16 x 16 patch, projected
    n = window.shape[0]
    pooled = np.asarray(window).reshape(n, 4, 16, 4, 16, 3).mean((2, 4)).reshape(n, 16, 3)
    return jnp.asarray(pooled @ proj)

  noise = rng.normal(size=(16, 64, 64)).astype(np.float32)
  sampler = nnx.jit(lambda m, x, s, n: ppd.sample(m, x, s, steps=2, noise=n))
  depth = ppd.infer_video(model, frames, semantics, noise=noise, sampler=sampler)
  assert depth.shape == (20, 48, 80) and np.isfinite(depth).all()
  from geojax.nn import resize
  small = np.asarray(resize.resize_bilinear(jnp.asarray(frames[:16]), (64, 64)))
  first = sampler(model, jnp.asarray(small), semantics(small), jnp.asarray(noise))
  first = np.asarray(resize.resize_bilinear(first[..., None], (48, 80)))[..., 0]
  np.testing.assert_allclose(depth[:16], first, rtol=0, atol=1e-5)
  short = ppd.infer_video(model, frames[:2], semantics, noise=noise, sampler=sampler)
  assert short.shape == (2, 48, 80)
  with pytest.raises(ValueError, match="shared by every window"):
    ppd.infer_video(model, frames, semantics, noise=noise[:8], sampler=sampler)
