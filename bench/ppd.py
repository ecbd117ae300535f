"""PPD sampling cost against sampling steps and resolution, and the cascade's saving.

For each resolution the jitted :func:`geojax.models.ppd.sample` of a randomly initialised DiT
(batch 1, random semantics standing in for the frozen encoder's tokens, which are not timed) is
compiled for each step count, run once, then timed over ``--reps`` runs (median). Memory is the
compiled program's own temporaries (``memory_analysis``; weights and inputs come on top).

``--cascade`` also times the transformer trunk alone, the way PPD runs it (``depth/2`` blocks
on the 16-pixel grid, then ``depth/2`` on the 8-pixel grid) against a non-cascade DiT of the
same width (all ``depth`` blocks on the 8-pixel grid), one forward each: the saving the paper
attributes to the cascade (SP-DiT + Cas-DiT 0.14 s against 0.20 s per image, about 30 %).

    python bench/ppd.py --preset ppd-tiny --res 256x320,512x640,768x1024 --steps 1,4,10 --cascade
    # one H200 (not run yet; bf16, cuDNN attention; the paper: 0.14 s per 1024 x 768 image at
    # 4 steps, semantics encoder included):
    python bench/ppd.py --preset ppd --dtype bf16 --attn cudnn --res 768x1024 --steps 1,4,10 \\
        --cascade
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _pairs(text: str) -> list[tuple[int, int]]:
  out = []
  for item in text.split(","):
    parts = item.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 and int(p) % 16 == 0
                                  for p in parts):
      raise argparse.ArgumentTypeError(f"--res takes HxW[,HxW...] of multiples of 16; got "
                                       f"{text!r}")
    out.append((int(parts[0]), int(parts[1])))
  return out


def _ints(text: str) -> list[int]:
  try:
    vals = [int(v) for v in text.split(",")]
  except ValueError:
    vals = []
  if not vals or min(vals) < 1:
    raise argparse.ArgumentTypeError(f"--steps takes positive integers N[,N...]; got {text!r}")
  return vals


def _time(fn, args, reps: int) -> tuple[float, float]:
  """(median ms, temporaries MiB) of a jitted ``fn`` after one warm-up run."""
  import jax
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else float("nan")
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), temp


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="ppd-tiny")
  p.add_argument("--res", type=_pairs, default=[(256, 320)], help="HxW[,HxW...]")
  p.add_argument("--steps", type=_ints, default=[1, 4, 10])
  p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--attn", choices=("xla", "cudnn", "chunked"), default="xla")
  p.add_argument("--cascade", action="store_true",
                 help="also time the cascade trunk against a non-cascade DiT of the same width")
  p.add_argument("--reps", type=int, default=3)
  a = p.parse_args()

  from geojax import runtime
  runtime.tune_host_allocator()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from geojax.models import ppd
  from geojax.nn import dit, rope
  from geojax.nn.stack import LayerStack
  from geojax.parallel.sharding import create
  dtype = jnp.bfloat16 if a.dtype == "bf16" else None
  model = ppd.PPD.from_preset(a.preset, rngs=nnx.Rngs(0), attn_impl=a.attn, dtype=dtype)
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  print(f"# {a.preset}, {jax.devices()[0].device_kind}, jax {jax.__version__}, {a.dtype}, "
        f"attn {a.attn}")
  print("| H x W | steps | tokens (16 px / 8 px) | ms / image | ms / step | temp MiB |")
  print("|---|---|---|---|---|---|")
  key = jax.random.split(jax.random.key(0), 3)
  for h, w in a.res:
    image = jax.random.uniform(key[0], (1, h, w, 3))
    sem = jax.random.normal(key[1], (1, (h // 16) * (w // 16), cfg.semantics_dim))
    noise = jax.random.normal(key[2], (1, h, w))
    for steps in a.steps:
      def run(st, im, s, n, steps=steps):
        return ppd.sample(nnx.merge(graphdef, st), im, s, steps=steps, noise=n)
      ms, temp = _time(run, (state, image, sem, noise), a.reps)
      print(f"| {h} x {w} | {steps} | {(h // 16) * (w // 16)} / {(h // 8) * (w // 8)} | "
            f"{ms:.0f} | {ms / steps:.0f} | {temp:.0f} |", flush=True)

  if a.cascade:
    block = lambda r: dit.DiTBlock(cfg.dim, cfg.num_heads, rngs=r, mlp_ratio=cfg.mlp_ratio,
                                   attn_impl=a.attn, dtype=dtype)
    stack = create(lambda r: LayerStack(block, cfg.depth, rngs=r), nnx.Rngs(1))
    sgd, sst = nnx.split(stack)
    half = cfg.depth // 2
    print(f"\n# trunk of {cfg.depth} blocks, width {cfg.dim}: cascade (16 px then 8 px) vs "
          "non-cascade (8 px throughout), one forward")
    print("| H x W | cascade ms | non-cascade ms | saving |")
    print("|---|---|---|---|")
    for h, w in a.res:
      g1, g2 = (h // 16, w // 16), (h // 8, w // 8)
      c = jax.random.normal(key[0], (1, cfg.dim))
      x1 = jax.random.normal(key[1], (1, g1[0] * g1[1], cfg.dim))
      x2 = jax.random.normal(key[2], (1, g2[0] * g2[1], cfg.dim))
      p1, p2 = (jnp.asarray(rope.grid_positions(*g))[None] for g in (g1, g2))

      def cascade(st, x, cond):
        s = nnx.merge(sgd, st)
        x = s.run(x, lambda z, b: b(z, cond, p1), 0, half)
        x = jnp.repeat(x, 4, axis=1)  # stands in for fusion + the 2 x 2 split (not timed apart)
        return s.run(x, lambda z, b: b(z, cond, p2), half, cfg.depth)

      def flat(st, x, cond):
        return nnx.merge(sgd, st).run(x, lambda z, b: b(z, cond, p2), 0, cfg.depth)

      ms_c, _ = _time(cascade, (sst, x1, c), a.reps)
      ms_f, _ = _time(flat, (sst, x2, c), a.reps)
      print(f"| {h} x {w} | {ms_c:.0f} | {ms_f:.0f} | {100 * (1 - ms_c / ms_f):.0f} % |",
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
