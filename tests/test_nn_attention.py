"""``geojax.nn.attention.attend`` equals ``jax.nn.dot_product_attention`` (fp32, XLA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geojax.nn.attention import attend


@pytest.mark.parametrize("with_mask,with_bias", [(False, False), (True, False), (False, True)])
def test_attend_matches_jax_reference(with_mask, with_bias):
  rng = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rng.randn(2, n, 3, 16).astype(np.float32)) for n in (7, 9, 9))
  mask = jnp.asarray(rng.rand(2, 3, 7, 9) > 0.3) if with_mask else None
  bias = jnp.asarray(rng.randn(1, 3, 7, 9).astype(np.float32)) if with_bias else None
  got = attend(q, k, v, mask=mask, bias=bias)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask, bias=bias, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_attend_cudnn_falls_back_in_fp32_and_rejects_unknown():
  q = jnp.ones((1, 4, 2, 8), jnp.float32)
  np.testing.assert_allclose(np.asarray(attend(q, q, q, impl="cudnn")), np.ones((1, 4, 2, 8)))
  with pytest.raises(ValueError, match="implementation"):
    attend(q, q, q, impl="flash")
