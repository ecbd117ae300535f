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


def _attend_xla(q, k, v, mask, bias):
  """Softmax attention as two batched matmuls in ``(B, heads, T, d)`` layout.

  Same maths as ``jax.nn.dot_product_attention(implementation="xla")`` (which contracts in
  ``(B, T, heads, d)`` layout); XLA:CPU runs this formulation about 2.4x faster (DA3-small
  attention, 2 x 721 tokens, see BENCHMARKS.md) and XLA:GPU fuses both alike.
  """
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32)).astype(q.dtype)
  qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  logits = jnp.matmul(qt * scale, jnp.swapaxes(kt, -1, -2), preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.matmul(probs, vt), 1, 2)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla",
           mask: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention on ``(B, T, heads, head_dim)`` tensors (scale 1/sqrt(d)).

  ``impl="cudnn"`` runs ``jax.nn.dot_product_attention``'s fused cuDNN kernel (bf16/fp16 on
  NVIDIA GPUs; fp32 inputs fall back to ``"xla"``); ``impl="xla"`` is plain XLA (any backend).
  ``mask`` (True = attend) and ``bias`` broadcast to ``(B, heads, T_q, T_k)``.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  if impl == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")
  # cuDNN flash attention has no fp32 kernel; fall back instead of failing deep inside XLA.
  return _attend_xla(q, k, v, mask, bias)


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
