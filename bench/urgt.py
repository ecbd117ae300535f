"""URGT refinement cost against image resolution (and crop size and split).

For each setting the jitted :func:`geojax.models.urgt.refine` of a randomly initialised model
(batch 1: RGB, depth and normal priors at full resolution) is compiled, run once, then timed over
``--reps`` runs (median). Memory is the compiled program's own temporaries (``memory_analysis``;
weights and inputs come on top).

The cost is set by the crop count and the crop size, not by the pixels: the image is cut into
an ``n_h x n_w`` split (30 % overlap by default: 11 x 11 = 121 crops for 8 x 8), every crop is
resized to ``--crop-size``, and the global blocks attend over all crops' tokens at once
(``121 x 1374 = 166K`` tokens at the released 518). Only cropping, resizing the outputs back and
stitching grow with the pixels.

    python bench/urgt.py --preset urgt-tiny --attn chunked --res 1080x1920,2160x3840,4320x7680
    python bench/urgt.py --preset urgt-tiny --attn chunked --res 2160x3840 --crop-size 140 \\
        --split 4x4,8x8
    # one H200 (not run yet; bf16, cuDNN attention; the paper: 0.97 s per 4K image):
    python bench/urgt.py --preset urgt --dtype bf16 --attn cudnn --head-chunk 8 \\
        --res 2160x3840,4320x7680 --crop-size 518 --split 8x8
    python bench/urgt.py --preset urgt --dtype bf16 --attn cudnn --head-chunk 8 \\
        --res 2160x3840 --crop-size 518 --split 8x8 --grid
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _pairs(text: str, what: str) -> list[tuple[int, int]]:
  out = []
  for item in text.split(","):
    parts = item.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise argparse.ArgumentTypeError(f"{what} takes AxB[,AxB...] of positive integers; got "
                                       f"{text!r}")
    out.append((int(parts[0]), int(parts[1])))
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="urgt-tiny")
  p.add_argument("--res", type=lambda t: _pairs(t, "--res"), default=[(1080, 1920)],
                 help="image sizes HxW[,HxW...]")
  p.add_argument("--split", type=lambda t: _pairs(t, "--split"), default=[(8, 8)],
                 help="patch splits n_hxn_w[,...] (default 8x8)")
  p.add_argument("--grid", action="store_true", help="grid mode (default: 30%% overlap)")
  p.add_argument("--crop-size", type=int, default=70)
  p.add_argument("--head-chunk", type=int, default=0, help="crops per head step (0 = all)")
  p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--attn", choices=("xla", "cudnn", "chunked"), default="chunked")
  p.add_argument("--reps", type=int, default=3)
  a = p.parse_args()

  from geojax import runtime
  runtime.tune_host_allocator()
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from geojax.models import urgt
  dtype = jnp.bfloat16 if a.dtype == "bf16" else None
  model = urgt.URGT.from_preset(a.preset, rngs=nnx.Rngs(0), attn_impl=a.attn, dtype=dtype,
                                head_chunk=a.head_chunk)
  graphdef, state = nnx.split(model)
  print(f"# {a.preset}, {jax.devices()[0].device_kind}, jax {jax.__version__}, {a.dtype}, "
        f"attn {a.attn}, crop {a.crop_size}, {'grid' if a.grid else 'overlap'}, head_chunk "
        f"{a.head_chunk or 'all'}")
  print("| H x W | split | crops | tokens / global layer | ms / image | temp MiB |")
  print("|---|---|---|---|---|---|")
  t = a.crop_size // 14
  for (h, w) in a.res:
    for split in a.split:
      h2, w2 = urgt.aligned_size(h, w, split)
      layout = urgt.crop_layout((h2, w2), split, overlap=not a.grid)
      keys = jax.random.split(jax.random.key(0), 3)
      image = jax.random.uniform(keys[0], (1, h2, w2, 3))
      depth = jax.random.uniform(keys[1], (1, h2, w2))
      normal = jax.random.normal(keys[2], (1, h2, w2, 3))
      rope = "official" if layout.grid[0] == layout.grid[1] else "true"
      fn = jax.jit(lambda st, *x: {k: v for k, v in urgt.refine(
          nnx.merge(graphdef, st), *x, patch_split=split, overlap=not a.grid,
          crop_size=a.crop_size, rope_positions=rope).items() if k != "layout"})
      exe = fn.lower(state, image, depth, normal).compile()
      temp = exe.memory_analysis().temp_size_in_bytes / 2**20
      jax.block_until_ready(exe(state, image, depth, normal))
      times = []
      for _ in range(a.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(exe(state, image, depth, normal))
        times.append(1e3 * (time.perf_counter() - t0))
      s = len(layout.starts)
      print(f"| {h2}x{w2} | {split[0]}x{split[1]} | {s} | {s * (5 + t * t):,} | "
            f"{statistics.median(times):.0f} | {temp:.0f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
