"""The released DAGE configuration: parameter counts and an ahead-of-time lowering of its
forward (abstract weights, nothing allocated)."""

import jax
import jax.numpy as jnp
from flax import nnx

from geojax.models import dage as dage_lib
from geojax.nn.layers import count_params

# Official counts (``../shared/reference/dage.md`` §1).
TOTAL = 1_372_890_653
USED_BY_INFERENCE = 1_285_176_273


def test_full_preset_counts_and_lowering():
  model = nnx.eval_shape(lambda: dage_lib.DAGE.from_preset("dage", rngs=nnx.Rngs(0)))
  assert count_params(model) == TOTAL
  unused = (count_params(model.point_decoder) + count_params(model.point_head)
            + count_params(model.token_splitter) + model.hr_encoder.backbone.mask_token.size)
  assert TOTAL - unused == USED_BY_INFERENCE
  graphdef, state = nnx.split(model)
  video = jax.ShapeDtypeStruct((1, 2, 540, 960, 3), jnp.float32)
  fwd = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v, lr_max_size=252, hr_num_tokens=3600))
  lowered = fwd.lower(state, video)
  out = lowered.out_info
  assert out["local_points"].shape == (1, 2, 540, 960, 3)
  assert out["conf"].shape == (1, 2, 540, 960)
  assert out["camera_poses"].shape == (1, 2, 4, 4) and out["metric_scale"].shape == (1, 1)
