"""The released URGT configuration: its parameter count and an ahead-of-time compile of the
crop-level forward at 518 x 518 crops (abstract weights, nothing allocated)."""

import jax
import jax.numpy as jnp
from flax import nnx

from geojax.models import urgt
from geojax.nn.layers import count_params


def test_full_preset_count_and_lowering():
  model = nnx.eval_shape(lambda: urgt.URGT.from_preset("urgt", rngs=nnx.Rngs(0)))
  assert count_params(model) == 975_226_374
  assert count_params(model.depth_head) == 32_654_562
  assert count_params(model.normal_head) == 32_654_628
  graphdef, state = nnx.split(model)
  s = jax.ShapeDtypeStruct
  args = (s((1, 4, 518, 518, 3), jnp.float32), s((1, 4, 518, 518, 1), jnp.float32),
          s((1, 4, 518, 518, 3), jnp.float32))
  fwd = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
  lowered = fwd.lower(state, *args)
  assert lowered.compile() is not None  # the whole network compiles ahead of time on CPU
  out = lowered.out_info
  assert out["depth"].shape == (1, 4, 518, 518) and out["normal"].shape == (1, 4, 518, 518, 3)
  assert out["depth_conf"].shape == out["normal_conf"].shape == (1, 4, 518, 518)
