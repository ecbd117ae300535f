"""DA3 forward speed: geojax (jit, warmed up) vs the official PyTorch network, same weights.

Runs both in one process, alternating, and prints medians and the ratio geojax / official.
CPU default: ``da3-small``, 2 views at 280 x 504, fp32. On a GPU pass ``--gpu`` for bf16 with
cuDNN attention (``da3-large`` at 504 x 336 with 8 and 32 views) and peak memory.

    python bench/da3_forward.py [--preset da3-small --views 2 --hw 280 504 --reps 10] [--gpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="da3-small")
  ap.add_argument("--views", type=int, nargs="+", default=[2])
  ap.add_argument("--hw", type=int, nargs=2, default=[280, 504])
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--gpu", action="store_true", help="bf16 + cuDNN attention on CUDA")
  args = ap.parse_args()
  if args.gpu and args.preset == "da3-small":
    args.preset, args.views, args.hw = "da3-large", [8, 32], [504, 336]

  from geojax.runtime import tune_host_allocator
  tune_host_allocator()  # both frameworks in this process get the same host allocator

  import torch
  import da3_official as off
  from geojax.convert import da3 as conv
  from geojax.models.runner import jit_forward

  if not args.gpu:
    jax.config.update("jax_default_matmul_precision", "highest")
  threads = torch.get_num_threads()
  net = off.build(args.preset)
  dev = "cuda" if args.gpu else "cpu"
  net = net.to(dev)
  sd = {k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()}
  overrides = dict(dtype=jnp.bfloat16, attn_impl="cudnn") if args.gpu else {}
  model = conv.from_torch_state_dict(sd, args.preset, **overrides)
  fwd = jit_forward(model)
  print(f"{args.preset} {args.hw[0]}x{args.hw[1]} {'bf16 cudnn' if args.gpu else 'fp32'} "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
        f"({threads} threads)")
  for s in args.views:
    x = np.random.RandomState(0).randn(1, s, *args.hw, 3).astype(np.float32)
    xj = jnp.asarray(x)
    xt = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy()).to(dev)

    def run_jax():
      jax.block_until_ready(fwd(xj))

    def run_torch():
      with torch.no_grad():
        if args.gpu:
          with torch.autocast("cuda", dtype=torch.bfloat16):
            net(xt)
          torch.cuda.synchronize()
        else:
          net(xt)

    t0 = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t0
    run_torch()
    tj, tt = [], []
    for _ in range(args.reps):
      t0 = time.perf_counter(); run_jax(); tj.append(time.perf_counter() - t0)
      t0 = time.perf_counter(); run_torch(); tt.append(time.perf_counter() - t0)
    mj, mt = statistics.median(tj), statistics.median(tt)
    line = (f"S={s}: geojax {1e3 * mj:.1f} ms  official {1e3 * mt:.1f} ms  "
            f"ratio geojax/official {mj / mt:.2f}  (geojax throughput {mt / mj:.2f}x; "
            f"compile {compile_s:.1f}s)")
    if args.gpu:
      stats = jax.devices()[0].memory_stats() or {}
      line += (f"  peak geojax {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB, official "
               f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(line)


if __name__ == "__main__":
  main()
