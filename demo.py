"""`make demo`: run DA3 end to end on a built-in synthetic scene and save what it predicts.

No checkpoint is downloaded (this machine may be offline): the model is a randomly initialised
``da3-small`` unless ``--weights DIR`` points at an official checkpoint directory. The scene is
rendered procedurally by ``geojax.data.synthetic`` (a textured room with objects), so the demo needs no data.
It then evaluates the same model with ``evaluate.py`` on two more synthetic scenes with exact
ground truth (metrics table, ``eval/results.json``, ``eval/scenes.csv``, ``eval/pictures/``).
Outputs go to a new folder under ``outputs/`` (existing folders are never overwritten).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from geojax.data.synthetic import render_scene
from geojax.io.visualize import colorize_depth
from geojax.models.da3 import DA3
from geojax.models.registry import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD
from geojax.models.runner import jit_forward

def new_run_dir(root: str) -> str:
  os.makedirs(root, exist_ok=True)
  i = 0
  while os.path.exists(os.path.join(root, f"demo-{i:03d}")):
    i += 1
  path = os.path.join(root, f"demo-{i:03d}")
  os.makedirs(path)
  return path


def main():
  from geojax.runtime import enable_compilation_cache
  enable_compilation_cache()
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--preset", default="da3-small")
  ap.add_argument("--weights", default=None, help="official DA3 checkpoint dir or .safetensors")
  ap.add_argument("--views", type=int, default=3)
  ap.add_argument("--out", default="outputs")
  args = ap.parse_args()

  images = render_scene(0, 0, num_views=args.views, height=280, width=504)["images"]
  x = ((images.astype(np.float32) / 255 - MEAN) / STD)[None]
  t0 = time.perf_counter()
  if args.weights:
    from geojax.convert.da3 import load_official
    model = load_official(args.weights, args.preset)
  else:
    model = DA3.from_preset(args.preset, rngs=nnx.Rngs(0))
  t1 = time.perf_counter()
  fwd = jit_forward(model)
  out = jax.block_until_ready(fwd(jnp.asarray(x)))
  t2 = time.perf_counter()
  out = jax.block_until_ready(fwd(jnp.asarray(x)))
  t3 = time.perf_counter()
  print(f"model {args.preset} ({'official weights' if args.weights else 'random init'}): "
        f"built in {t1 - t0:.1f}s, first call (compile) {t2 - t1:.1f}s, "
        f"second call {1e3 * (t3 - t2):.0f} ms for {args.views} views {images.shape[1]}x{images.shape[2]}")
  for k, v in out.items():
    if hasattr(v, "shape"):
      print(f"  {k:12s} {tuple(v.shape)}")
  run = new_run_dir(args.out)
  np.savez(os.path.join(run, "predictions.npz"),
           **{k: np.asarray(v) for k, v in out.items() if hasattr(v, "shape")})
  for i in range(args.views):
    depth = np.asarray(out["depth"][0, i])
    Image.fromarray(np.concatenate([images[i], colorize_depth(depth)], 1)).save(
        os.path.join(run, f"view{i}_depth.png"))
  print(f"wrote {run}/predictions.npz and {args.views} pictures (input | depth)")

  # Score the same model on a few more synthetic scenes with ground truth (evaluate.py).
  import sys
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import evaluate
  from configs.evaluate import get_config
  cfg = get_config(args.preset)
  cfg.model.weights = args.weights or ""
  cfg.data.num_scenes, cfg.data.num_views = 2, args.views
  cfg.out_dir = os.path.join(run, "eval")
  evaluate.evaluate(cfg)


if __name__ == "__main__":
  main()
