"""URGT against the official network: the parity fixture made from
Dreamaker-MrC/Any-Resolution-Any-Geometry@7f1dd80 (tiny configuration, random weights, fp32;
``../shared/fixtures/urgt/README.md``), in both crop modes.

Weights load through the converter (official key names, also with the ``vggt.`` prefix); RoPE
positions and crop boxes are compared exactly, every float array with
max|a - b| / max|b| <= 1e-4, from the crops to the stitched images.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.convert import urgt as conv
from geojax.models import urgt
from geojax.nn import resize
from geojax.nn.alternating import run_frame_global

ROOT = os.environ.get("GEOJAX_SHARED", os.path.join(os.path.dirname(__file__), "..", "..",
                                                    "shared"))
FIX = os.path.join(ROOT, "fixtures", "urgt")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(FIX, "weights.safetensors")),
                                reason=f"URGT parity fixture not found at {FIX} "
                                       "(set GEOJAX_SHARED)")
TOL = 1e-4
MODES = (("ovl", True), ("grid", False))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def nhwc(x):
  return np.moveaxis(np.asarray(x), -3, -1)


@pytest.fixture(scope="module")
def ref():
  from safetensors.numpy import load_file
  return load_file(os.path.join(FIX, "weights.safetensors")), dict(
      np.load(os.path.join(FIX, "io.npz")))


@pytest.fixture(scope="module")
def model(ref):
  sd, _ = ref
  cfg = conv.config_from_reference(json.load(open(os.path.join(FIX, "config.json"))),
                                   scan=False)
  assert cfg == urgt.get_config("urgt-tiny", scan=False)
  return conv.from_torch_state_dict({"vggt." + k: v for k, v in sd.items()}, cfg,
                                    strict_unexpected=True)


def test_parameter_count_and_round_trip(model, ref):
  sd, _ = ref
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 318_502
  back = conv.to_torch_state_dict(model)
  assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_pos_embed_interpolation(model, ref):
  _, io = ref
  enc = model.patch_embed
  for (h, w), key in (((6, 7), "dino_pos_embed_interp_84x98"),
                      ((4, 5), "dino_pos_embed_interp_56x70")):
    assert rel(enc.interpolated_pos_embed(h, w), io[key]) <= TOL, key


@pytest.mark.parametrize("mode,overlap", MODES)
def test_network_stage_by_stage(model, ref, mode, overlap):
  _, io = ref
  crops = jnp.asarray(nhwc(io[f"{mode}_patch_images"]))
  dp = jnp.asarray(nhwc(io[f"{mode}_depth_prior"]))
  npr = jnp.asarray(nhwc(io[f"{mode}_normal_prior"]))[None]
  s = crops.shape[1]
  pos = urgt.rope_positions(urgt.official_origins(s, 5), 5)
  np.testing.assert_array_equal(pos, io[f"{mode}_rope_pos_frame"])
  np.testing.assert_array_equal(pos.reshape(1, -1, 2), io[f"{mode}_rope_pos_global"])
  # patch embedding: RGB + depth + normal embeddings, DINO blocks, final norm
  enc = model.patch_embed
  xn = (crops[0] - jnp.asarray([0.485, 0.456, 0.406])) / jnp.asarray([0.229, 0.224, 0.225])
  extra = model.patch_embed_depth(dp[0]) + model.patch_embed_normal(npr[0])
  pre = enc.run_layers(enc.tokens(xn, extra), 0, enc.depth)
  assert rel(pre, io[f"{mode}_patch_embed_prenorm"]) <= TOL
  tokens = model.embed(crops[0], dp[0], npr[0])
  assert rel(tokens, io[f"{mode}_patch_embed_tokens"]) <= TOL
  # aggregator: every [frame || global] pair
  idx = np.minimum(np.arange(s), 1)
  special = jnp.concatenate([model.camera_token[...][0, idx], model.register_token[...][0, idx]],
                            1)
  h = jnp.concatenate([special, tokens], 1)[None]
  p = jnp.asarray(pos)
  for i in range(5):
    h, frame = run_frame_global(model.frame_blocks, model.global_blocks, h, start=i, stop=i + 1,
                                pos_local=p, pos_global=p.reshape(1, -1, 2))
    assert rel(jnp.concatenate([frame, h], -1), io[f"{mode}_agg_out_{i}"]) <= TOL, i
  out = model(crops, dp, npr)
  assert rel(out["depth"], io[f"{mode}_head_depth"][..., 0]) <= TOL
  assert rel(out["depth_conf"], io[f"{mode}_head_depth_conf"]) <= TOL
  assert rel(out["normal"], io[f"{mode}_head_normal"]) <= TOL
  assert rel(out["normal_conf"], io[f"{mode}_head_normal_conf"]) <= TOL


@pytest.mark.parametrize("mode,overlap", MODES)
def test_refine_end_to_end(model, ref, mode, overlap):
  """Image + coarse maps -> boxes (exactly), crops, roi_align priors, stitched outputs."""
  _, io = ref
  img = jnp.asarray(nhwc(io["image"]))
  cd = jnp.asarray(io["coarse_depth"])
  cn = jnp.asarray(nhwc(io["coarse_normal"]))
  res = urgt.refine(model, img, cd, cn, patch_split=(2, 2), overlap=overlap, crop_size=70)
  boxes = res["layout"].boxes
  np.testing.assert_array_equal(boxes, io[f"{mode}_boxes_xyxy"])
  crops = jnp.stack([resize.resize_bilinear_align_corners(img[:, y0:y1, x0:x1], (70, 70))
                     for x0, y0, x1, y1 in boxes], 1)
  assert rel(crops, nhwc(io[f"{mode}_patch_images"])) <= TOL
  assert rel(jax.vmap(lambda x: resize.roi_align(x, boxes, (70, 70)))(cd[..., None]),
             nhwc(io[f"{mode}_depth_prior"])) <= TOL
  assert rel(resize.roi_align(cn[0], boxes, (70, 70)), nhwc(io[f"{mode}_normal_prior"])) <= TOL
  assert rel(res["depth"], io[f"{mode}_final_depth"][:, 0]) <= TOL
  assert rel(res["normal"], nhwc(io[f"{mode}_final_normal"])) <= TOL
