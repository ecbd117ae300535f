"""One attention entry point for every model, and the ViT self-attention layer.

:func:`attend` wraps ``jax.nn.dot_product_attention``; the implementation (``"xla"`` or
``"cudnn"``) comes from the model config. cuDNN needs fp16/bf16 inputs and a head dim that is a
multiple of 8; fp32 parity runs use ``"xla"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from geojax.nn import layers
from geojax.nn.rope import apply_rope_2d

IMPLEMENTATIONS = ("xla", "cudnn")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla",
           mask: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention on ``(B, T, heads, head_dim)`` tensors (scale 1/sqrt(d))."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    # cuDNN flash attention has no fp32 kernel; fall back instead of failing deep inside XLA.
    impl = "xla"
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=impl)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection, optional QK-norm and 2D RoPE.

  Matches timm/DINOv2/VGGT ``Attention``: qkv rows are ``[q | k | v]``, head-major inside each;
  QK-norm is a LayerNorm over ``head_dim`` applied before RoPE.
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True,
               proj_bias: bool = True, qk_norm: bool = False, qk_norm_eps: float = 1e-5,
               attn_impl: str = "xla", rope_base: float = 100.0, dtype=None):
    if dim % num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.attn_impl = attn_impl
    self.rope_base = rope_base
    self.qkv = layers.linear(dim, 3 * dim, bias=qkv_bias, rngs=rngs, dtype=dtype,
                             axes=("embed", "heads"))
    self.proj = layers.linear(dim, dim, bias=proj_bias, rngs=rngs, dtype=dtype,
                              axes=("heads", "embed"))
    if qk_norm:
      self.q_norm = layers.layer_norm(self.head_dim, qk_norm_eps, rngs=rngs, dtype=dtype,
                                      axis_name=None)
      self.k_norm = layers.layer_norm(self.head_dim, qk_norm_eps, rngs=rngs, dtype=dtype,
                                      axis_name=None)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jax.Array, pos: jax.Array | None = None) -> jax.Array:
    b, t, c = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if pos is not None:
      q = apply_rope_2d(q, pos, self.rope_base)
      k = apply_rope_2d(k, pos, self.rope_base)
    o = attend(q, k, v, impl=self.attn_impl)
    return self.proj(o.reshape(b, t, c))
