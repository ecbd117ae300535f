"""Evaluate a geojax model on scenes with ground truth.

    python evaluate.py --config=configs/evaluate.py:PRESET \
        --config.data.num_scenes=4 --config.out_dir=outputs/eval

Loads a model (a geojax checkpoint with ``--config.model.checkpoint``, official weights with
``--config.model.weights``, or a random initialisation), runs it over the scenes (the built-in
synthetic scenes by default), prints a table of every applicable metric and writes
``results.json``, ``scenes.csv`` and ``pictures/<scene>.png`` under ``out_dir``. See
``configs/evaluate.py`` for every option.
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "evaluate.py"),
    "Evaluation config file (configs/evaluate.py[:preset]).", lock_config=True)


def load_model(cfg):
  """``(model, family, model_config)`` from the config's checkpoint / weights / random init."""
  from flax import nnx

  from geojax.models import registry
  family = registry.get_family(cfg.model.family)
  model_config = {"preset": cfg.model.preset}
  if cfg.model.checkpoint and cfg.model.weights:
    raise ValueError("model: set either model.checkpoint or model.weights, not both")
  if cfg.model.checkpoint:
    model, family, model_config = registry.load_checkpoint(
        cfg.model.checkpoint, family=family.name, what="model.checkpoint")
    source = f"checkpoint {os.path.abspath(cfg.model.checkpoint)}"
  elif cfg.model.weights:
    if family.load_official is None:
      raise ValueError(f"model.weights: the {family.name!r} family has no official weights; "
                       "use model.checkpoint")
    if not os.path.exists(cfg.model.weights):
      raise FileNotFoundError(f"model.weights {cfg.model.weights} does not exist")
    from geojax.convert.torch_layout import safetensors_keys
    if cfg.model.weights.endswith(".safetensors") or os.path.isdir(cfg.model.weights):
      safetensors_keys(cfg.model.weights)  # corrupt or truncated: one line naming the file
    try:
      model = family.load_official(cfg.model.weights, model_config)
    except ValueError as e:
      w = cfg.model.weights
      raise ValueError(f"model.weights {w}: {e}" if w not in str(e) else str(e)) from None
    source = f"official weights {os.path.abspath(cfg.model.weights)}"
  else:
    model = family.build(model_config, nnx.Rngs(cfg.model.seed))
    source = f"random initialisation (seed {cfg.model.seed}); scores are a smoke test only"
    logging.warning("no checkpoint or weights given: evaluating a randomly initialised model")
  return model, family, model_config, source


MODEL_FIELDS = ("family", "preset", "checkpoint", "weights", "seed")


def inference_options(model_cfg) -> dict:
  """The family's inference options: every ``model.*`` field but the loading ones."""
  return {k: model_cfg[k] for k in model_cfg if k not in MODEL_FIELDS}


def scene_list(data) -> tuple[list, int]:
  """``(iterable of (name, scene), count)`` for ``data.source``; scenes load lazily."""
  if data.source == "synthetic":
    from geojax.data.synthetic import render_scene
    if data.num_scenes < 1:
      raise ValueError(f"data.num_scenes must be >= 1; got {data.num_scenes}")
    dynamic = bool(data.get("dynamic", False))
    gen = ((f"scene_{i:04d}", render_scene(data.seed, i, num_views=data.num_views,
                                           height=data.height, width=data.width,
                                           dynamic=dynamic))
           for i in range(data.num_scenes))
    return gen, data.num_scenes
  if data.source == "scene_folder":
    from geojax.data.formats.scene_folder import read_scene
    root = data.path
    if not root or not os.path.isdir(root):
      raise FileNotFoundError(f"data.path {root!r} is not a directory (a scene folder or a "
                              "folder of scene folders)")
    if os.path.isfile(os.path.join(root, "cameras.json")):
      dirs = [root]
    else:
      dirs = [os.path.join(root, d) for d in sorted(os.listdir(root))
              if os.path.isfile(os.path.join(root, d, "cameras.json"))]
    if not dirs:
      raise ValueError(f"data.path {root}: no scene folder (with cameras.json) found")
    dirs = dirs[:data.num_scenes] if data.num_scenes > 0 else dirs
    exif = bool(data.get("exif", True))
    scenes = ((os.path.basename(os.path.normpath(d)), read_scene(d, exif=exif)) for d in dirs)
    return scenes, len(dirs)
  if data.source == "colmap":
    from geojax.data.formats.colmap import read_colmap_scene
    if not data.path or not os.path.isdir(data.path):
      raise FileNotFoundError(f"data.path {data.path!r} is not a COLMAP sparse model folder")
    images = data.images
    if not images:  # project/images beside project/sparse (or project/sparse/0)
      up = os.path.dirname(os.path.normpath(data.path))
      images = next((c for c in (os.path.join(up, "images"),
                                 os.path.join(os.path.dirname(up), "images"))
                     if os.path.isdir(c)), os.path.join(up, "images"))
    scene = read_colmap_scene(data.path, images, exif=bool(data.get("exif", True)))
    return iter([(os.path.basename(os.path.normpath(data.path)), scene)]), 1
  if data.source == "tapvid3d":
    from geojax.data.formats.tapvid3d import read_tapvid3d
    root = data.path
    if root and os.path.isfile(root):
      files = [root]
    elif root and os.path.isdir(root):
      files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs
                     if f.endswith(".npz"))
    else:
      raise FileNotFoundError(f"data.path {root!r} is neither a TAPVid-3D .npz file nor a folder "
                              "of them")
    if not files:
      raise ValueError(f"data.path {root}: no .npz file found")
    files = files[:data.num_scenes] if data.num_scenes > 0 else files
    return ((os.path.splitext(os.path.relpath(f, root if os.path.isdir(root) else
                                             os.path.dirname(root)))[0], read_tapvid3d(f))
            for f in files), len(files)
  raise ValueError(f"data.source {data.source!r} is not one of synthetic, scene_folder, colmap, "
                   "tapvid3d")


def evaluate(cfg) -> dict:
  from tqdm import tqdm

  from geojax.eval import evaluator
  scenes, n_scenes = scene_list(cfg.data)
  # COLMAP sparse models carry cameras, TAPVid-3D files tracks only: no dense depth
  has_depth = cfg.data.source not in ("colmap", "tapvid3d")
  options = dict(depth_align=cfg.depth_align, pose_thresholds=tuple(cfg.pose_thresholds),
                 pointcloud_threshold=cfg.pointcloud_threshold,
                 pointcloud_max_points=cfg.pointcloud_max_points, max_depth=cfg.data.max_depth,
                 pointmap_align=cfg.get("pointmap_align", "scale"),
                 depth_scope=cfg.get("depth_scope", "view"))
  from geojax.eval.metrics import POINTMAP_ALIGN_MODES
  from geojax.geometry.alignment import ALIGN_MODES
  if cfg.depth_align not in ALIGN_MODES:
    raise ValueError(f"depth_align {cfg.depth_align!r} is not one of {', '.join(ALIGN_MODES)}")
  if options["depth_scope"] not in evaluator.DEPTH_SCOPES:
    raise ValueError(f"depth_scope {options['depth_scope']!r} is not one of "
                     f"{', '.join(evaluator.DEPTH_SCOPES)}")
  if options["pointmap_align"] not in POINTMAP_ALIGN_MODES:
    raise ValueError(f"pointmap_align {options['pointmap_align']!r} is not one of "
                     f"{', '.join(POINTMAP_ALIGN_MODES)}")
  from geojax.models import registry
  family = registry.get_family(cfg.model.family)
  if not cfg.model.checkpoint:  # checkpoints carry their own config; checked after loading
    evaluator.parse_groups(cfg.metrics, family.predicts({"preset": cfg.model.preset}),
                           has_depth=has_depth)
  for name, value, ok, want in (
      ("pointcloud_threshold", cfg.pointcloud_threshold, lambda v: v > 0, "> 0"),
      ("pointcloud_max_points", cfg.pointcloud_max_points, lambda v: v >= 1, ">= 1"),
      ("data.max_depth", cfg.data.max_depth, lambda v: v >= 0, ">= 0 (0: no limit)"),
      ("pose_thresholds", cfg.pose_thresholds,
       lambda v: len(v) > 0 and all(0 < t <= 180 for t in v), "degrees in (0, 180]")):
    try:
      good = ok(value)
    except TypeError:
      good = False
    if not good:
      raise ValueError(f"{name} must be {want}; got {value!r}")
  created = not os.path.exists(os.path.abspath(cfg.out_dir))
  out_dir = evaluator.prepare_out_dir(cfg.out_dir, cfg.overwrite)
  try:
    return _evaluate(cfg, scenes, n_scenes, has_depth, options, family, out_dir)
  except BaseException:
    if created:  # nothing half-written is left behind
      shutil.rmtree(out_dir, ignore_errors=True)
    raise


def _evaluate(cfg, scenes, n_scenes, has_depth, options, family, out_dir) -> dict:
  from tqdm import tqdm

  from geojax.eval import evaluator
  model, family, model_config, source = load_model(cfg)
  groups, notes = evaluator.parse_groups(cfg.metrics, family.predicts(model_config),
                                         has_depth=has_depth)
  if cfg.data.source == "tapvid3d":  # tracks in each frame's camera: no cameras to score
    notes += [f"{g}: skipped, TAPVid-3D files hold 3D tracks only" for g in groups if g != "track"]
    groups = tuple(g for g in groups if g == "track")
    if not groups:
      raise ValueError("data.source=tapvid3d scores 3D tracks: choose metrics=track with a "
                       "model that predicts tracks (D4RT)")
  opts = inference_options(cfg.model)
  predict = family.get_predictor(model, opts)
  scene_inputs = None
  if family.eval_inputs is not None:
    scene_inputs = lambda scene: family.eval_inputs(scene, opts)
  rows = evaluator.run(predict, scenes, groups, options, out_dir, cfg.pictures and has_depth,
                       progress=lambda it: tqdm(it, total=n_scenes, desc="scenes", unit="scene"),
                       scene_inputs=scene_inputs)
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
  from geojax.runtime import enable_compilation_cache, tune_host_allocator
  tune_host_allocator()
  enable_compilation_cache()
  from geojax.train.config_util import load_config_flag
  config = load_config_flag(_CONFIG, "evaluate.py")
  try:
    evaluate(config)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"evaluate.py: error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from geojax.train.config_util import flags_parser
  app.run(main, flags_parser=flags_parser("evaluate.py"))
