"""One attention entry point for every model, and the ViT self-attention layer.

:func:`attend` wraps ``jax.nn.dot_product_attention``; the implementation (``"xla"`` or
``"cudnn"``) comes from the model config. cuDNN needs fp16/bf16 inputs and a head dim that is a
multiple of 8; fp32 parity runs use ``"xla"``.

Cross-view attention under view parallelism (``cross_view=True`` with a ``"view"`` mesh axis,
see :mod:`geojax.parallel.sharding`): the queries, the ``(B, heads, T, T)`` logits and the
output stay split along the token axis over ``"view"`` while keys and values are all-gathered,
so each device computes the rows of the attention matrix for its own views and no device ever
holds all of the logits. The XLA path states this with sharding constraints. cuDNN's
partitioning rule refuses a split sequence axis and asks q, k and v to share one sharding, so
the cuDNN path runs the kernel per device inside a ``shard_map`` that is manual over
``"view"`` only (local queries against gathered keys/values; other mesh axes stay automatic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from geojax.nn import layers
from geojax.nn.rope import apply_rope_2d
from geojax.parallel.sharding import VIEW_AXIS, gather_tokens, shard_tokens, view_axis_size

IMPLEMENTATIONS = ("xla", "cudnn")


def _attend_xla(q, k, v, mask, bias, cross_view: bool = False):
  """Softmax attention as two batched matmuls in ``(B, heads, T, d)`` layout.

  Same maths as ``jax.nn.dot_product_attention(implementation="xla")`` (which contracts in
  ``(B, T, heads, d)`` layout); XLA:CPU runs this formulation about 2.4x faster (DA3-small
  attention, 2 x 721 tokens, see BENCHMARKS.md) and XLA:GPU fuses both alike.

  ``cross_view`` (view-parallel path only): the logits' query axis is pinned to the ``"view"``
  mesh axis, and the softmax is normalised after the product with ``v`` - ``(e @ v) / sum(e)``
  with ``e = exp(logits - max)`` - so that only one ``(T/n, T)`` block per head is live on a
  device instead of both ``e`` and the normalised probabilities. Same result up to rounding.
  """
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32)).astype(q.dtype)
  qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  logits = jnp.matmul(qt * scale, jnp.swapaxes(kt, -1, -2), preferred_element_type=jnp.float32)
  if cross_view:
    logits = shard_tokens(logits, axis=2)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  if cross_view:
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    o = jnp.matmul(e.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    o = (o / e.sum(-1, keepdims=True)).astype(v.dtype)
    return jnp.swapaxes(o, 1, 2)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.matmul(probs, vt), 1, 2)


def _cudnn(q, k, v, mask=None, bias=None):
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="cudnn")


def gathered_kv_shard_map(kernel, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """``kernel(q, k, v)`` per device: local queries (token axis split over ``"view"``) against
  all-gathered keys and values. Manual over ``"view"`` only, so a ``"data"`` axis stays with
  the partitioner (and with the kernel's own batch partitioning rule)."""
  tokens = P(None, VIEW_AXIS)
  fn = jax.shard_map(kernel, in_specs=(tokens, P(), P()), out_specs=tokens,
                     axis_names={VIEW_AXIS})
  return fn(q, k, v)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla",
           mask: jax.Array | None = None, bias: jax.Array | None = None,
           cross_view: bool = False) -> jax.Array:
  """Scaled dot-product attention on ``(B, T, heads, head_dim)`` tensors (scale 1/sqrt(d)).

  ``impl="cudnn"`` runs ``jax.nn.dot_product_attention``'s fused cuDNN kernel (bf16/fp16 on
  NVIDIA GPUs; fp32 inputs fall back to ``"xla"``); ``impl="xla"`` is plain XLA (any backend).
  ``mask`` (True = attend) and ``bias`` broadcast to ``(B, heads, T_q, T_k)``.
  ``cross_view=True`` marks attention over the tokens of all views (``T = S*N``, view-major):
  with a ``"view"`` mesh axis the queries stay split over it and keys/values are gathered (see
  the module docstring); without one it changes nothing.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}; got {impl!r}")
  cudnn = impl == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16)
  n = view_axis_size() if cross_view else 1
  if n > 1 and q.shape[1] % n == 0 and k.shape[1] % n == 0:
    q, k, v = shard_tokens(q), gather_tokens(k), gather_tokens(v)
    if cudnn and mask is None and bias is None:
      return gathered_kv_shard_map(_cudnn, q, k, v)
    return shard_tokens(_attend_xla(q, k, v, mask, bias, cross_view=True))
  if cudnn:
    return _cudnn(q, k, v, mask, bias)
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

  def __call__(self, x: jax.Array, pos: jax.Array | None = None, *,
               cross_view: bool = False) -> jax.Array:
    """``x`` ``(B, T, C)``; ``cross_view``: the tokens are all views' (see :func:`attend`)."""
    b, t, c = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if pos is not None:
      q = apply_rope_2d(q, pos, self.rope_base)
      k = apply_rope_2d(k, pos, self.rope_base)
    o = attend(q, k, v, impl=self.attn_impl, cross_view=cross_view)
    return self.proj(o.reshape(b, t, c))
