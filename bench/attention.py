"""Attention implementations side by side: ``impl="xla"`` vs ``impl="chunked"`` against length.

For each sequence length ``T``: random ``(B, T, heads, head_dim)`` queries, keys and values
(self-attention, no mask); the jitted forward and the jitted forward + backward (gradients wrt
q, k and v of ``sum(o * g)`` for a fixed random ``g``) of :func:`geojax.nn.attention.attend` are
compiled, their temporaries read from the compiled program (``memory_analysis``, compile only),
then each is run once and timed over ``--reps`` runs (median). A program whose temporaries
exceed ``--max-gib`` is compiled but not run (its time is reported as skipped). The logits
column is the size of one fp32 ``(B, heads, T, T)`` array, for scale.

    python bench/attention.py [--lengths 1024 4096 16384] [--batch 1 --heads 2 --head-dim 64]
        [--dtype float32] [--reps 5] [--max-gib 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

IMPLS = ("xla", "chunked")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=2)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--max-gib", type=float, default=8.0,
                  help="do not run programs whose temporaries exceed this (GiB)")
  args = ap.parse_args()
  if args.reps < 1 or min(args.lengths) < 1:
    ap.error("--reps and --lengths must be positive")

  from geojax.runtime import tune_host_allocator
  tune_host_allocator()

  import jax
  import jax.numpy as jnp

  from geojax.nn import attention

  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  print(f"attention, B={args.batch} heads={args.heads} head_dim={args.head_dim} {dtype.name}; "
        f"chunked blocks {attention.BLOCK_Q} x {attention.BLOCK_K}; jax {jax.__version__} on "
        f"{dev.platform} ({_cpu_model() if dev.platform == 'cpu' else dev.device_kind})")

  def programs(impl):
    fwd = lambda q, k, v: attention.attend(q, k, v, impl=impl)
    loss = lambda q, k, v, g: jnp.sum(fwd(q, k, v).astype(jnp.float32) * g)
    return {"fwd": (jax.jit(fwd), 3), "fwd+bwd": (jax.jit(jax.grad(loss, argnums=(0, 1, 2))), 4)}

  rows = []
  for t in args.lengths:
    shape = (args.batch, t, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(t), 4)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
    g = jax.random.normal(keys[3], shape, jnp.float32)
    logits_mib = args.batch * args.heads * t * t * 4 / 2**20
    for name in ("fwd", "fwd+bwd"):
      row = {"T": t, "pass": name, "logits": logits_mib}
      for impl in IMPLS:
        fn, nargs = programs(impl)[name]
        inputs = (q, k, v, g)[:nargs]
        t0 = time.perf_counter()
        compiled = fn.lower(*inputs).compile()
        compile_s = time.perf_counter() - t0
        temp = compiled.memory_analysis().temp_size_in_bytes
        row[impl + "_mib"] = temp / 2**20
        row[impl + "_compile"] = compile_s
        if temp > args.max_gib * 2**30:
          row[impl + "_ms"] = None
          continue
        jax.block_until_ready(compiled(*inputs))
        times = []
        for _ in range(args.reps):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(*inputs))
          times.append(time.perf_counter() - t0)
        row[impl + "_ms"] = 1e3 * statistics.median(times)
      rows.append(row)
      ms = lambda x: "skipped" if x is None else f"{x:.1f}"
      print(f"  T={t} {name}: " + ", ".join(
          f"{impl} {ms(row[impl + '_ms'])} ms, {row[impl + '_mib']:.1f} MiB temp "
          f"(compile {row[impl + '_compile']:.1f} s)" for impl in IMPLS), flush=True)

  def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"

  print()
  print("| T | pass | xla ms | chunked ms | time chunked/xla | logits MiB | xla temp MiB | "
        "chunked temp MiB | temp chunked/xla |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    ms = lambda x: "skipped" if x is None else f"{x:.1f}"
    print(f"| {r['T']} | {r['pass']} | {ms(r['xla_ms'])} | {ms(r['chunked_ms'])} | "
          f"{ratio(r['chunked_ms'], r['xla_ms'])} | {r['logits']:.0f} | {r['xla_mib']:.1f} | "
          f"{r['chunked_mib']:.1f} | {ratio(r['chunked_mib'], r['xla_mib'])} |")


if __name__ == "__main__":
  main()
