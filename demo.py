"""`make demo`: train a small DA3 on the built-in synthetic scenes, evaluate it, save what it sees.

1. Trains ``configs/da3.py:runlocal`` (a ``da3-tiny`` at 112x168, 3 views) on procedurally
   rendered scenes (``geojax.data.synthetic``) on the CPU; the run directory is ``runs/demo``.
2. Evaluates on held-out synthetic scenes before and after training (depth AbsRel and
   delta1 after per-view median alignment, pose AUC@3/30): ``runs/demo/eval/step_*/``
   holds results.json, scenes.csv and pictures (image | GT depth | predicted depth | error).
3. Writes the trained model's predictions for the held-out scenes as ``.npz`` and depth PNGs
   under ``runs/demo/predictions/``, and the summary ``runs/demo/summary.json``
   (``{"before": {...}, "after": {...}, "steps": ..., "seconds": ...}``).

An interrupted demo resumes where it stopped. A finished one is never overwritten: the demo
prints its summary again unless ``--overwrite`` (``make demo DEMO_ARGS=--overwrite``) asks to
train from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def print_summary(summary: dict, path: str) -> None:
  rows = [("depth AbsRel (lower is better)", "abs_rel"), ("depth delta1 (higher is better)", "delta1"),
          ("pose AUC@30 (higher is better)", "auc30")]
  print(f"\nDA3 demo: {summary['steps']} training steps in {summary['seconds']:.0f} s")
  print(f"{'held-out synthetic scenes':34s} {'untrained':>10s} {'trained':>10s}")
  for label, key in rows:
    b, a = summary["before"].get(key), summary["after"].get(key)
    if b is not None and a is not None:
      print(f"{label:34s} {b:10.4f} {a:10.4f}")
  print(f"summary: {path}")


def write_predictions(workdir: str, config) -> str:
  """Predictions of the trained model (``workdir/model``) for the held-out scenes."""
  import numpy as np

  from geojax.data.synthetic import render_scene
  from geojax.io import visualize
  from geojax.models import registry
  model, family, _ = registry.load_checkpoint(os.path.join(workdir, "model"))
  e = config.eval
  predict = family.predictor(model, dict(process_res=max(e.height, e.width)))
  out = os.path.join(workdir, "predictions")
  os.makedirs(out, exist_ok=True)
  for i in range(e.num_scenes):
    scene = render_scene(e.seed, i, num_views=e.num_views, height=e.height, width=e.width)
    pred = predict(scene["images"])
    np.savez(os.path.join(out, f"scene_{i:04d}.npz"), images=scene["images"], **pred)
    tiles = [np.concatenate([im, visualize.colorize_depth(d)], 1)
             for im, d in zip(scene["images"], pred["depth"])]
    visualize.save_png(os.path.join(out, f"scene_{i:04d}.png"), np.concatenate(tiles, 0),
                       overwrite=True)
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--workdir", default=os.path.join("runs", "demo"))
  ap.add_argument("--summary", default=None, help="summary JSON (default WORKDIR/summary.json)")
  ap.add_argument("--steps", type=int, default=None, help="training steps (default: runlocal's)")
  ap.add_argument("--overwrite", action="store_true", help="delete a finished demo and retrain")
  args = ap.parse_args()

  from absl import logging
  logging.set_verbosity(logging.WARNING)
  sys.path.insert(0, ROOT)
  from configs.da3 import get_config
  from geojax.runtime import enable_compilation_cache, tune_host_allocator
  from geojax.train import trainer

  config = get_config("runlocal")
  if args.steps:
    config.total_steps = args.steps
  summary_path = os.path.abspath(args.summary or os.path.join(args.workdir, "summary.json"))
  config.summary_path = summary_path
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      previous = json.load(f)
    if previous.get("steps") == config.total_steps and not previous.get("preempted"):
      if not args.overwrite:
        print(f"{args.workdir} already holds a finished demo run; pass --overwrite "
              "(make demo DEMO_ARGS=--overwrite) to train again.")
        print_summary(previous, summary_path)
        return 0
      shutil.rmtree(args.workdir, ignore_errors=True)
      if os.path.exists(summary_path):  # a --summary outside the workdir
        os.remove(summary_path)

  tune_host_allocator()
  enable_compilation_cache()
  summary = trainer.train(config, args.workdir)
  if summary["preempted"]:
    print("stopped early; run `make demo` again to resume")
    return 0
  pred_dir = write_predictions(args.workdir, config)
  print(f"predictions of the trained model: {pred_dir}/ (.npz + depth PNGs); evaluation "
        f"pictures: {os.path.join(args.workdir, 'eval')}/step_*/pictures/")
  print_summary(summary, summary_path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
