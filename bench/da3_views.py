"""DA3 inference against the number of views: time per forward and memory, one device or several.

For each view count the jitted forward (``images -> outputs``, random weights, batch 1) is
compiled, run once, then timed over ``--reps`` runs (median). Memory:

* GPU: ``peak_bytes_in_use`` of the device allocator (largest over the devices used). The peak
  cannot be reset inside a process, so every view count runs in a fresh subprocess of this
  script (``--worker``); the parent only collects one JSON line per count.
* CPU: the compiled program's own figures (``memory_analysis``: temporaries + arguments +
  outputs, per device), which is what the program needs; host allocators report no peak.

The ``temp MiB`` column is the compiled temporaries alone (activations and one layer's weights
at a time). ``compile s`` is a real compile:
the persistent compilation cache serves only the model's creation.

With ``--view-devices n > 1`` the forward runs view-parallel under
``jax.set_mesh(make_view_mesh(n))`` with the images split over the views (on CPU the worker
forces ``n`` host devices); memory is then per device. View counts that ``n`` does not divide
run replicated (every device computes every view) and are marked so.

The sweep stops at the first count that runs out of memory (XLA ``RESOURCE_EXHAUSTED``, or a
worker killed by the operating system) and reports the largest count that fitted.

    python bench/da3_views.py --preset da3-tiny --res 140x210 --views 2,4,8,16,32
    python bench/da3_views.py --preset da3-tiny --res 140x210 --views 8,16,32 --view-devices 8
    python bench/da3_views.py --preset da3-large --res 504x336 --dtype bf16 --attn cudnn \\
        --views 8,16,32,64,128,256 --head-chunk 8          # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")
OUTPUTS = ("depth", "depth_conf", "ray", "ray_conf", "extrinsics", "intrinsics", "sky")


def _parse_res(text: str) -> tuple[int, int]:
  parts = text.lower().replace(",", "x").split("x")
  if len(parts) != 2:
    raise argparse.ArgumentTypeError(f"--res must be HxW (e.g. 140x210); got {text!r}")
  h, w = int(parts[0]), int(parts[1])
  if h % 14 or w % 14:
    raise argparse.ArgumentTypeError(f"--res {h}x{w}: height and width must be multiples of 14")
  return h, w


def _parse_views(text: str) -> list[int]:
  views = [int(v) for v in text.split(",") if v.strip()]
  if not views or min(views) < 1:
    raise argparse.ArgumentTypeError(f"--views must be positive integers; got {text!r}")
  return views


def _args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="da3-small")
  ap.add_argument("--res", type=_parse_res, default=(140, 210), help="HxW, multiples of 14")
  ap.add_argument("--views", type=_parse_views, default=[2, 4, 8, 16, 32],
                  help="comma-separated view counts, e.g. 2,4,8,16,32")
  ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                  help="backbone compute dtype (heads and cameras stay fp32)")
  ap.add_argument("--attn", choices=("xla", "cudnn", "chunked"), default="xla")
  ap.add_argument("--head-chunk", type=int, default=0, help="DA3Config.head_chunk (0 = off)")
  ap.add_argument("--view-devices", type=int, default=1,
                  help="devices on the 'view' mesh axis (1 = a single device, no mesh)")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--timeout", type=float, default=3600, help="seconds per view count")
  ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def _is_oom(text: str) -> bool:
  return any(m in text for m in OOM_MARKERS)


def _worker(args: argparse.Namespace) -> dict:
  """One view count, in this process; returns the JSON-able measurement."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.experimental.compilation_cache import compilation_cache
  from jax.sharding import NamedSharding, PartitionSpec as P

  from geojax.models import registry
  from geojax.parallel.sharding import make_view_mesh
  from geojax.runtime import enable_compilation_cache, tune_host_allocator

  tune_host_allocator()
  enable_compilation_cache()  # model creation compiles once for the whole sweep
  s, (h, w) = args.worker, args.res
  dtype = jnp.bfloat16 if args.dtype == "bf16" else None
  model = registry.family_for_preset(args.preset).build(
      {"preset": args.preset,
       "overrides": dict(dtype=dtype, attn_impl=args.attn, head_chunk=args.head_chunk)},
      nnx.Rngs(0))
  # The forward's compile is timed: no persistent cache from here on (``reset_cache`` makes
  # JAX re-read the switch, which it otherwise checks once per process).
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, x: {k: v for k, v in nnx.merge(graphdef, st)(x).items()
                               if k in OUTPUTS})
  images = jax.random.normal(jax.random.key(0), (1, s, h, w, 3), jnp.float32)
  n = args.view_devices
  devices = jax.devices()[:n]
  result = {"views": s, "backend": jax.default_backend(), "device": devices[0].device_kind,
            "split": n > 1 and s % n == 0}
  try:
    if n > 1:
      mesh = make_view_mesh(n)
      with jax.set_mesh(mesh):
        state = jax.device_put(state, NamedSharding(mesh, P()))
        spec = P(None, "view") if result["split"] else P()
        images = jax.device_put(images, NamedSharding(mesh, spec))
        return _measure(fwd, state, images, devices, args.reps, result)
    return _measure(fwd, state, images, devices, args.reps, result)
  except Exception as e:  # noqa: BLE001 - an OOM is a result, anything else is re-raised
    if _is_oom(str(e)):
      return dict(result, oom=True, error=str(e).splitlines()[0][:300])
    raise


def _measure(fwd, state, images, devices, reps: int, result: dict) -> dict:
  import jax

  t0 = time.perf_counter()
  compiled = fwd.lower(state, images).compile()
  result["compile_s"] = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  compiled_bytes = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                    - ma.alias_size_in_bytes)
  result.update(temp_bytes=ma.temp_size_in_bytes, compiled_bytes=compiled_bytes)
  jax.block_until_ready(compiled(state, images))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, images))
    times.append(time.perf_counter() - t0)
  result["ms"] = 1e3 * statistics.median(times)
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  if all(p is not None for p in peaks):
    result.update(mem_bytes=max(peaks), mem_kind="peak")
  else:
    result.update(mem_bytes=compiled_bytes, mem_kind="compiled")
  return result


def _run_count(args: argparse.Namespace, s: int) -> dict:
  """Runs one view count in a fresh interpreter (a clean allocator peak, OOM-safe)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(s), "--preset", args.preset,
         "--res", f"{args.res[0]}x{args.res[1]}", "--dtype", args.dtype, "--attn", args.attn,
         "--head-chunk", str(args.head_chunk), "--view-devices", str(args.view_devices),
         "--reps", str(args.reps)]
  env = dict(os.environ)
  if args.view_devices > 1:  # only affects the CPU platform
    flag = f"--xla_force_host_platform_device_count={args.view_devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
  try:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return {"views": s, "error": f"timed out after {args.timeout:.0f} s"}
  lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
  if r.returncode == 0 and lines:
    return json.loads(lines[-1][7:])
  if r.returncode == -9 or _is_oom(r.stderr):  # SIGKILL (the OOM killer) or an XLA OOM
    return {"views": s, "oom": True, "error": (r.stderr.strip().splitlines() or ["killed"])[-1]}
  return {"views": s, "error": r.stderr[-3000:]}


def _row(r: dict) -> str:
  s, mib = r["views"], r["mem_bytes"] / 2**20
  note = "  (replicated: views not divisible)" if r["devices"] > 1 and not r["split"] else ""
  temp = r["temp_bytes"] / 2**20
  return (f"{s:>6} {r['ms']:>12.1f} {1e3 * s / r['ms']:>9.2f} {mib:>13.1f} {mib / s:>10.2f} "
          f"{temp:>10.1f} {r['compile_s']:>10.1f}{note}")


def main():
  args = _args()
  if args.worker is not None:
    print("RESULT " + json.dumps(_worker(args)), flush=True)
    return
  if args.view_devices < 1 or args.head_chunk < 0 or args.reps < 1:
    sys.exit("--view-devices and --reps must be >= 1 and --head-chunk >= 0")
  print(f"{args.preset} {args.res[0]}x{args.res[1]} {args.dtype} attn={args.attn} "
        f"head_chunk={args.head_chunk} view_devices={args.view_devices} reps={args.reps}",
        flush=True)
  header = (f"{'views':>6} {'ms/forward':>12} {'views/s':>9} {'memory MiB':>13} "
            f"{'MiB/view':>10} {'temp MiB':>10} {'compile s':>10}")
  fitted, shown = None, False
  for s in args.views:
    r = _run_count(args, s)
    if not shown and "ms" in r:
      print(f"backend {r['backend']} ({r['device']}); memory = "
            + ("allocator peak" if r["mem_kind"] == "peak" else
               "compiled temp + arguments + outputs") + (" per device" if args.view_devices > 1
                                                         else ""))
      print(header)
      shown = True
    if r.get("oom"):
      print(f"{s:>6}  out of memory: {r.get('error', '')[:200]}")
      break
    if "error" in r:
      print(f"{s:>6}  failed: {r['error']}")
      break
    r["devices"] = args.view_devices
    print(_row(r), flush=True)
    fitted = s
  print(f"largest view count that fitted: {fitted}" if fitted is not None
        else "no view count fitted")


if __name__ == "__main__":
  main()
