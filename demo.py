"""`make demo`: run DA3 end to end on a built-in synthetic scene and save what it predicts.

No checkpoint is downloaded (this machine may be offline): the model is a randomly initialised
``da3-small`` unless ``--weights DIR`` points at an official checkpoint directory. The scene is
rendered procedurally (a textured box room seen from a few cameras), so the demo needs no data.
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

from geojax.models.da3 import DA3
from geojax.models.runner import jit_forward

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def synthetic_views(n: int = 3, h: int = 280, w: int = 504, seed: int = 0) -> np.ndarray:
  """Ray-cast a checkered box room from ``n`` cameras; returns uint8 ``(n, h, w, 3)``."""
  rng = np.random.default_rng(seed)
  out = []
  f = 0.8 * w
  v, u = np.mgrid[0:h, 0:w].astype(np.float32)
  dirs = np.stack([(u - w / 2) / f, (v - h / 2) / f, np.ones_like(u)], -1)
  palette = rng.uniform(0.2, 0.9, (6, 3)).astype(np.float32)
  for i in range(n):
    yaw = -0.3 + 0.3 * i
    rot = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]],
                   np.float32)
    d = dirs @ rot.T
    origin = np.array([0.4 * i - 0.4, 0.0, -1.0], np.float32)
    t_best = np.full((h, w), np.inf, np.float32)
    color = np.zeros((h, w, 3), np.float32)
    for axis in range(3):
      for k, wall in enumerate((-2.0, 2.0)):
        with np.errstate(divide="ignore", invalid="ignore"):
          t = (wall - origin[axis]) / d[..., axis]
        hit = origin + t[..., None] * d
        ok = (t > 0) & (t < t_best)
        check = (np.floor(hit[..., (axis + 1) % 3] * 2) + np.floor(hit[..., (axis + 2) % 3] * 2)) % 2
        shade = palette[2 * axis + k] * (0.6 + 0.4 * check[..., None])
        color = np.where(ok[..., None], shade, color)
        t_best = np.where(ok, t, t_best)
    out.append((np.clip(color, 0, 1) * 255).astype(np.uint8))
  return np.stack(out)


def colorize(depth: np.ndarray) -> np.ndarray:
  lo, hi = np.percentile(depth, 2), np.percentile(depth, 98)
  x = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
  return (np.stack([x, 1 - np.abs(2 * x - 1), 1 - x], -1) * 255).astype(np.uint8)


def new_run_dir(root: str) -> str:
  os.makedirs(root, exist_ok=True)
  i = 0
  while os.path.exists(os.path.join(root, f"demo-{i:03d}")):
    i += 1
  path = os.path.join(root, f"demo-{i:03d}")
  os.makedirs(path)
  return path


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--preset", default="da3-small")
  ap.add_argument("--weights", default=None, help="official DA3 checkpoint dir or .safetensors")
  ap.add_argument("--views", type=int, default=3)
  ap.add_argument("--out", default="outputs")
  args = ap.parse_args()

  images = synthetic_views(args.views)
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
    Image.fromarray(np.concatenate([images[i], colorize(depth)], 1)).save(
        os.path.join(run, f"view{i}_depth.png"))
  print(f"wrote {run}/predictions.npz and {args.views} pictures (input | depth)")


if __name__ == "__main__":
  main()
