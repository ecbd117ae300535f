"""`make demo` / `make demo-<family>`: train a small model on the built-in synthetic scenes,
evaluate it, save what it sees.

1. Trains the family's demo config (``configs/<family>.py:runlocal`` by default; for DA3 a
   ``da3-tiny`` at 84x126, 3 views) on procedurally rendered scenes (``geojax.data.synthetic``)
   on the CPU; the run directory is ``runs/demo`` for ``make demo`` (DA3) and
   ``runs/demo-<family>`` for ``make demo-<family>``.
2. Evaluates on held-out synthetic scenes before and after training (the metric groups of the
   family's config, e.g. depth AbsRel and delta1 after per-view median alignment, pose
   AUC@3/30): ``<workdir>/eval/step_*/`` holds results.json, scenes.csv and pictures
   (image | GT depth | predicted depth | error).
3. Writes the trained model's predictions for the held-out scenes as ``.npz`` and depth PNGs
   under ``<workdir>/predictions/``, and the summary ``<workdir>/summary.json``
   (``{"before": {...}, "after": {...}, "steps": ..., "seconds": ...}``; a refiner such as URGT
   also has ``"prior"``, its coarse input scored on the same images).

An interrupted demo resumes where it stopped. A finished one is never overwritten: the demo
prints its summary again unless ``--overwrite`` (``make demo DEMO_ARGS=--overwrite``) asks to
train from scratch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def print_summary(summary: dict, path: str, family: str, rows) -> None:
  print(f"\n{family} demo: {summary['steps']} training steps in {summary['seconds']:.0f} s")
  prior = summary.get("prior")  # a refiner's coarse input (URGT)
  print(f"{'held-out synthetic scenes':34s}" + (f" {'prior':>10s}" if prior else "")
        + f" {'untrained':>10s} {'trained':>10s}")
  for label, key in rows:
    b, a = summary["before"].get(key), summary["after"].get(key)
    if b is not None and a is not None:
      p = f" {prior[key]:10.4f}" if prior and key in prior else (" " * 11 if prior else "")
      print(f"{label:34s}{p} {b:10.4f} {a:10.4f}")
  print(f"summary: {path}")


def load_config(family: str, arg: str):
  """``configs/<family>.py``'s ``get_config(arg)``."""
  path = os.path.join(ROOT, "configs", f"{family}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"family {family!r} has no training config {path}")
  spec = importlib.util.spec_from_file_location(f"configs_{family}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def write_predictions(workdir: str, config) -> str:
  """Predictions of the trained model (``workdir/model``) for the held-out scenes."""
  import numpy as np

  from geojax.data.synthetic import render_scene
  from geojax.io import visualize
  from geojax.models import registry
  model, family, _ = registry.load_checkpoint(os.path.join(workdir, "model"))
  e = config.eval
  opts = {k: e[k] if k in e else v for k, v in family.eval_options.items()}
  if "process_res" in opts:  # the eval scenes' own size
    opts["process_res"] = max(e.height, e.width)
  predict = family.get_predictor(model, opts)
  extra = lambda scene: family.eval_inputs(scene, opts) if family.eval_inputs else {}
  out = os.path.join(workdir, "predictions")
  os.makedirs(out, exist_ok=True)
  for i in range(e.num_scenes):
    scene = render_scene(e.seed, i, num_views=e.num_views, height=e.height, width=e.width,
                         dynamic=bool(e.get("dynamic", False)))
    pred = predict(scene["images"], **extra(scene))
    arrays = {k: v for k, v in pred.items() if isinstance(v, np.ndarray)}
    if isinstance(pred.get("prior"), dict):  # a refiner's coarse input, next to its output
      arrays.update({f"prior_{k}": v for k, v in pred["prior"].items()})
    np.savez(os.path.join(out, f"scene_{i:04d}.npz"), images=scene["images"], **arrays)
    tiles = [np.concatenate([im, visualize.colorize_depth(d)], 1)
             for im, d in zip(scene["images"], pred["depth"])]
    visualize.save_png(os.path.join(out, f"scene_{i:04d}.png"), np.concatenate(tiles, 0),
                       overwrite=True)
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--family", default="da3", help="model family (default da3)")
  ap.add_argument("--workdir", default=None,
                  help="run directory (default runs/demo-<family>; make demo uses runs/demo)")
  ap.add_argument("--summary", default=None, help="summary JSON (default WORKDIR/summary.json)")
  ap.add_argument("--steps", type=int, default=None, help="training steps (default: runlocal's)")
  ap.add_argument("--overwrite", action="store_true", help="delete the demo run (finished or not) and train afresh")
  args = ap.parse_args()

  from absl import logging
  logging.set_verbosity(logging.WARNING)
  sys.path.insert(0, ROOT)
  from geojax.models import registry
  from geojax.runtime import enable_compilation_cache, tune_host_allocator
  from geojax.train import trainer

  try:
    family = registry.get_family(args.family)
  except ValueError as e:
    print(f"demo.py: error: {e}", file=sys.stderr)
    return 2
  if family.demo is None:
    print(f"demo.py: error: family {family.name!r} has no demo", file=sys.stderr)
    return 2
  workdir = args.workdir or os.path.join("runs", f"demo-{family.name}")
  config = load_config(family.name, family.demo.config_arg)
  if args.steps:
    config.total_steps = args.steps
  summary_path = os.path.abspath(args.summary or os.path.join(workdir, "summary.json"))
  config.summary_path = summary_path
  if args.overwrite:  # a fresh run: also drops the checkpoints of an older demo config
    shutil.rmtree(workdir, ignore_errors=True)
    if os.path.exists(summary_path):  # a --summary outside the workdir
      os.remove(summary_path)
  elif os.path.exists(summary_path):
    with open(summary_path) as f:
      previous = json.load(f)
    if previous.get("steps") == config.total_steps and not previous.get("preempted"):
      print(f"{workdir} already holds a finished demo run; pass --overwrite "
            f"(make demo-{family.name} DEMO_ARGS=--overwrite) to train again.")
      print_summary(previous, summary_path, family.name, family.demo.rows)
      return 0

  tune_host_allocator()
  enable_compilation_cache()
  summary = trainer.train(config, workdir)
  if summary["preempted"]:
    print("stopped early; run the demo again to resume")
    return 0
  pred_dir = write_predictions(workdir, config)
  print(f"predictions of the trained model: {pred_dir}/ (.npz + depth PNGs); evaluation "
        f"pictures: {os.path.join(workdir, 'eval')}/step_*/pictures/")
  print_summary(summary, summary_path, family.name, family.demo.rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
