"""DA3 training-step speed: geojax's jitted train step next to the official network's
forward + backward + AdamW step in PyTorch, same weights, in one process.

The official package ships no training code, so the PyTorch side is timed with a stand-in
objective (L1 on depth and rays against the same targets) and ``torch.optim.AdamW``; geojax runs
its full DA3 objective (depth, ray, point, camera and gradient terms). The ratio therefore
slightly favours the reference. Prints median step time, examples (views) per second, peak
memory and, on a GPU, model FLOPs utilisation (XLA's FLOP count of the compiled step / step time
/ the device's peak bf16 dense FLOP/s).

    python bench/train_step.py                      # CPU: da3-small, batch 1 x 2 views, 280x504
    python bench/train_step.py --gpu                # H200: da3-large, bf16 + cuDNN, 504x336
    python bench/train_step.py --preset da3-tiny --hw 112 168 --views 3 --batch 2 --no-reference
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, per device


def _batch(b, s, h, w, seed=0):
  from geojax.data.synthetic import render_scene
  scenes = [render_scene(seed, i, num_views=s, height=h, width=w) for i in range(b)]
  return {k: np.stack([sc[k] for sc in scenes])
          for k in ("images", "depth", "valid", "intrinsics", "extrinsics")}


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default=None)
  ap.add_argument("--views", type=int, default=None)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--hw", type=int, nargs=2, default=None)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--remat", default="none")
  ap.add_argument("--gpu", action="store_true", help="bf16 + cuDNN attention on CUDA")
  ap.add_argument("--no-reference", dest="reference", action="store_false")
  args = ap.parse_args()
  gpu_defaults = ("da3-large", 8, 4, (504, 336))
  cpu_defaults = ("da3-small", 2, 1, (280, 504))
  d = gpu_defaults if args.gpu else cpu_defaults
  from geojax.runtime import tune_host_allocator
  tune_host_allocator()  # both frameworks in this process get the same host allocator
  preset = args.preset or d[0]
  views, batch_size, hw = args.views or d[1], args.batch or d[2], tuple(args.hw or d[3])

  from flax import nnx
  import ml_collections
  from geojax.models import registry
  from geojax.models.da3 import OFFICIAL_PRESETS
  from geojax.train import default_optim_config, make_optimizer
  from geojax.train.step import init_state, make_train_step
  from geojax.train.tasks import normalize_images

  family = registry.family_for_preset(preset)  # model and task come from the registry

  overrides = dict(remat=args.remat)
  if args.gpu:
    overrides.update(dtype=jnp.bfloat16, attn_impl="cudnn")
  batch = _batch(batch_size, views, *hw)
  reference = args.reference and preset in OFFICIAL_PRESETS
  if args.reference and not reference:
    print(f"{preset} has no official counterpart; timing geojax only")

  torch_step = None
  if reference:
    import torch
    import da3_official as off
    from geojax.convert import da3 as conv
    dev = "cuda" if args.gpu else "cpu"
    net = off.build(preset).to(dev)
    # Same starting weights on both sides.
    sd = {k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()}
    model = conv.from_torch_state_dict(sd, preset, **overrides)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)
    x = np.asarray(normalize_images(batch["images"]))
    xt = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy()).to(dev)
    dt = torch.from_numpy(batch["depth"]).to(dev)

    def torch_step():
      opt.zero_grad(set_to_none=True)
      if args.gpu:
        with torch.autocast("cuda", dtype=torch.bfloat16):
          out = net(xt)
      else:
        out = net(xt)
      # L1 on depth plus the mean magnitude of every other tensor output (confidences,
      # cameras; the official forward drops the ray map after solving poses from it).
      loss = (out["depth"].float() - dt).abs().mean()
      for k, v in out.items():
        if k != "depth" and isinstance(v, torch.Tensor) and v.is_floating_point():
          loss = loss + v.float().abs().mean()
      loss.backward()
      opt.step()
      if args.gpu:
        torch.cuda.synchronize()
  else:
    model = family.build({"preset": preset, "overrides": overrides}, nnx.Rngs(0))

  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  oc = default_optim_config()
  oc.total_steps, oc.warmup_steps = 1000, 10
  tx = make_optimizer(oc)
  graphdef, state = init_state(model, tx)
  jbatch = jax.device_put(batch)
  key = jax.random.key(0)
  device = jax.devices()[0]
  print(f"{preset} ({n_params / 1e6:.1f}M params) batch {batch_size} x {views} views at "
        f"{hw[0]}x{hw[1]}, {'bf16 cudnn' if args.gpu else 'fp32'}, remat {args.remat}; "
        f"jax {jax.__version__} on {device.device_kind}")

  t0 = time.perf_counter()
  task = family.make_task(ml_collections.ConfigDict(dict(total_steps=1000)))
  step = make_train_step(graphdef, tx, task.loss_fn).lower(state, jbatch, key).compile()
  compile_s = time.perf_counter() - t0
  flops = (step.cost_analysis() or {}).get("flops", float("nan"))
  state, m = step(state, jbatch, key)  # warm-up
  jax.block_until_ready(m)
  if torch_step is not None:
    torch_step()

  tj, tt = [], []
  for i in range(args.reps):
    t0 = time.perf_counter()
    state, m = step(state, jbatch, jax.random.fold_in(key, i))
    jax.block_until_ready(m)
    tj.append(time.perf_counter() - t0)
    if torch_step is not None:
      t0 = time.perf_counter()
      torch_step()
      tt.append(time.perf_counter() - t0)
  mj = statistics.median(tj)
  examples = batch_size * views
  line = (f"geojax step {1e3 * mj:.0f} ms, {examples / mj:.2f} views/s "
          f"(compile {compile_s:.0f}s, loss {float(m['loss']):.3f})")
  if tt:
    mt = statistics.median(tt)
    line += f"; official fwd+bwd+AdamW {1e3 * mt:.0f} ms; ratio geojax/official {mj / mt:.2f}"
  print(line)
  if device.platform == "gpu":
    stats = device.memory_stats() or {}
    peak = next((v for k, v in PEAK_BF16.items() if k in device.device_kind), None)
    mfu = flops / mj / peak if peak else float("nan")
    print(f"peak device memory {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB; "
          f"{flops / 1e12:.2f} TFLOP per step; MFU {100 * mfu:.1f}% of {device.device_kind} "
          f"bf16 peak")
  else:
    print(f"peak host memory (RSS, whole process) {_peak_rss_gib():.2f} GiB; "
          f"{flops / 1e9:.1f} GFLOP per step (XLA count) = {flops / mj / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
