"""``attend(impl="chunked")``: blockwise attention equals ``impl="xla"`` (outputs and gradients,
masks, biases, odd lengths, fully masked rows), its compiled temporaries at 16K tokens stay far
below the logits' size, it composes with view parallelism, and DA3 runs on it unchanged.

Small block sizes (``block_q``/``block_k`` or the module's ``BLOCK_Q``/``BLOCK_K``) make short
sequences span several blocks with padding. Tolerance: ``max |a - b| <= 1e-5 * max(1, max |b|)``
in fp32 (``jax_default_matmul_precision="highest"``, set in conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geojax.nn import attention
from geojax.nn.attention import attend, attend_chunked

from test_view_parallel import scaled_error, tiny_graphdef, tiny_state

TOL = 1e-5


def _inputs(seed, b, tq, tk, heads, d, mask_shape=None, bias_shape=None, masked_rows=()):
  rng = np.random.RandomState(seed)
  q = rng.randn(b, tq, heads, d)
  k, v = rng.randn(2, b, tk, heads, d)
  mask = bias = None
  if mask_shape is not None:
    mask = rng.rand(*mask_shape) > 0.3
    for r in masked_rows:  # fully masked query rows
      mask[..., r, :] = False
  if bias_shape is not None:
    bias = rng.randn(*bias_shape)
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return f32(q), f32(k), f32(v), None if mask is None else jnp.asarray(mask), f32(bias)


def _loss(fn, mask):
  def loss(q, k, v, bias):
    o = fn(q, k, v, mask, bias)
    return jnp.sum(o * jnp.cos(o)), o  # a cotangent that differs per element
  return loss


def _xla(q, k, v, mask, bias):
  return attend(q, k, v, impl="xla", mask=mask, bias=bias)


# (B, Tq, Tk, heads, d, mask shape, bias shape, fully masked rows); blocks of 16 x 16 except
# "single_block" (the default 512 x 512: one block, no padding).
CASES = {
    "plain_odd": (2, 37, 53, 3, 8, None, None, ()),
    "full_mask_bias": (2, 37, 53, 3, 8, (2, 3, 37, 53), (1, 3, 37, 53), (0, 20, 36)),
    "key_mask_query_bias": (2, 53, 37, 3, 8, (2, 1, 1, 37), (3, 53, 1), ()),
    "single_block": (1, 7, 9, 2, 8, (1, 1, 7, 9), (7, 9), (3,)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_equals_xla_outputs_and_gradients(case):
  """Outputs and gradients wrt q, k, v and bias; with "full_mask_bias" also the gradients
  when the bias is a constant (no bias gradient is computed then) and the fully masked rows'
  semantics: the mean of the values of the real keys (53 keys padded to 64), no gradient to
  ``q``."""
  b, tq, tk, heads, d, mask_shape, bias_shape, rows = CASES[case]
  q, k, v, mask, bias = _inputs(0, b, tq, tk, heads, d, mask_shape, bias_shape, rows)
  blocks = {} if case == "single_block" else {"block_q": 16, "block_k": 16}
  chunked = lambda q, k, v, m, bias: attend_chunked(q, k, v, m, bias, **blocks)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  results = {}
  for name, fn in (("xla", _xla), ("chunked", chunked)):
    grad = jax.jit(jax.grad(_loss(fn, mask), argnums=argnums, has_aux=True))
    grads, out = grad(q, k, v, bias)
    results[name] = {"out": out, **dict(zip(("dq", "dk", "dv", "dbias"), grads))}
    if case == "full_mask_bias":
      grads, _ = jax.jit(jax.grad(_loss(fn, mask), argnums=(0, 1, 2), has_aux=True))(
          q, k, v, bias)
      results[name].update({n + "_const_bias": g for n, g in zip(("dq", "dk", "dv"), grads)})
  errors = {n: scaled_error(results["chunked"][n], results["xla"][n]) for n in results["xla"]}
  assert max(errors.values()) < TOL, errors
  got = results["chunked"]
  if bias is not None:
    assert got["dbias"].shape == bias.shape
  for r in rows:
    np.testing.assert_allclose(np.asarray(got["out"][:, r]), np.asarray(v.mean(1)), atol=1e-6)
    assert np.all(np.asarray(got["dq"][:, r]) == 0)


def test_bf16_inputs_accumulate_in_fp32():
  q, k, v, mask, bias = _inputs(2, 1, 45, 45, 2, 16, (45, 45), (1, 2, 45, 45))
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  fn = lambda q, k, v: attend(q, k, v, impl="chunked", mask=mask, bias=bias)
  loss = lambda q, k, v: (jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), fn(q, k, v))
  grads, got = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q16, k16, v16)
  assert got.dtype == jnp.bfloat16
  want = attend(*(x.astype(jnp.float32) for x in (q16, k16, v16)), mask=mask, bias=bias)
  assert scaled_error(got, want) < 1e-2
  assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())
             for g in grads)


def test_block_sizes_and_errors():
  assert attention.IMPLEMENTATIONS == ("xla", "cudnn", "chunked")
  assert (attention.BLOCK_Q, attention.BLOCK_K) == (512, 512)
  # ceil(t / block) equal blocks, multiples of 8: little padding
  assert [attention._block_size(t, 512) for t in (7, 512, 600, 1442, 16384)] == [
      7, 512, 304, 488, 512]
  assert attention._block_size(37, 16) == 16 and attention._block_size(37, 12) == 10
  q = jnp.ones((1, 6, 2, 8))
  with pytest.raises(ValueError, match="broadcast"):
    attend(q, q, q, impl="chunked", mask=jnp.ones((1, 2, 6, 4), bool))
  with pytest.raises(ValueError, match="block size"):
    attend_chunked(q, q, q, block_q=0)


def test_attend_uses_module_block_sizes(monkeypatch):
  q, k, v, mask, bias = _inputs(3, 1, 30, 30, 2, 8, (30, 30), (2, 30, 30), (4,))
  monkeypatch.setattr(attention, "BLOCK_Q", 8)
  monkeypatch.setattr(attention, "BLOCK_K", 8)
  jaxpr = str(jax.make_jaxpr(lambda q: attend(q, k, v, impl="chunked"))(q))
  assert "scan" in jaxpr and "30,30" not in jaxpr.replace(" ", "")  # no full logits
  got = attend(q, k, v, impl="chunked", mask=mask, bias=bias)
  assert scaled_error(got, _xla(q, k, v, mask, bias)) < TOL


def test_temp_memory_at_16k_tokens_is_bounded():
  """Compile only: forward and forward+backward at 16K tokens (B=1, 2 heads, d=64, fp32) need
  under 1/8 of the 2 GiB of logits in temporaries (~29 and ~50 MiB on XLA:CPU); ``"xla"``
  needs more than the logits for its backward (~6 GiB)."""
  b, t, heads, d = 1, 16384, 2, 64
  spec = jax.ShapeDtypeStruct((b, t, heads, d), jnp.float32)
  logits_bytes = b * heads * t * t * 4

  def temp_bytes(impl, backward):
    f = lambda q, k, v: attend(q, k, v, impl=impl)
    if backward:
      f = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, impl=impl) ** 2), argnums=(0, 1, 2))
    return jax.jit(f).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes

  fwd, bwd = temp_bytes("chunked", False), temp_bytes("chunked", True)
  assert fwd < logits_bytes / 8 and bwd < logits_bytes / 8, (fwd, bwd, logits_bytes)
  assert temp_bytes("xla", True) >= logits_bytes


def _da3_report() -> dict:
  """da3-tiny on "xla" and on "chunked" (blocks of 4), same numpy-drawn weights, 3 views of
  28 x 42: 7 tokens per view and 21 across views, so the backbone's attention layers run
  several blocks with padding. Returns per output the largest
  ``|got - want| - (atol + rtol |want|)`` (<= 0: within)."""
  import concurrent.futures

  attention.BLOCK_Q = attention.BLOCK_K = 4
  graphdef, state = tiny_state()
  x = jax.random.normal(jax.random.key(0), (1, 3, 28, 42, 3))
  lowered = [jax.jit(lambda st, x, gd=gd: nnx.merge(gd, st)(x)).lower(state, x)
             for gd in (graphdef, tiny_graphdef(attn_impl="chunked"))]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # XLA compiles without the GIL
    want, got = (c(state, x) for c in pool.map(lambda lo: lo.compile(), lowered))
  want, got = jax.tree.leaves_with_path(want), jax.tree.leaves(got)
  report = {}
  for (path, w), g in zip(want, got):
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    report[jax.tree_util.keystr(path)] = float(np.max(np.abs(g - w) - (1e-5 + 1e-4 * np.abs(w))))
  return report


def _view_parallel_report() -> dict:
  """Chunked cross-view attention over a ``"view"`` mesh of 8 devices (local queries, gathered
  keys/values, shard_map) vs single-device ``"xla"``: output and gradients."""
  from geojax.parallel import sharding

  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_view_mesh(8)
  t = 8 * 13  # 13 query rows per device, blocks of 8: padded on every device
  cases = {"plain": (None, None), "split_mask_bias": ((2, 1, t, t), (1, 2, t, t)),
           "replicated_key_bias": (None, (2, 1, t))}
  report = {}
  for name, (mask_shape, bias_shape) in cases.items():
    q, k, v, mask, bias = _inputs(4, 2, t, t, 2, 8, mask_shape, bias_shape, (5, 60))
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)

    def grad(impl):
      fn = lambda q, k, v, m, b: attend(q, k, v, impl=impl, mask=m, bias=b, cross_view=True)
      return jax.jit(jax.grad(_loss(fn, mask), argnums=argnums, has_aux=True))

    want_grads, want = grad("xla")(q, k, v, bias)
    attention.BLOCK_Q = attention.BLOCK_K = 8
    with jax.set_mesh(mesh):
      f = grad("chunked")
      got_grads, got = f(q, k, v, bias)
      hlo = f.lower(q, k, v, bias).as_text()
    entry = {"out": scaled_error(got, want), "out_spec": list(got.sharding.spec),
             "shard_map": "manual_computation" in hlo or "shard_map" in hlo}
    for n, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
      entry[n] = scaled_error(g, w)
    report[name] = entry
  return report


def _report() -> dict:
  jax.config.update("jax_default_matmul_precision", "highest")
  if os.environ.get("GEOJAX_CACHE_DIR"):
    from geojax.runtime import enable_compilation_cache
    enable_compilation_cache()
  return {"view_parallel": _view_parallel_report(), "da3": _da3_report()}


@pytest.fixture(scope="module")
def report():
  """One subprocess with 8 CPU devices and LLVM -O0 (half the compile time of the two DA3
  programs; same HLO passes, same numerics) runs both reports below."""
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
          "import test_nn_attention_chunked as t; print('REPORT', json.dumps(t._report()))")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"))
  r = subprocess.run([sys.executable, "-c", code, tests_dir], env=env, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads([l for l in r.stdout.splitlines() if l.startswith("REPORT")][0][7:])
  print(json.dumps(out, indent=1))
  return out


def test_chunked_view_parallel_matches_single_device_xla(report):
  vp = report["view_parallel"]
  assert set(vp) == {"plain", "split_mask_bias", "replicated_key_bias"}
  for name, entry in vp.items():
    assert entry["out_spec"][:2] == [None, "view"] and entry["shard_map"], (name, entry)
    errors = {k: v for k, v in entry.items() if k in ("out", "dq", "dk", "dv", "dbias")}
    assert len(errors) == (4 if name == "plain" else 5), entry
    assert max(errors.values()) < TOL, (name, errors)


def test_da3_chunked_equals_xla(report):
  """All DA3 outputs within rtol 1e-4, atol 1e-5 (see :func:`_da3_report`)."""
  da3 = report["da3"]
  assert {"['depth']", "['ray']", "['extrinsics']", "['intrinsics']"} <= set(da3), da3
  assert max(da3.values()) <= 0, da3
