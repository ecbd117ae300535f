"""Where the DA3 forward's time goes: geojax (XLA) and the official PyTorch network, by op kind.

Same weights and input as ``bench/da3_forward.py``. Both forwards are profiled (XLA's per-thunk
trace events, ``torch.profiler`` for PyTorch), their op time is grouped into kinds (attention,
matmul, convolution, layout copies, weight slices, other), and each kind's share is turned into
milliseconds of the median wall time, so the two columns add up to each framework's forward.
Also prints the page faults of one forward (host memory touched afresh).

    python bench/da3_profile.py [--preset da3-small --views 2 --hw 280 504 --reps 5]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import statistics
import sys
import tempfile
import time

# XLA:CPU emits one trace event per executed thunk only with this flag, read at backend start.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

KINDS = ("attention", "matmul", "convolution", "layout copies", "weight slices", "other")


def _hlo_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> kind, from the compiled module (fusions by what they contain)."""
  comps, kinds, entry = {}, {}, None
  current = None
  for line in hlo_text.splitlines():
    m = re.match(r"^(ENTRY )?%(\S+) ", line)
    if m and line.rstrip().endswith("{"):
      current = m.group(2)
      entry = current if m.group(1) else entry
      comps[current] = []
      continue
    if current is not None:
      comps[current].append(line)
  def body_ops(comp, seen=()):
    ops = []
    for line in comps.get(comp, ()):
      m = re.search(r" = \S+ ([\w-]+)\(", line)
      if m:
        ops.append(m.group(1))
      for c in re.findall(r"calls=%(\S+?)[,\s]", line):
        if c not in seen:
          ops += body_ops(c, seen + (c,))
    return ops
  for comp, lines in comps.items():
    for line in lines:
      m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w-]+)\((.*)", line)
      if not m:
        continue
      name, op = m.group(1), m.group(2)
      called = re.findall(r"calls=%(\S+?)[,\s]", line)
      ops = [op] + [o for c in called for o in body_ops(c)]
      dots = ops.count("dot")
      if dots >= 2 and ("exponential" in ops or "reduce" in ops):
        kind = "attention"
      elif "convolution" in ops:
        kind = "convolution"
      elif dots:
        kind = "matmul"
      elif "transpose" in ops or name.startswith(("transpose", "copy")):
        kind = "layout copies"
      elif ("dynamic-slice" in ops or "slice" in ops) and comp != entry:
        kind = "weight slices"  # per-layer parameters sliced out of the stacks inside scans
      else:
        kind = "other"
      kinds[name] = kind
  return kinds


def profile_geojax(fwd, compiled_text: str, args, reps: int):
  kinds = _hlo_kinds(compiled_text)
  with tempfile.TemporaryDirectory(prefix="geojax-profile-") as d:
    with jax.profiler.trace(d):
      for _ in range(reps):
        jax.block_until_ready(fwd(*args))
    path = next(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
                if f.endswith(".xplane.pb"))
    data = jax.profiler.ProfileData.from_file(path)
  acc = collections.Counter()
  # Thunk events carry the HLO instruction's name, on whichever thread ran them (XLA's workers
  # or the client thread, which runs small thunks inline).
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in kinds:
          acc[kinds[ev.name]] += ev.duration_ns
  return acc


def profile_torch(net, x, reps: int):
  import torch
  from torch.profiler import ProfilerActivity, profile
  with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(reps):
      net(x)
  acc = collections.Counter()
  for e in prof.key_averages():
    n = e.key
    if "scaled_dot_product" in n or "flash_attention" in n:
      kind = "attention"
    elif n in ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"):
      kind = "matmul"
    elif "conv" in n:
      kind = "convolution"
    elif n in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::permute"):
      kind = "layout copies"
    else:
      kind = "other"
    acc[kind] += e.self_cpu_time_total * 1000  # us -> ns
  return acc


def page_faults(fn) -> int:
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  fn()
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="da3-small")
  ap.add_argument("--views", type=int, default=2)
  ap.add_argument("--hw", type=int, nargs=2, default=[280, 504])
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  if args.views < 1 or args.reps < 1 or min(args.hw) < 14 or any(v % 14 for v in args.hw):
    sys.exit("--views and --reps must be >= 1 and --hw two positive multiples of 14")
  from geojax.runtime import tune_host_allocator
  tuned = tune_host_allocator()

  import torch
  import da3_official as off
  from flax import nnx
  from geojax.convert import da3 as conv

  jax.config.update("jax_default_matmul_precision", "highest")
  net = off.build(args.preset)
  sd = {k: v.detach().float().numpy() for k, v in net.state_dict().items()}
  model = conv.from_torch_state_dict(sd, args.preset)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, im: nnx.merge(graphdef, st)(im))
  x = np.random.RandomState(0).randn(1, args.views, *args.hw, 3).astype(np.float32)
  xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy())
  compiled = fwd.lower(state, xj).compile().as_text()

  def run_jax():
    jax.block_until_ready(fwd(state, xj))

  def run_torch():
    with torch.no_grad():
      net(xt)

  for _ in range(2):
    run_jax()
    run_torch()
  tj, tt = [], []
  for _ in range(args.reps):
    t0 = time.perf_counter(); run_jax(); tj.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); run_torch(); tt.append(time.perf_counter() - t0)
  wj, wt = statistics.median(tj) * 1e3, statistics.median(tt) * 1e3
  fj, ft = page_faults(run_jax), page_faults(run_torch)
  pj = profile_geojax(fwd, compiled, (state, xj), args.reps)
  pt = profile_torch(net, xt, args.reps)
  sj, st = sum(pj.values()) or 1, sum(pt.values()) or 1
  print(f"{args.preset}, {args.views} views {args.hw[0]}x{args.hw[1]}, fp32; jax {jax.__version__} "
        f"(host allocator tuned: {tuned}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print(f"{'kind':<15} {'geojax ms':>10} {'official ms':>12} {'ratio':>7}")
  for k in KINDS:
    a, b = wj * pj[k] / sj, wt * pt[k] / st
    ratio = f"{a / b:7.2f}" if b > 0.5 else "      -"
    print(f"{k:<15} {a:10.1f} {b:12.1f} {ratio}")
  print(f"{'forward':<15} {wj:10.1f} {wt:12.1f} {wj / wt:7.2f}")
  print(f"page faults per forward: geojax {fj}, official {ft}")


if __name__ == "__main__":
  main()
