"""DA3 training task: per-sample pose conditioning and the teacher-label switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.data.synthetic import render_scene
from geojax.losses import da3 as L
from geojax.models.da3 import DA3
from geojax.train.tasks import DA3Task, normalize_images


@pytest.fixture(scope="module")
def setup():
  model = DA3.from_preset("da3-tiny", rngs=nnx.Rngs(0))
  scenes = [render_scene(0, i, num_views=2, height=28, width=42) for i in range(2)]
  batch = {k: np.stack([s[k] for s in scenes]) for k in
           ("images", "depth", "valid", "intrinsics", "extrinsics")}
  return model, batch


def test_pose_mask_picks_encoded_or_placeholder_token(setup):
  model, batch = setup
  x = normalize_images(batch["images"])
  ext, k = jnp.asarray(batch["extrinsics"]), jnp.asarray(batch["intrinsics"])
  fwd = nnx.jit(lambda m, mask: m(x, ext, k, ref_view_strategy="first", pose_mask=mask))
  posed = fwd(model, jnp.array([True, True]))
  free = fwd(model, jnp.array([False, False]))
  mixed = fwd(model, jnp.array([True, False]))
  # All-False equals running without cameras (the learned token, view 0 as reference).
  plain = nnx.jit(lambda m: m(x, ref_view_strategy="first"))(model)
  for key in ("depth", "ray", "extrinsics"):
    np.testing.assert_allclose(free[key], plain[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[key][0], posed[key][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[key][1], free[key][1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(posed["depth"][1], free["depth"][1])
  with pytest.raises(ValueError, match="pose_mask must be"):
    model(x, ext, k, pose_mask=jnp.array([True]))
  with pytest.raises(ValueError, match="pose_mask needs extrinsics"):
    model(x, pose_mask=jnp.array([True, False]))


def test_loss_fn_pose_conditioning_and_teacher_switch(setup):
  model, batch = setup
  cfg = dict(total_steps=10, teacher_switch_fraction=0.5)
  posed = DA3Task(L.DA3LossConfig(pose_cond_prob=1.0, **cfg))
  loss, aux = nnx.jit(posed.loss_fn)(model, dict(batch), jax.random.key(0))
  assert np.isfinite(float(loss)) and float(aux["pose_conditioned"]) == 1.0
  # Teacher labels: an affine copy of the GT aligns back to the GT exactly, so after the switch
  # the loss equals the GT loss; a wrong teacher changes it only after the switch.
  task = DA3Task(L.DA3LossConfig(pose_cond_prob=0.0, **cfg))
  f = nnx.jit(lambda m, b: task.loss_fn(m, b, jax.random.key(0))[0])
  teacher = np.stack([2.0 * batch["depth"] + 0.5, np.flip(batch["depth"], -1)])
  losses = {}
  for name, t in (("affine", teacher[0]), ("wrong", teacher[1])):
    for step in (0, 5):
      losses[name, step] = float(f(model, dict(batch, teacher_depth=t,
                                                train_step=jnp.int32(step))))
  base = losses["wrong", 0]  # before the switch the teacher is ignored
  np.testing.assert_allclose(losses["affine", 0], base, rtol=1e-5)
  np.testing.assert_allclose(losses["affine", 5], base, rtol=1e-4)
  assert not np.isclose(losses["wrong", 5], base, rtol=1e-3)


def test_init_from_official_weights(setup, tmp_path):
  """``init.weights``: official-layout safetensors -> the sharded training model, leaf for leaf."""
  import ml_collections
  from geojax.convert.da3 import save_official
  from geojax.models import registry
  from geojax.parallel import sharding
  from geojax.train import trainer
  model, _ = setup
  save_official(model, tmp_path / "official")
  config = ml_collections.ConfigDict(dict(
      seed=1, init=dict(weights=str(tmp_path / "official"), checkpoint="")))
  family = registry.get_family("da3")
  mesh = sharding.make_mesh((1, 1, 1))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
    loaded = trainer.build_model(config, family, {"preset": "da3-tiny", "overrides": {}})
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(loaded, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config.init.weights = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="init.weights"):
    trainer.build_model(config, family, {"preset": "da3-tiny", "overrides": {}})
