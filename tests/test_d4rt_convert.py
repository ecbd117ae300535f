"""VideoMAE v2 -> D4RT encoder (``geojax.convert.d4rt``) on synthetic state dicts of the official
layout at ``d4rt-tiny`` size: bit-identical round trips, the whole encoder against a PyTorch
re-implementation that runs VideoMAE's own block on the official tensors (so transposes, the
qkv order and biases, LayerScale and the token order are proven, not only round-tripped), the
``encoder.`` prefix, the sinusoid table, a learned table on another grid, the ViT-g 14 -> 16
kernel resize, safetensors input, presets and errors naming the key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.convert import d4rt as conv
from geojax.models import d4rt
from geojax.nn import layers
from geojax.nn import video as vid
from geojax.parallel.sharding import creation_context

torch = pytest.importorskip("torch")
F = torch.nn.functional

CFG = d4rt.get_config("d4rt-tiny")
D, DEPTH, HEADS = CFG.enc_dim, CFG.enc_depth, CFG.enc_heads
HIDDEN = int(D * CFG.enc_mlp_ratio)
SLOTS, G, _ = CFG.grid
N = SLOTS * G * G
CLIP = (2, CFG.num_frames, CFG.img_size, CFG.img_size, 3)  # the model's own grid: no resize


@pytest.fixture(autouse=True)
def _highest():
  old = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", "highest")
  yield
  jax.config.update("jax_default_matmul_precision", old)


def synthetic_sd(seed=0, *, patch=16, gamma=False, pos=True, head=True, dim=D, depth=DEPTH,
                 hidden=HIDDEN, make=None):
  """A fine-tuned-layout VideoMAE v2 state dict (random, official shapes)."""
  rng = np.random.default_rng(seed)
  r = make or (lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32))
  sd = {"patch_embed.proj.weight": r(dim, 3, 2, patch, patch), "patch_embed.proj.bias": r(dim),
        "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
  if head:
    sd.update({"head.weight": r(7, dim), "head.bias": r(7)})
  if pos:
    sd["pos_embed"] = r(1, N, dim)
  for i in range(depth):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
               b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.q_bias": r(dim),
               b + "attn.v_bias": r(dim), b + "attn.proj.weight": r(dim, dim),
               b + "attn.proj.bias": r(dim), b + "norm2.weight": 1 + r(dim),
               b + "norm2.bias": r(dim), b + "mlp.fc1.weight": r(hidden, dim),
               b + "mlp.fc1.bias": r(hidden), b + "mlp.fc2.weight": r(dim, hidden),
               b + "mlp.fc2.bias": r(dim)})
    if gamma:
      sd[b + "gamma_1"], sd[b + "gamma_2"] = 1 + r(dim), 1 + r(dim)
  return sd


def _zeros_sd(dim, depth, hidden, patch=16):
  """Official shapes at no memory cost (broadcast zeros), for presets and shape errors."""
  return synthetic_sd(dim=dim, depth=depth, hidden=hidden, patch=patch, pos=False,
                      make=lambda *s: np.broadcast_to(np.float32(0), s))


@pytest.fixture(scope="module")
def model():
  with creation_context():
    return d4rt.D4RT.from_preset("d4rt-tiny", rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def encode():
  return nnx.jit(lambda m, v, a: m.encode(v, a))


@pytest.fixture(scope="module")
def clip():
  return np.random.default_rng(5).random(CLIP, dtype=np.float32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _params(m):
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(m.encoder, nnx.Param))}


# --------------------------------------------------------- PyTorch reference (VideoMAE's block)


def _t(a):
  return torch.from_numpy(np.asarray(a, np.float64))


def _videomae_block(sd, i, x):
  """``modeling_finetune.Block.forward`` (``Attention`` with q/v bias, optional gamma)."""
  b = f"blocks.{i}."
  p = lambda k: _t(sd[b + k])  # noqa: E731
  bsz, n, c = x.shape
  h = F.layer_norm(x, (c,), p("norm1.weight"), p("norm1.bias"), 1e-6)
  bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
  qkv = F.linear(h, p("attn.qkv.weight"), bias).reshape(bsz, n, 3, HEADS, -1)
  q, k, v = qkv.permute(2, 0, 3, 1, 4)
  attn = ((q * (c // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
  y = F.linear((attn @ v).transpose(1, 2).reshape(bsz, n, c), p("attn.proj.weight"),
               p("attn.proj.bias"))
  x = x + (p("gamma_1") * y if b + "gamma_1" in sd else y)
  h = F.layer_norm(x, (c,), p("norm2.weight"), p("norm2.bias"), 1e-6)
  y = F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
               p("mlp.fc2.weight"), p("mlp.fc2.bias"))
  return x + (p("gamma_2") * y if b + "gamma_2" in sd else y)


def _reference_encoder(sd, video, aspect, aspect_kernel, aspect_bias):
  """D4RT's encoder schedule (even layers per temporal slot, odd layers over all tokens plus
  the aspect token) run with VideoMAE's Conv3d patch embedding, pos_embed and blocks."""
  mean, std = _t(layers.IMAGENET_MEAN), _t(layers.IMAGENET_STD)
  x = ((_t(video) - mean) / std).permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W)
  x = F.conv3d(x, _t(sd["patch_embed.proj.weight"]), _t(sd["patch_embed.proj.bias"]),
               stride=(2, 16, 16))
  bsz, c, s, gh, gw = x.shape
  x = x.flatten(2).transpose(1, 2) + _t(sd["pos_embed"])  # (B, N, C) slot-major
  a = (np.log(aspect) * _t(aspect_kernel) + _t(aspect_bias)).reshape(1, 1, c).expand(bsz, 1, c)
  for i in range(DEPTH):
    if i % 2 == 0:
      x = _videomae_block(sd, i, x.reshape(bsz * s, gh * gw, c)).reshape(bsz, s * gh * gw, c)
    else:
      y = _videomae_block(sd, i, torch.cat([x, a], 1))
      x, a = y[:, :-1], y[:, -1:]
  y = torch.cat([x, a], 1)
  return F.layer_norm(y, (c,), _t(sd["norm.weight"]), _t(sd["norm.bias"]), 1e-6).numpy()


# ----------------------------------------------------------------------------------- tests


def test_round_trip_bit_identical(model):
  sd = synthetic_sd(1)
  conv.load_videomae(model, sd)
  p = _params(model)
  assert np.all(p["blocks.layers.attn.qkv.bias"][:, D:2 * D] == 0)  # k bias exactly zero
  back = conv.to_videomae_state_dict(model)
  want = {k: v for k, v in sd.items() if not k.startswith("head.")}
  assert set(back) == set(want)
  for k, v in want.items():
    assert back[k].dtype == np.float32 and np.array_equal(back[k], v), k
  again = conv.to_videomae_state_dict(conv.load_videomae(model, back))
  assert all(np.array_equal(again[k], back[k]) for k in back)


def test_encoder_equals_videomae_reference_with_layerscale(model, encode, clip):
  sd = synthetic_sd(2, gamma=True)
  conv.load_videomae(model, sd)
  ak = np.asarray(model.encoder.aspect_embed.kernel[...])
  ab = np.asarray(model.encoder.aspect_embed.bias[...])
  ours = np.asarray(encode(model, jnp.asarray(clip), 1.5))
  ref = _reference_encoder(sd, clip, 1.5, ak, ab)
  assert ours.shape == ref.shape == (2, N + 1, D)
  assert _rel(ours, ref) < 1e-5


def test_encoder_prefix_and_gamma_fold(model, encode, clip):
  sd = synthetic_sd(3, gamma=True, head=False)
  pretrain = {"encoder." + k: v for k, v in sd.items()}
  pretrain.update({"decoder.blocks.0.norm1.weight": np.ones(8, np.float32),
                   "decoder.norm.weight": np.ones(8, np.float32),
                   "decoder.head.weight": np.ones((3, 8), np.float32),
                   "encoder_to_decoder.weight": np.ones((8, D), np.float32),
                   "mask_token": np.zeros((1, 1, 8), np.float32)})
  folded = {k: v for k, v in sd.items() if "gamma" not in k}
  for i in range(DEPTH):
    b = f"blocks.{i}."
    for layer, g in (("attn.proj", "gamma_1"), ("mlp.fc2", "gamma_2")):
      folded[b + layer + ".weight"] = sd[b + layer + ".weight"] * sd[b + g][:, None]
      folded[b + layer + ".bias"] = sd[b + layer + ".bias"] * sd[b + g]
  assert conv.videomae_preset(pretrain) == "d4rt-tiny"
  out_gamma = np.asarray(encode(conv.load_videomae(model, pretrain), jnp.asarray(clip), 1.0))
  p_gamma = _params(model)
  out_fold = np.asarray(encode(conv.load_videomae(model, folded), jnp.asarray(clip), 1.0))
  p_fold = _params(model)
  assert all(np.allclose(p_gamma[k], p_fold[k], rtol=1e-6, atol=0) for k in p_fold)
  assert _rel(out_gamma, out_fold) < 1e-5


def test_fc_norm_replaces_absent_norm_and_is_dropped_next_to_norm(model):
  sd = synthetic_sd(4)
  ft = {k.replace("norm.", "fc_norm.") if k.startswith("norm.") else k: v for k, v in sd.items()}
  conv.load_videomae(model, ft)
  assert np.array_equal(_params(model)["norm.scale"], sd["norm.weight"])
  both = dict(sd, **{"fc_norm.weight": sd["norm.weight"] + 1, "fc_norm.bias": sd["norm.bias"]})
  conv.load_videomae(model, both)
  assert np.array_equal(_params(model)["norm.scale"], sd["norm.weight"])


def test_absent_pos_embed_gives_sinusoid_table(model):
  conv.load_videomae(model, synthetic_sd(5, pos=False))
  table = vid.sinusoid_table(N, D)
  assert np.array_equal(_params(model)["pos_embed"], table.reshape(SLOTS, G, G, D))
  assert np.array_equal(conv.to_videomae_state_dict(model)["pos_embed"], table[None])


def test_learned_pos_embed_of_another_grid_is_resized(model):
  sd = synthetic_sd(6)
  small = np.random.default_rng(6).standard_normal((1, SLOTS * 2 * 2, D)).astype(np.float32)
  sd["pos_embed"] = small
  conv.load_videomae(model, sd)  # grid (SLOTS, 2, 2) guessed from the token count
  want = vid.resize_space_time(jnp.asarray(small[0].reshape(SLOTS, 2, 2, D)), (SLOTS, G, G))
  np.testing.assert_allclose(_params(model)["pos_embed"], np.asarray(want), rtol=1e-6, atol=1e-7)
  sd["pos_embed"] = small[:, :-1]
  with pytest.raises(ValueError, match=r"pos_embed.*pos_grid"):
    conv.load_videomae(model, sd)


def test_patch14_kernel_pinv_resize(model):
  sd = synthetic_sd(7, patch=14, pos=False)
  w14 = sd["patch_embed.proj.weight"]  # (D, 3, 2, 14, 14)
  r = conv._bilinear_matrix(14, 16)
  x = torch.from_numpy(np.random.default_rng(7).standard_normal((5, 3, 14, 14)))
  np.testing.assert_allclose(  # the resize matrix is torch's bilinear upsampling
      np.einsum("ai,bj,ncij->ncab", r, r, x.numpy()),
      F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).numpy(),
      rtol=1e-12, atol=1e-12)
  conv.load_videomae(model, sd)
  k16 = _params(model)["patch_embed.kernel"]
  assert k16.shape == (2, 16, 16, 3, D)
  # every tubelet of upsampled frames gives the token of the original tubelet
  patches = np.random.default_rng(8).random((6, 3, 2, 14, 14))
  up = F.interpolate(torch.from_numpy(patches).flatten(1, 2), size=(16, 16), mode="bilinear",
                     align_corners=False).reshape(6, 3, 2, 16, 16).numpy()
  tok14 = np.einsum("nctij,dctij->nd", patches, w14.astype(np.float64))
  tok16 = np.einsum("nctij,tijcd->nd", up, k16.astype(np.float64))
  assert _rel(tok16, tok14) < 1e-5
  with pytest.raises(ValueError, match="patch_embed.proj.weight.*patch_resize"):
    conv.load_videomae(model, sd, patch_resize=None)


def test_safetensors_file_and_directory(model, tmp_path):
  from safetensors.numpy import save_file
  sd = synthetic_sd(9)
  save_file(sd, str(tmp_path / "model.safetensors"))
  conv.load_videomae(model, tmp_path / "model.safetensors")
  p_file = _params(model)
  conv.load_videomae(model, synthetic_sd(10))
  conv.load_videomae(model, str(tmp_path))
  p_dir = _params(model)
  assert all(np.array_equal(p_file[k], p_dir[k]) for k in p_file)
  assert np.array_equal(p_dir["blocks.layers.mlp.fc1.kernel"][2], sd["blocks.2.mlp.fc1.weight"].T)


def test_convert_state_dict_hook():
  sd = synthetic_sd(11)
  tensors, meta = conv.convert_state_dict({"module": {"encoder." + k: v for k, v in sd.items()},
                                           "epoch": 3})
  assert meta["model_name"] == "d4rt-tiny"
  assert set(tensors) == {k for k in sd if not k.startswith("head.")}


def test_presets_from_widths():
  assert conv.videomae_preset(_zeros_sd(768, 12, 3072)) == "d4rt-b"
  assert conv.videomae_preset(_zeros_sd(1024, 24, 4096)) == "d4rt-l"
  assert conv.videomae_preset(_zeros_sd(1408, 40, 6144, patch=14)) == "d4rt-g"
  with pytest.raises(ValueError, match="ViT-S.*enc_heads=6"):
    conv.videomae_preset(_zeros_sd(384, 12, 1536))


def test_errors_name_the_key(model):
  sd = synthetic_sd(12)
  del sd["blocks.1.mlp.fc1.bias"]
  with pytest.raises(ValueError, match=r"misses 1 tensors.*blocks\.1\.mlp\.fc1\.bias"):
    conv.load_videomae(model, sd)
  sd = synthetic_sd(12)
  del sd["blocks.3.attn.v_bias"]
  with pytest.raises(ValueError, match=r"blocks\.3\.attn\.v_bias"):
    conv.load_videomae(model, sd)
  sd = dict(synthetic_sd(12), **{"blocks.0.attn.scale": np.ones((HEADS, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"not use: \['blocks\.0\.attn\.scale'\]"):
    conv.load_videomae(model, sd)
  sd = synthetic_sd(12)
  sd["blocks.2.mlp.fc2.weight"] = sd["blocks.2.mlp.fc2.weight"].T.copy()
  with pytest.raises(ValueError, match=r"blocks\.2\.mlp\.fc2\.weight has shape \(384, 96\)"):
    conv.load_videomae(model, sd)
  with pytest.raises(ValueError, match=r"shape \(768,\).*preset 'd4rt-b'"):  # ViT-B into tiny
    conv.encoder_from_videomae(_zeros_sd(768, 12, 3072), CFG)
  with pytest.raises(ValueError, match="patch_resize"):
    conv.encoder_from_videomae(synthetic_sd(12), CFG, patch_resize="bicubic")
