"""PPD against the official code: the parity fixture made from
greenbrettmichael/pixel-perfect-depth@61d1b2c (tiny image DiT, random weights, fp32;
``../shared/fixtures/ppd/README.md``).

Weights load through ``config_from_reference`` + ``from_torch_state_dict``; integer arrays
(timesteps, RoPE positions, schedules) are compared exactly, float arrays with
max|a - b| / max|b| <= 1e-4: the single call for per-sample and scalar timesteps with every
intermediate, the 4-step sampler trajectory, and the fine-tuning loss from the stored noise
and timesteps.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.convert import ppd as conv
from geojax.diffusion import flow
from geojax.losses import ppd as L
from geojax.models import ppd
from geojax.nn import layers, rope

ROOT = os.environ.get("GEOJAX_SHARED", os.path.join(os.path.dirname(__file__), "..", "..",
                                                    "shared"))
FIX = os.path.join(ROOT, "fixtures", "ppd")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(FIX, "weights.safetensors")),
                                reason=f"PPD parity fixture not found at {FIX} "
                                       "(set GEOJAX_SHARED)")
TOL = 1e-4


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def nhwc(x):
  return np.moveaxis(np.asarray(x), -3, -1)


@pytest.fixture(scope="module")
def ref():
  from safetensors.numpy import load_file
  return (load_file(os.path.join(FIX, "weights.safetensors")),
          dict(np.load(os.path.join(FIX, "io.npz"))),
          json.load(open(os.path.join(FIX, "config.json"))))


@pytest.fixture(scope="module")
def model(ref):
  sd, _, config = ref
  cfg = conv.config_from_reference(config)
  assert cfg == ppd.get_config("ppd-tiny")
  m = conv.from_torch_state_dict({"dit." + k: v for k, v in sd.items()}, cfg,
                                 strict_unexpected=True)
  assert layers.count_params(m) == config["image_dit"]["param_count"] == 290_528
  return m


def test_state_dict_round_trip_is_bit_identical(ref, model):
  sd, _, _ = ref
  back = conv.to_torch_state_dict(model)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_schedules_and_logit_normal_timesteps_exact(ref):
  _, io, _ = ref
  for steps in (1, 4, 10):
    t, nxt = flow.sampling_timesteps(steps)
    np.testing.assert_array_equal(t, io[f"schedule_steps{steps}"])
    np.testing.assert_array_equal(nxt, io[f"schedule_steps{steps}_next"])
  np.testing.assert_array_equal(flow.timesteps_from_normal(io["logitnormal_example_z"]),
                                io["logitnormal_example_t"])


def test_single_call_and_every_intermediate(ref, model):
  _, io, _ = ref
  x = nhwc(io["single_dit_input"])
  np.testing.assert_array_equal(x, np.concatenate([nhwc(io["single_noisy_latent"]),
                                                   nhwc(io["single_cond"])], -1))
  t = io["single_timestep"].astype(np.int32)
  v, aux = model(jnp.asarray(x), jnp.asarray(io["single_semantics"]), jnp.asarray(t),
                 intermediates=True)
  assert rel(v, nhwc(io["single_velocity"])) <= TOL
  assert rel(aux["x_embed"], io["single_x_embed"]) <= TOL
  assert rel(aux["t_emb"], io["single_t_emb"]) <= TOL
  h, w = x.shape[1] // 16, x.shape[2] // 16
  np.testing.assert_array_equal(rope.grid_positions(h, w), io["single_rope_pos_stage1"][0])
  np.testing.assert_array_equal(rope.grid_positions(2 * h, 2 * w), io["single_rope_pos_stage2"][0])
  for i in range(4):
    assert rel(aux[f"block{i}"], io[f"single_block{i}_out"]) <= TOL, i
  assert rel(aux["proj_fusion"], io["single_proj_fusion_out"]) <= TOL
  assert rel(aux["stage2_in"], io["single_stage2_tokens_in"]) <= TOL
  assert rel(aux["final_layer"], io["single_final_layer_out"]) <= TOL
  # the scanned forward (no intermediates) equals the block-by-block one
  np.testing.assert_allclose(model(jnp.asarray(x), jnp.asarray(io["single_semantics"]),
                                   jnp.asarray(t)), v, rtol=0, atol=1e-5)


def test_scalar_timestep_call(ref, model):
  _, io, _ = ref
  t = jnp.asarray(int(io["single_timestep"][0]), jnp.int32)
  v = model(jnp.asarray(nhwc(io["single_dit_input"])), jnp.asarray(io["single_semantics"]), t)
  assert rel(v, nhwc(io["single_velocity_scalar_t"])) <= TOL


def test_sampler_trajectory(ref, model):
  _, io, _ = ref
  np.testing.assert_array_equal(flow.sampling_timesteps(4)[0], io["sampler_timesteps"])
  np.testing.assert_array_equal(flow.sampling_timesteps(4)[1], io["sampler_next_timesteps"])
  image = jnp.asarray(nhwc(io["sampler_image"]))
  run = nnx.jit(lambda m, im, s, n: ppd.sample(m, im, s, steps=4, noise=n,
                                                return_trajectory=True))
  depth, traj = run(model, image, jnp.asarray(io["sampler_semantics"]),
                    jnp.asarray(io["sampler_init_noise"][:, 0]))
  for k in range(4):
    assert rel(traj["velocities"][k], io["sampler_velocities"][k][:, 0]) <= TOL, k
    assert rel(traj["latents"][k], io["sampler_latents"][k][:, 0]) <= TOL, k
  assert rel(depth, io["sampler_depth_out"][:, 0]) <= TOL


def test_training_loss_from_stored_noise_and_timesteps(ref, model):
  _, io, _ = ref
  depth = jnp.asarray(io["train_depth"][:, 0])
  mask = jnp.asarray(io["train_mask"][:, 0] > 0.5)
  latent, q = L.encode_gt(depth, mask)
  assert rel(q, io["train_gt_log_quantiles"]) <= TOL
  assert rel(latent, io["train_gt_latent"][:, 0]) <= TOL
  out = L.flow_matching_loss(model, jnp.asarray(nhwc(io["train_image"])),
                             jnp.asarray(io["train_semantics"]), depth, mask,
                             noise=jnp.asarray(io["train_noise"][:, 0]),
                             t=jnp.asarray(io["train_timesteps"].astype(np.int32)))
  for ours, theirs in (("noised", "train_noised_latent"), ("velocity", "train_velocity_pred"),
                       ("latent_pred", "train_latent_pred"), ("noise_pred", "train_noise_pred")):
    assert rel(out[ours], io[theirs][:, 0]) <= TOL, ours
  assert rel(out["mse"], io["train_loss_mse"][0]) <= TOL
  assert rel(out["grad_per_scale"], io["train_loss_grad_per_scale"]) <= TOL
  assert rel(out["grad"], io["train_loss_grad"][0]) <= TOL
  assert rel(out["total"], io["train_loss_total"][0]) <= TOL
  pre = L.flow_matching_loss(model, jnp.asarray(nhwc(io["train_image"])),
                             jnp.asarray(io["train_semantics"]), depth, mask,
                             noise=jnp.asarray(io["train_noise"][:, 0]),
                             t=jnp.asarray(io["train_timesteps"].astype(np.int32)),
                             pretrain=True)
  assert float(pre["total"]) == pytest.approx(float(out["mse"]), rel=1e-6)


# ---------------------------------------------------------------------------- the video DiT


@pytest.fixture(scope="module")
def vref(ref):
  from safetensors.numpy import load_file
  return (load_file(os.path.join(FIX, "weights_video.safetensors")),
          dict(np.load(os.path.join(FIX, "io_video.npz"))), ref[2])


@pytest.fixture(scope="module")
def vmodel(vref):
  sd, _, config = vref
  cfg = conv.config_from_reference(config, video=True)
  assert cfg == ppd.get_config("ppvd-tiny")
  m = conv.from_torch_state_dict({"dit_video." + k: v for k, v in sd.items()}, cfg,
                                 strict_unexpected=True)
  frozen = int(np.prod(sd["pos_embed"].shape))
  assert layers.count_params(m) + frozen == config["video_dit"]["param_count"] == 311_040
  return m


def _stats(v):
  v = np.asarray(v, np.float64).reshape(v.shape[0], -1)
  return np.stack([v.mean(1), v.std(1, ddof=1), np.abs(v).mean(1)], 1)


def test_video_state_dict_round_trip_is_bit_identical(vref, vmodel):
  sd, _, _ = vref
  back = conv.to_torch_state_dict(vmodel)
  assert sorted(back) == sorted(sd) and len(sd) == 395
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_video_single_call_and_intermediates(vref, vmodel):
  """The stored velocity subsets and intermediates: the stage-1 blocks, the fusion, the stage-2
  blocks before and with the propagated reference tokens, and the temporal blocks."""
  _, io, _ = vref
  frames = nhwc(io["frames"])
  x = np.concatenate([nhwc(io["noise"]), frames - 0.5], -1)
  t = jnp.asarray(int(io["single_timestep"][0]), jnp.int32)
  v, aux = nnx.jit(lambda m, a, s, tt: m(a, s, tt, intermediates=True))(
      vmodel, jnp.asarray(x), jnp.asarray(io["semantics"]), t)
  v = np.asarray(v)[..., 0]
  assert rel(v[:1], io["single_velocity_frame0"]) <= TOL
  assert rel(v[:, None, 192:224, 320:368], io["single_velocity_crop"]) <= TOL
  assert rel(v[:, None, 3::16, 5::16], io["single_velocity_strided"]) <= TOL
  assert rel(_stats(v), io["single_velocity_stats"]) <= TOL
  assert rel(aux["x_embed"][:, ::4], io["single_x_embed_tok4"]) <= TOL
  assert rel(aux["t_emb"], io["single_t_emb"]) <= TOL
  assert rel(aux["block11"][:, ::4], io["single_block11_out_tok4"]) <= TOL
  assert rel(aux["proj_fusion"][:, ::8], io["single_proj_fusion_out_tok8"]) <= TOL
  assert rel(aux["block17"][:, ::16], io["single_block17_out_tok16"]) <= TOL
  assert rel(aux["block18"][:, ::16], io["single_block18_out_main_tok16"]) <= TOL
  assert rel(aux["block18_refs"], io["single_block18_out_refs"]) <= TOL
  assert rel(aux["temporal0"][::16], io["single_temporal0_out_tok16"]) <= TOL
  assert rel(aux["temporal2"][::16], io["single_temporal2_out_tok16"]) <= TOL
  assert rel(aux["block23"][:, ::16], io["single_block23_out_tok16"]) <= TOL


def test_video_sampler_trajectory(vref, vmodel):
  _, io, _ = vref
  np.testing.assert_array_equal(flow.sampling_timesteps(4)[0], io["traj_timesteps"])
  run = nnx.jit(lambda m, im, s, n: ppd.sample(m, im, s, steps=4, noise=n,
                                                return_trajectory=True))
  depth, traj = run(vmodel, jnp.asarray(nhwc(io["frames"])), jnp.asarray(io["semantics"]),
                    jnp.asarray(io["noise"][:, 0]))
  lat, vel = np.asarray(traj["latents"]), np.asarray(traj["velocities"])
  for k in range(4):
    assert rel(lat[k][:, None, 192:224, 320:368], io["traj_latents_crop"][k]) <= TOL, k
    assert rel(lat[k][:, None, 3::16, 5::16], io["traj_latents_strided"][k]) <= TOL, k
    assert rel(_stats(lat[k]), io["traj_latents_stats"][k]) <= TOL, k
    assert rel(vel[k][:, None, 192:224, 320:368], io["traj_velocity_crop"][k]) <= TOL, k
  assert rel(np.asarray(depth)[:, None, 192:224, 320:368], io["traj_final_depth_crop"]) <= TOL
