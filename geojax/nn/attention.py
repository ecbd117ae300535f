"""One attention entry point for every model, and the ViT self-attention layer.

:func:`attend` wraps ``jax.nn.dot_product_attention``; the implementation (``"xla"``,
``"cudnn"`` or ``"chunked"``) comes from the model config. cuDNN needs fp16/bf16 inputs and a
head dim that is a multiple of 8; fp32 parity runs use ``"xla"``.

``"chunked"`` (:func:`attend_chunked`) is blockwise online-softmax attention in pure JAX (any
backend, any float dtype, accumulation in fp32): the ``(B, heads, T_q, T_k)`` logits are never
materialised, only ``BLOCK_Q x BLOCK_K`` tiles of them, in the forward and in the backward (a
``jax.custom_vjp`` in the flash-attention style: the forward saves the output and the per-row
softmax statistics, the backward recomputes the probabilities tile by tile). Temporaries are
``O(T * head_dim)`` instead of ``O(T^2)`` (16K tokens, 2 heads, fp32: 56 MiB for forward +
backward where ``"xla"`` needs 8.2 GiB); on XLA:CPU the forward is about as fast as
``"xla"``'s and forward + backward about 1.2x slower (BENCHMARKS.md, "Chunked attention").

Cross-view attention under view parallelism (``cross_view=True`` with a ``"view"`` mesh axis,
see :mod:`geojax.parallel.sharding`): the queries, the ``(B, heads, T, T)`` logits and the
output stay split along the token axis over ``"view"`` while keys and values are all-gathered,
so each device computes the rows of the attention matrix for its own views and no device ever
holds all of the logits. The XLA path states this with sharding constraints. cuDNN's
partitioning rule refuses a split sequence axis and asks q, k and v to share one sharding, so
the cuDNN path runs the kernel per device inside a ``shard_map`` that is manual over
``"view"`` only (local queries against gathered keys/values; other mesh axes stay automatic).
The chunked path does the same (the blockwise kernel per device on its local queries), masks
and biases included: their query axis is split like the queries' when it is not broadcast.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from geojax.nn import layers
from geojax.nn.rope import apply_rope_2d
from geojax.parallel.sharding import VIEW_AXIS, gather_tokens, shard_tokens, view_axis_size

IMPLEMENTATIONS = ("xla", "cudnn", "chunked")

# Tile of the chunked implementation: at most BLOCK_Q queries x BLOCK_K keys per step. Lengths
# are split into ceil(T / BLOCK) equal blocks (rounded up to a multiple of 8), so padding is
# small; each (B, heads, BLOCK_Q, BLOCK_K) fp32 tile is 1 MiB per batch-head at 512 x 512.
BLOCK_Q = 512
BLOCK_K = 512


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


# ---------------------------------------------------------------------------------------------
# Chunked (blockwise online-softmax) attention.
#
# Internal layout (B, heads, T, d), lengths padded to whole blocks; q arrives pre-scaled by
# 1/sqrt(d) (as in _attend_xla). mask/bias are rank 4 with broadcast axes kept at size 1, so a
# (B, 1, 1, T_k) key mask or a (1, heads, T_q, T_k) bias is never broadcast to full size.


def _block_size(t: int, block: int) -> int:
  """Length of each of the ``ceil(t / block)`` equal blocks covering ``t``; a multiple of 8
  (at most ``block``) when there are several and ``block`` is one, so padding stays small."""
  if block < 1:
    raise ValueError(f"attention block size must be >= 1; got {block}")
  n = -(-t // block)
  if n <= 1:
    return max(t, 1)
  size = -(-t // n)
  if block % 8 == 0:
    size = min(-(-size // 8) * 8, block)
  return size


def _as_4d(x):
  return None if x is None else jnp.reshape(x, (1,) * (4 - x.ndim) + x.shape)


def _tile(x, i, bq, j, bk):
  """Tile ``(i, j)`` of a rank-4 mask/bias; broadcast (size-1) query/key axes are kept."""
  if x.shape[2] != 1:
    x = jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=2)
  if x.shape[3] != 1:
    x = jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=3)
  return x


def _rows(x, i, size):
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=2)


def _tile_logits(qi, kj, mask, bias, i, j, bq, bk, kv_len):
  """fp32 logits of query block ``i`` against key block ``j``, with the xla path's bias and
  mask semantics (masked: ``finfo.min``); padded keys (``>= kv_len``) get ``-inf``, i.e. no
  weight at all, also in fully masked rows."""
  s = jnp.matmul(qi, jnp.swapaxes(kj, -1, -2), preferred_element_type=jnp.float32)
  if bias is not None:
    s = s + _tile(bias, i, bq, j, bk).astype(jnp.float32)
  if mask is not None:
    s = jnp.where(_tile(mask, i, bq, j, bk), s, jnp.finfo(jnp.float32).min)
  if kv_len is not None:
    col = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, bk), 3)
    s = jnp.where(col < kv_len, s, -jnp.inf)
  return s


def _blocks_to_rows(x):
  """``(n, B, H, blk, ...)`` per-block results -> ``(B, H, n * blk, ...)``."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def _chunked_forward(q, k, v, mask, bias, bq, bk, kv_len):
  """Output ``(B, H, T_q, dv)`` and the softmax statistics: row max ``m`` and the row sum
  ``l`` of ``exp(logits - m)`` (fp32, ``(B, H, T_q)``).

  ``(m, l)`` are kept instead of ``lse = m + log l``: in a fully masked row ``m = finfo.min``
  absorbs ``log l`` in fp32, and the uniform row (the xla path's result) would be lost.
  """
  f32 = jnp.float32
  nq, nk = q.shape[2] // bq, k.shape[2] // bk

  def q_block(i):
    qi = _rows(q, i, bq)

    def k_step(carry, j):
      m, l, acc = carry
      kj, vj = _rows(k, j, bk), _rows(v, j, bk)
      s = _tile_logits(qi, kj, mask, bias, i, j, bq, bk, kv_len)
      m_new = jnp.maximum(m, s.max(-1))  # finite: every key block holds a real key
      p = jnp.exp(s - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      l = alpha * l + p.sum(-1)
      acc = alpha[..., None] * acc + jnp.matmul(p.astype(v.dtype), vj, preferred_element_type=f32)
      return (m_new, l, acc), None

    # Carries made *_like the queries: inside a shard_map they vary over the same mesh axes.
    row = jnp.zeros_like(qi[..., 0], f32)
    acc = jnp.zeros_like(qi, f32, shape=qi.shape[:-1] + v.shape[-1:])
    (m, l, acc), _ = jax.lax.scan(k_step, (row - jnp.inf, row, acc), jnp.arange(nk))
    return (acc / l[..., None]).astype(v.dtype), m, l

  o, m, l = jax.lax.map(q_block, jnp.arange(nq))
  return _blocks_to_rows(o), _blocks_to_rows(m), _blocks_to_rows(l)


def _chunked_backward(q, k, v, mask, bias, o, m, l, do, bq, bk, kv_len, bias_grad):
  """Gradients wrt ``q`` (pre-scaled), ``k``, ``v`` and, if ``bias_grad``, ``bias``.

  Outer loop over key blocks (``dk``, ``dv`` of the block accumulate over an inner loop over
  query blocks), ``dq`` accumulates across the outer loop; the probabilities of each tile are
  recomputed from ``(m, l)``. ``dS = P * (dP - rowsum(dO * O))``, zero where masked (the xla
  path's ``where`` passes no gradient to masked logits, fully masked rows included).
  """
  f32 = jnp.float32
  nq, nk = q.shape[2] // bq, k.shape[2] // bk
  delta = jnp.sum(do.astype(f32) * o.astype(f32), -1)

  def k_block(dq, j):
    kj, vj = _rows(k, j, bk), _rows(v, j, bk)

    def q_step(carry, i):
      dk, dv = carry
      qi, doi = _rows(q, i, bq), _rows(do, i, bq)
      mi, li, di = (_rows(x[..., None], i, bq)[..., 0] for x in (m, l, delta))
      s = _tile_logits(qi, kj, mask, bias, i, j, bq, bk, kv_len)
      p = jnp.exp(s - mi[..., None]) / li[..., None]
      dv = dv + jnp.matmul(jnp.swapaxes(p.astype(do.dtype), -1, -2), doi,
                           preferred_element_type=f32)
      dp = jnp.matmul(doi, jnp.swapaxes(vj, -1, -2).astype(do.dtype), preferred_element_type=f32)
      ds = p * (dp - di[..., None])
      if mask is not None:
        ds = jnp.where(_tile(mask, i, bq, j, bk), ds, 0.0)
      dqi = jnp.matmul(ds.astype(k.dtype), kj, preferred_element_type=f32)
      dk = dk + jnp.matmul(jnp.swapaxes(ds.astype(q.dtype), -1, -2), qi,
                           preferred_element_type=f32)
      dbias = None
      if bias_grad:  # summed over the bias's broadcast axes
        axes = tuple(a for a in range(4) if bias.shape[a] == 1 and ds.shape[a] != 1)
        dbias = ds.sum(axes, keepdims=True)
      return (dk, dv), (dqi, dbias)

    init = (jnp.zeros_like(kj, f32), jnp.zeros_like(vj, f32))
    (dk, dv), (dqs, dbias) = jax.lax.scan(q_step, init, jnp.arange(nq))
    return dq + dqs, (dk, dv, dbias)

  dq0 = jnp.moveaxis(jnp.zeros_like(q, f32).reshape(q.shape[:2] + (nq, bq, q.shape[3])), 2, 0)
  dq, (dk, dv, dbias) = jax.lax.scan(k_block, dq0, jnp.arange(nk))
  grads = [_blocks_to_rows(dq).astype(q.dtype), _blocks_to_rows(dk).astype(k.dtype),
           _blocks_to_rows(dv).astype(v.dtype)]
  if bias_grad:  # (nk, nq, B', H', bq', bk') -> (B', H', T_q or 1, T_k or 1)
    db = jnp.transpose(dbias, (2, 3, 1, 4, 0, 5))
    db = db.reshape(db.shape[:2] + (nq * db.shape[3], nk * db.shape[5]))
    if bias.shape[2] == 1:
      db = db.sum(2, keepdims=True)
    if bias.shape[3] == 1:
      db = db.sum(3, keepdims=True)
    grads.append(db.astype(bias.dtype))
  else:
    grads.append(None)
  return grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _chunked_core(q, k, v, mask, bias, bq, bk, kv_len):
  return _chunked_forward(q, k, v, mask, bias, bq, bk, kv_len)[0]


def _chunked_core_fwd(q, k, v, mask, bias, bq, bk, kv_len):
  # symbolic_zeros: the inputs arrive as CustomVJPPrimal; a bias that is not differentiated
  # gets no gradient computed (its flag travels as the residuals' tree structure).
  bias_grad = bias is not None and bias.perturbed
  q, k, v, mask, bias = (None if x is None else x.value for x in (q, k, v, mask, bias))
  o, m, l = _chunked_forward(q, k, v, mask, bias, bq, bk, kv_len)
  return o, (q, k, v, mask, bias, o, m, l, (None,) if bias_grad else ())


def _chunked_core_bwd(bq, bk, kv_len, res, do):
  q, k, v, mask, bias, o, m, l, flag = res
  if isinstance(do, jax.custom_derivatives.SymbolicZero):
    return (None,) * 5
  dq, dk, dv, dbias = _chunked_backward(q, k, v, mask, bias, o, m, l, do, bq, bk, kv_len,
                                        bias_grad=bool(flag))
  return dq, dk, dv, None, dbias


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd, symbolic_zeros=True)


def attend_chunked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                   bias: jax.Array | None = None, *, block_q: int | None = None,
                   block_k: int | None = None) -> jax.Array:
  """Blockwise attention, ``attend(..., impl="chunked")`` on one device (see :func:`attend`).

  ``(B, T, heads, d)`` inputs, the same results as ``impl="xla"`` up to rounding, fully masked
  rows included (uniform weights over the real keys, zero gradient to their logits); the
  gradient wrt ``bias`` is computed when ``bias`` is differentiated (its size: the bias's).
  At most ``block_q x block_k`` (default :data:`BLOCK_Q` x :data:`BLOCK_K`) logits per batch
  and head are live at a time, in the forward and in the backward. Lengths that are not whole
  blocks are padded inside (padded keys take no weight); inputs of any float dtype,
  accumulation in fp32.
  """
  if mask is not None:
    mask = mask.astype(jnp.bool_)
  tq, tk = q.shape[1], k.shape[1]
  bq = _block_size(tq, BLOCK_Q if block_q is None else block_q)
  bk = _block_size(tk, BLOCK_K if block_k is None else block_k)
  pad_q, pad_k = -tq % bq, -tk % bk
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32)).astype(q.dtype)
  qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q * scale, k, v))
  qt = jnp.pad(qt, ((0, 0), (0, 0), (0, pad_q), (0, 0)))
  kt, vt = (jnp.pad(a, ((0, 0), (0, 0), (0, pad_k), (0, 0))) for a in (kt, vt))
  mask, bias = _as_4d(mask), _as_4d(bias)
  extra = []
  for x in (mask, bias):
    if x is not None:
      if x.shape[2] not in (1, tq) or x.shape[3] not in (1, tk):
        raise ValueError(f"mask/bias of shape {x.shape} does not broadcast to "
                         f"(B, heads, {tq}, {tk})")
      x = jnp.pad(x, ((0, 0), (0, 0), (0, pad_q if x.shape[2] == tq else 0),
                      (0, pad_k if x.shape[3] == tk else 0)))
    extra.append(x)
  o = _chunked_core(qt, kt, vt, *extra, bq, bk, tk if pad_k else None)
  return jnp.swapaxes(o[:, :, :tq], 1, 2)


def _pcast_view(x):
  """``x`` as varying over ``"view"`` (inside the view shard_map), like the local queries: the
  kernel's loop carries and its custom VJP then have one type, and the cast's transpose sums a
  replicated input's gradient over the devices."""
  if x is None:
    return x
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = aval.mat.varying
  if VIEW_AXIS in vma:
    return x
  return jax.lax.pcast(x, VIEW_AXIS, to="varying")


def _chunked_local(q, k, v, mask=None, bias=None):
  k, v, bias = _pcast_view(k), _pcast_view(v), _pcast_view(bias)
  return attend_chunked(q, k, v, mask, bias)


def gathered_kv_shard_map(kernel, q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None,
                          bias: jax.Array | None = None) -> jax.Array:
  """``kernel(q, k, v)`` per device: local queries (token axis split over ``"view"``) against
  all-gathered keys and values. Manual over ``"view"`` only, so a ``"data"`` axis stays with
  the partitioner (and with the kernel's own batch partitioning rule).

  A ``mask``/``bias`` (broadcasting to ``(B, heads, T_q, T_k)``) is passed on as
  ``kernel(q, k, v, mask=..., bias=...)``: split along its query axis like the queries when
  that axis is not broadcast, whole on every device otherwise.
  """
  tokens = P(None, VIEW_AXIS)
  extra = {name: _as_4d(x) for name, x in (("mask", mask), ("bias", bias)) if x is not None}
  specs = {name: P(None, None, VIEW_AXIS) if x.shape[2] != 1 else P()
           for name, x in extra.items()}
  fn = jax.shard_map(lambda q, k, v, extra: kernel(q, k, v, **extra),
                     in_specs=(tokens, P(), P(), specs), out_specs=tokens,
                     axis_names={VIEW_AXIS})
  return fn(q, k, v, extra)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla",
           mask: jax.Array | None = None, bias: jax.Array | None = None,
           cross_view: bool = False) -> jax.Array:
  """Scaled dot-product attention on ``(B, T, heads, head_dim)`` tensors (scale 1/sqrt(d)).

  ``impl="cudnn"`` runs ``jax.nn.dot_product_attention``'s fused cuDNN kernel (bf16/fp16 on
  NVIDIA GPUs; fp32 inputs fall back to ``"xla"``); ``impl="xla"`` is plain XLA (any backend);
  ``impl="chunked"`` is blockwise attention in plain XLA (:func:`attend_chunked`, tiles of
  :data:`BLOCK_Q` x :data:`BLOCK_K`): the same results as ``"xla"`` without ever holding the
  ``(B, heads, T_q, T_k)`` logits, in the forward or the backward.
  ``mask`` (True = attend) and ``bias`` broadcast to ``(B, heads, T_q, T_k)``. A fully masked
  row attends uniformly to all keys (softmax over equal ``finfo.min`` logits), every ``impl``
  but cuDNN.
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
    if impl == "chunked":
      return gathered_kv_shard_map(_chunked_local, q, k, v, mask=mask, bias=bias)
    if cudnn and mask is None and bias is None:
      return gathered_kv_shard_map(_cudnn, q, k, v)
    return shard_tokens(_attend_xla(q, k, v, mask, bias, cross_view=True))
  if impl == "chunked":
    return attend_chunked(q, k, v, mask, bias)
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
