"""DAGE against the official network: the parity fixture made from ngoductuanlhp/DAGE@c3065a4
(tiny configuration, random weights, fp32; ``../shared/fixtures/dage/README.md``).

Weights go through the same path as released checkpoints (``config_from_reference`` +
``from_torch_state_dict``); every output and the intermediates the fixture stores are compared
with max|a - b| / max|b| <= 1e-4 (positions and grids exactly).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.convert import dage as conv
from geojax.models import dage as dage_lib
from geojax.nn import layers, rope

ROOT = os.environ.get("GEOJAX_SHARED", os.path.join(os.path.dirname(__file__), "..", "..",
                                                    "shared"))
FIX = os.path.join(ROOT, "fixtures", "dage")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(FIX, "weights.safetensors")),
                                reason=f"DAGE parity fixture not found at {FIX} "
                                       "(set GEOJAX_SHARED)")
TOL = 1e-4


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def nchw(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref():
  from safetensors.numpy import load_file
  return dict(config=json.load(open(os.path.join(FIX, "config.json"))),
              sd=load_file(os.path.join(FIX, "weights.safetensors")),
              io=dict(np.load(os.path.join(FIX, "io.npz"))))


@pytest.fixture(scope="module")
def model(ref):
  cfg = conv.config_from_reference(ref["config"], scan=False)
  return conv.from_torch_state_dict(ref["sd"], cfg, strict_unexpected=True)


@pytest.fixture(scope="module")
def run(model, ref):
  """Every stage once, eagerly, keeping the intermediates the fixture stores."""
  io = ref["io"]
  hr = jnp.asarray(io["hr_video"].transpose(0, 1, 3, 4, 2))
  lr = jnp.asarray(io["lr_video"].transpose(0, 1, 3, 4, 2))
  b, n = hr.shape[:2]
  fw = ref["config"]["forward_kwargs"]
  lh, lw = dage_lib.lr_size(*lr.shape[2:4], fw["lr_max_size"])
  lr_hw = (lh // 14, lw // 14)
  hr_hw = dage_lib.hr_grid(*hr.shape[2:4], fw["hr_num_tokens"])
  out = dict(lr_hw=lr_hw, hr_hw=hr_hw)
  lr_flat = lr.reshape(b * n, *lr.shape[2:])
  out["lr_tokens"] = model.lr_encode(lr_flat)
  blocks = []
  out["lr_hidden"], out["feat"] = model.lr_decode(out["lr_tokens"], b, lr_hw, distill=True,
                                                  collect=blocks)
  out["blocks"] = blocks
  out["cam_dec"] = model.camera_decoder(out["lr_hidden"],
                                        jnp.asarray(model.lr_positions(lr_hw))[None])
  out["poses"], (out["t"], out["rot"]) = model.cameras(out["lr_hidden"], lr_hw)
  hr_flat = hr.reshape(b * n, *hr.shape[2:])
  x = (hr_flat - layers.IMAGENET_MEAN) / layers.IMAGENET_STD
  out["hr_layers"] = model.hr_encoder.backbone.intermediate_layers(x, model.cfg.hr_taps)
  out["hr_tokens"], out["hr_cls"] = model.hr_encoder(hr_flat, *hr_hw)
  adapter_blocks = []
  out["fused"] = model.fuse(out["hr_tokens"], hr_hw, out["lr_hidden"], lr_hw,
                            collect=adapter_blocks)
  out["adapter_blocks"] = adapter_blocks
  heads = {}
  out["points"], out["conf"] = model.heads(out["fused"], hr_hw, hr.shape[2:4],
                                           hr.shape[3] / hr.shape[2], collect=heads)
  out["heads"] = heads
  cls = out["hr_cls"][:, None]
  out["cls_dec"] = model.cls_decoder(cls, out["fused"], num_frames=n)
  out["metric"] = model.metric_scale(out["fused"], out["hr_cls"], b)
  out["forward"] = model(hr, lr, lr_max_size=fw["lr_max_size"],
                         hr_num_tokens=fw["hr_num_tokens"], distill=True)
  return out


def test_parameter_counts(model, ref):
  total = layers.count_params(model)
  assert total == ref["config"]["tiny_param_count"] == 985_137
  for name, want in ref["config"]["tiny_param_count_per_top_level"].items():
    if name == "rope":
      continue
    part = getattr(model, name)
    got = part.size if isinstance(part, nnx.Variable) else layers.count_params(part)
    assert got == want, name


def test_grids_and_positions_exact(run, ref, model):
  io = ref["io"]
  assert run["lr_hw"] == tuple(io["lr_token_grid"].astype(int))
  assert run["hr_hw"] == tuple(io["hr_token_grid"].astype(int))
  lr_pos = model.lr_positions(run["lr_hw"])
  assert np.array_equal(lr_pos, io["lr_decoder_pos"][0])
  assert np.array_equal(lr_pos, io["adapter_cross_kv_pos"][0])
  assert np.array_equal(rope.snapped_positions(run["lr_hw"], run["hr_hw"]),
                        io["adapter_cross_q_pos"][0])
  real = rope.grid_positions(*run["hr_hw"], offset=1.0)
  assert np.array_equal(real, io["adapter_self_pos"][0])
  assert np.array_equal(rope.interpolation_scales(real), io["adapter_self_rope_interp_scale_yx"])


def test_lr_stream(run, ref, model):
  io = ref["io"]
  pe = model.encoder.interpolated_pos_embed(*run["lr_hw"])
  assert rel(pe, io["lr_encoder_pos_embed"]) <= TOL
  assert rel(run["lr_tokens"], io["lr_encoder_tokens"]) <= TOL
  for i, blk in enumerate(run["blocks"]):
    assert rel(blk, io[f"lr_decoder_block{i}"]) <= TOL, i
  assert rel(run["lr_hidden"], io["lr_decoder_output"]) <= TOL
  assert rel(run["feat"], io["lr_student_feat_for_distill"]) <= TOL
  assert rel(run["cam_dec"], io["camera_decoder_output"]) <= TOL
  assert rel(run["t"], io["camera_head_t_raw"]) <= TOL
  assert rel(run["rot"], io["camera_head_rot_raw"]) <= TOL


def test_hr_stream_adapter_heads(run, ref, model):
  io = ref["io"]
  pe = model.hr_encoder.backbone.interpolated_pos_embed(*run["hr_hw"])
  assert rel(pe, io["hr_encoder_pos_embed"]) <= TOL
  for i, t in enumerate(run["hr_layers"]):
    assert rel(t[:, 1:], io["hr_backbone_layer_tokens"][i]) <= TOL, i
    assert rel(t[:, 0], io["hr_backbone_layer_cls_tokens"][i]) <= TOL, i
  assert rel(run["hr_tokens"], io["hr_encoder_tokens"]) <= TOL
  assert rel(run["hr_cls"], io["hr_cls_token"]) <= TOL
  for i, blk in enumerate(run["adapter_blocks"]):
    assert rel(blk, io[f"adapter_block{i}_output"]) <= TOL, i
  assert rel(run["fused"] - run["hr_tokens"], io["adapter_output"]) <= TOL
  heads = run["heads"]
  for lvl in range(3):
    assert rel(heads["neck"][lvl], nchw(io[f"hr_neck_out_l{lvl}"])) <= TOL, lvl
  assert rel(heads["raw_points"], nchw(io["hr_points_head_raw"])) <= TOL
  assert rel(heads["raw_conf"], nchw(io["hr_mask_head_raw"])) <= TOL
  assert rel(run["cls_dec"], io["cls_decoder_output"]) <= TOL
  pooled = np.mean(np.asarray(run["cls_dec"] + run["hr_cls"][:, None]).reshape(1, 2, -1), 1)
  assert rel(pooled, io["fused_cls_token_pooled"]) <= TOL
  assert rel(np.log(np.asarray(run["metric"])), io["metric_log_scale"]) <= TOL


def test_uv_plane(ref):
  from geojax.geometry.alignment import normalized_view_plane_uv
  uv = normalized_view_plane_uv(12, 8, 168 / 112)
  assert rel(uv.transpose(2, 0, 1), ref["io"]["hr_uv_level0"]) <= 1e-6


def test_outputs(run, ref):
  io, out = ref["io"], run["forward"]
  assert rel(np.log(out["local_points"][..., 2]), np.log(io["local_points"][..., 2])) <= TOL
  assert rel(out["local_points"], io["local_points"]) <= TOL
  assert rel(out["conf"], io["conf"][..., 0]) <= TOL
  assert rel(out["camera_poses"], io["camera_poses"]) <= TOL
  assert rel(out["metric_scale"], io["metric_scale"]) <= TOL
  assert rel(out["student_feat"], io["lr_student_feat_for_distill"]) <= TOL


def test_round_trip_bit_identical(model, ref):
  back = conv.to_torch_state_dict(model)
  sd = ref["sd"]
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    assert np.array_equal(back[k], v), k
