"""DAGE (and geojax Pi3 at the same input) inference cost against frames and HR resolution.

For each setting the jitted forward of a randomly initialised model (batch 1, RGB in [0, 1]) is
compiled, run once, then timed over ``--reps`` runs (median). Memory is the compiled program's
own temporaries (``memory_analysis``; the weights and the input come on top), which is what the
program needs on CPU.

The paper's claim: the HR stream sees each frame alone, so cost grows linearly in frames and in
HR pixels, while the LR stream (all frames at once, fixed small resolution) carries the
cross-frame attention. Pi3 (``--pi3-preset``) runs everything at the HR resolution with all
frames attending to each other, so its global attention grows with (frames x pixels)^2.

    python bench/dage.py --preset dage-tiny --pi3-preset pi3-tiny --frames 2,4,8,16 --res 140x252
    python bench/dage.py --preset dage-tiny --pi3-preset pi3-tiny --frames 4 \
        --res 140x252,280x504,560x1008
    # one H200 (not run yet; bf16, cuDNN attention, HR stream 8 frames at a time):
    python bench/dage.py --preset dage --dtype bf16 --attn cudnn --chunk 8 \\
        --frames 100 --res 540x960,1080x1920 --hr-num-tokens 3600 --lr-max-size 252
    python bench/dage.py --preset dage --dtype bf16 --attn cudnn --chunk 8 \\
        --frames 1000 --res 540x960,1080x1920 --hr-num-tokens 3600 --lr-max-size 252
    python bench/dage.py --preset dage --pi3-preset pi3 --dtype bf16 --attn cudnn --chunk 8 \\
        --frames 100 --res 532x952 --hr-num-tokens 3600 --lr-max-size 252
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _ints(text: str) -> list[int]:
  v = [int(x) for x in text.split(",") if x.strip()]
  if not v or min(v) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return v


def _res(text: str) -> list[tuple[int, int]]:
  out = []
  for item in text.split(","):
    parts = item.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
      raise argparse.ArgumentTypeError(f"--res takes HxW[,HxW...]; got {text!r}")
    out.append((int(parts[0]), int(parts[1])))
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="dage-tiny")
  p.add_argument("--pi3-preset", default="",
                 help="also time this geojax Pi3 preset on the same frames (sides floored to "
                      "multiples of 14)")
  p.add_argument("--frames", type=_ints, default=[2, 4, 8])
  p.add_argument("--res", type=_res, default=[(280, 504)])
  p.add_argument("--lr-max-size", type=int, default=252)
  p.add_argument("--hr-num-tokens", type=int, default=0,
                 help="HR token budget (0: the resolution's own grid, (H/14)*(W/14))")
  p.add_argument("--chunk", type=int, default=0, help="HR frames per chunk (0 = all)")
  p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--attn", choices=("xla", "cudnn", "chunked"), default="xla")
  p.add_argument("--reps", type=int, default=3)
  a = p.parse_args()

  from geojax import runtime
  runtime.tune_host_allocator()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from geojax.models import dage, pi3
  dtype = jnp.bfloat16 if a.dtype == "bf16" else None
  rt = dict(rngs=nnx.Rngs(0), attn_impl=a.attn, dtype=dtype)
  models = [("DAGE", dage.DAGE.from_preset(a.preset, **rt))]
  if a.pi3_preset:
    models.append(("Pi3", pi3.Pi3.from_preset(a.pi3_preset, **rt)))
  print(f"# {a.preset}{' vs ' + a.pi3_preset if a.pi3_preset else ''}, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {a.dtype}, attn {a.attn}, "
        f"lr_max_size {a.lr_max_size}, chunk {a.chunk or 'all'}")
  print("| model | frames | H x W | HR grid | LR grid | ms / forward | ms / frame | temp MiB | "
        "temp MiB / frame |")
  print("|---|---|---|---|---|---|---|---|---|")
  for (h, w) in a.res:
    tokens = a.hr_num_tokens or (h // 14) * (w // 14)
    for n in a.frames:
      for name, model in models:
        graphdef, state = nnx.split(model)
        if name == "DAGE":
          x = jax.random.uniform(jax.random.key(0), (1, n, h, w, 3))
          fn = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s)(
              v, lr_max_size=a.lr_max_size, hr_num_tokens=tokens, chunk=a.chunk or None))
          lh, lw = dage.lr_size(h, w, a.lr_max_size)
          hr = dage.hr_grid(h, w, tokens)
          grids = f"{hr[0]}x{hr[1]} | {lh // 14}x{lw // 14}"
        else:
          x = jax.random.uniform(jax.random.key(0), (1, n, h // 14 * 14, w // 14 * 14, 3))
          fn = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s)(v))
          grids = f"{h // 14}x{w // 14} | -"
        exe = fn.lower(state, x).compile()
        temp = exe.memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready(exe(state, x))
        times = []
        for _ in range(a.reps):
          t0 = time.perf_counter()
          jax.block_until_ready(exe(state, x))
          times.append(1e3 * (time.perf_counter() - t0))
        ms = statistics.median(times)
        print(f"| {name} | {n} | {h}x{w} | {grids} | {ms:.0f} | {ms / n:.1f} | {temp:.1f} | "
              f"{temp / n:.2f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
