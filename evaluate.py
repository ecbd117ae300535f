"""Evaluate a geojax model on scenes with ground truth.

    python evaluate.py --config=configs/evaluate.py:da3-small \
        --config.data.num_scenes=4 --config.out_dir=outputs/eval

Loads a model (a geojax checkpoint with ``--config.model.checkpoint``, official weights with
``--config.model.weights``, or a random initialisation), runs it over the scenes (the built-in
synthetic scenes by default), prints a table of every applicable metric and writes
``results.json``, ``scenes.csv`` and ``pictures/<scene>.png`` under ``out_dir``. See
``configs/evaluate.py`` for every option.
"""

from __future__ import annotations

import os
import sys

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "evaluate.py"),
    "Evaluation config file (configs/evaluate.py[:preset]).", lock_config=True)


def load_model(cfg):
  """``(model, family, model_config)`` from the config's checkpoint / weights / random init."""
  from flax import nnx

  from geojax.io import checkpoint
  from geojax.models import registry
  family = registry.get_family(cfg.model.family)
  model_config = {"preset": cfg.model.preset}
  if cfg.model.checkpoint and cfg.model.weights:
    raise ValueError("model: set either model.checkpoint or model.weights, not both")
  if cfg.model.checkpoint:
    info = checkpoint.read_model_info(cfg.model.checkpoint)
    if info["family"] != family.name:
      raise ValueError(f"model.checkpoint {cfg.model.checkpoint} holds a {info['family']!r} "
                       f"model, but model.family is {family.name!r}")
    model_config = info["config"]
    abstract = nnx.eval_shape(lambda: family.build(model_config, nnx.Rngs(0)))
    model = checkpoint.restore_state(cfg.model.checkpoint, abstract)
    source = f"checkpoint {os.path.abspath(cfg.model.checkpoint)}"
  elif cfg.model.weights:
    if not os.path.exists(cfg.model.weights):
      raise FileNotFoundError(f"model.weights {cfg.model.weights} does not exist")
    model = family.load_official(cfg.model.weights, model_config)
    source = f"official weights {os.path.abspath(cfg.model.weights)}"
  else:
    model = family.build(model_config, nnx.Rngs(cfg.model.seed))
    source = f"random initialisation (seed {cfg.model.seed}); scores are a smoke test only"
    logging.warning("no checkpoint or weights given: evaluating a randomly initialised model")
  return model, family, model_config, source


def synthetic_scenes(data):
  from geojax.data.synthetic import render_scene
  for i in range(data.num_scenes):
    yield f"scene_{i:04d}", render_scene(data.seed, i, num_views=data.num_views,
                                         height=data.height, width=data.width)


def evaluate(cfg) -> dict:
  from tqdm import tqdm

  from geojax.eval import evaluator
  if cfg.data.source != "synthetic":
    raise ValueError(f"data.source {cfg.data.source!r} is not supported; available: 'synthetic'")
  if cfg.data.num_scenes < 1:
    raise ValueError(f"data.num_scenes must be >= 1; got {cfg.data.num_scenes}")
  options = dict(depth_align=cfg.depth_align, pose_thresholds=tuple(cfg.pose_thresholds),
                 pointcloud_threshold=cfg.pointcloud_threshold,
                 pointcloud_max_points=cfg.pointcloud_max_points, max_depth=cfg.data.max_depth)
  if cfg.depth_align not in ("none", "median", "scale", "scale_shift", "disparity_affine"):
    raise ValueError(f"depth_align {cfg.depth_align!r} is not one of none, median, scale, "
                     "scale_shift, disparity_affine")
  from geojax.models import registry
  family = registry.get_family(cfg.model.family)
  if not cfg.model.checkpoint:  # checkpoints carry their own config; checked after loading
    evaluator.parse_groups(cfg.metrics, family.predicts({"preset": cfg.model.preset}))
  out_dir = evaluator.prepare_out_dir(cfg.out_dir, cfg.overwrite)
  model, family, model_config, source = load_model(cfg)
  groups, notes = evaluator.parse_groups(cfg.metrics, family.predicts(model_config))
  predict = family.predictor(model, dict(process_res=cfg.model.process_res,
                                         ref_view_strategy=cfg.model.ref_view_strategy,
                                         use_ray_pose=cfg.model.use_ray_pose))
  rows = evaluator.run(predict, synthetic_scenes(cfg.data), groups, options, out_dir,
                       cfg.pictures, progress=lambda it: tqdm(it, total=cfg.data.num_scenes,
                                                              desc="scenes", unit="scene"))
  mean = evaluator.aggregate(rows)
  meta = {"model": {"family": family.name, "config": model_config, "source": source},
          "groups": list(groups), "notes": notes, "config": cfg.to_dict()}
  evaluator.write_results(out_dir, rows, mean, meta)
  print(f"model: {family.name} {model_config.get('preset', '')} from {source}")
  for n in notes:
    print(f"note: {n}")
  print(evaluator.format_table(mean, len(rows)))
  print(f"wrote {out_dir}/results.json, scenes.csv" + (", pictures/" if cfg.pictures else ""))
  return {"mean": mean, "scenes": rows, "out_dir": out_dir}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from geojax.runtime import enable_compilation_cache
  enable_compilation_cache()
  try:
    evaluate(_CONFIG.value)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"evaluate.py: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
