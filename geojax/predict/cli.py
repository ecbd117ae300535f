"""``geojax predict``: depth, cameras and point clouds for your images, videos and scenes.

    geojax predict --weights CKPT_DIR --out OUT_DIR INPUT [INPUT ...]

(or ``python -m geojax.predict ...``). Inputs are described in :mod:`geojax.predict.inputs`,
outputs in :mod:`geojax.predict.export`. Exit status: 0 on success, 2 with a one-line message on
bad input (missing or unreadable files, an existing output directory, bad options).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from geojax.models import registry
from geojax.nn import attention

PROG = "geojax predict"


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit status 2, like every other bad input
    raise _UsageError(message)


class _UsageError(Exception):
  pass


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description=(
      "Predict depth, confidence, cameras and a point cloud for each scene and write them, "
      "with an index.html, to OUT_DIR/<scene>/."))
  p.add_argument("inputs", nargs="+", metavar="INPUT", help=(
      "image files (consecutive ones form one scene), a folder of images, a video, a scene "
      "folder (cameras.json + images/) or a COLMAP folder (images/ + sparse model)"))
  w = p.add_argument_group("model")
  w.add_argument("--weights", help=(
      "official checkpoint directory (model.safetensors + config.json), a .safetensors file, "
      "or a geojax checkpoint / training workdir"))
  w.add_argument("--model", metavar="PRESET", help="preset name when the weights do not say "
                 "(any registered family's: " + ", ".join(
                     p for f in registry.families().values() for p in f.presets) + ")")
  w.add_argument("--hub", metavar="REPO_ID", help="download REPO_ID from the Hugging Face hub "
                 "into the local cache and use it as --weights (needs huggingface_hub)")
  w.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                 help="backbone compute dtype (default: the checkpoint's, float32)")
  w.add_argument("--attn", choices=attention.IMPLEMENTATIONS, default=None,
                 help="attention implementation (cudnn: NVIDIA GPUs with bf16/fp16; chunked: "
                 "memory linear in the sequence length)")
  w.add_argument("--head-chunk", type=int, default=None, metavar="N",
                 help="views the DPT heads process at a time (0: all; bounds head memory)")
  w.add_argument("--view-devices", type=int, default=None, metavar="N",
                 help="shard the views of a scene across N devices (mesh axis 'view')")
  o = p.add_argument_group("output")
  o.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (must not "
                 "exist unless --overwrite)")
  o.add_argument("--overwrite", action="store_true",
                 help="write into an existing OUT_DIR, replacing scene folders of the same name")
  o.add_argument("--glb", action="store_true", help="also write points.glb (needs trimesh: "
                 "pip install 'geojax[glb]')")
  o.add_argument("--conf-percentile", type=float, default=40.0,
                 help="point cloud: adaptive confidence percentile (official default 40; 0 keeps "
                 "all points)")
  o.add_argument("--max-points", type=int, default=1_000_000,
                 help="point cloud: keep at most this many points (random subsample)")
  i = p.add_argument_group("inputs and inference")
  i.add_argument("--fps", type=float, default=None, help="sample videos at this rate "
                 "(default: every frame)")
  i.add_argument("--max-views", type=int, default=None,
                 help="use at most this many views per scene")
  i.add_argument("--ignore-exif", action="store_true",
                 help="read the stored pixels without applying the EXIF orientation tag (the "
                 "official DA3 behaviour; by default photos are turned upright)")
  i.add_argument("--no-poses", action="store_true",
                 help="ignore known cameras of scene and COLMAP folders")
  i.add_argument("--no-progress", action="store_true", help="no progress bar")
  seen: set[str] = set()
  for fam in registry.families().values():
    args = [a for a in fam.predict_args if a.flags[0] not in seen]
    if args:
      g = p.add_argument_group(f"{fam.name} models")
      for a in args:
        g.add_argument(*a.flags, **a.kwargs)
        seen.add(a.flags[0])
  return p


def _one_line_warnings():
  def show(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {message}", file=sys.stderr)
  warnings.showwarning = show
  # Orbax's checkpoint handlers leave some coroutines unstarted on a restore; Python reports
  # each when the garbage collector frees it, at a random later moment (seen after loading an
  # --align-to model). Nothing a user can act on, and it would break the one-line errors.
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)


def _check_args(a) -> None:
  if not a.weights and not a.hub:
    raise ValueError("pass --weights CKPT_DIR (or --hub REPO_ID)")
  if a.weights and a.hub:
    raise ValueError("pass either --weights or --hub, not both")
  if a.max_points is not None and a.max_points < 1:
    raise ValueError(f"--max-points must be >= 1; got {a.max_points}")
  if a.fps is not None and not a.fps > 0:
    raise ValueError(f"--fps must be positive; got {a.fps}")
  if a.max_views is not None and a.max_views < 1:
    raise ValueError(f"--max-views must be >= 1; got {a.max_views}")
  if a.head_chunk is not None and a.head_chunk < 0:
    raise ValueError(f"--head-chunk must be >= 0; got {a.head_chunk}")
  if not 0 <= a.conf_percentile < 100:
    raise ValueError(f"--conf-percentile must be in [0, 100); got {a.conf_percentile}")
  out = os.path.abspath(a.out)
  if os.path.exists(out) and not a.overwrite:
    raise FileExistsError(f"--out {a.out} exists; choose a new directory or pass --overwrite")
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"--out {a.out} is a file, not a directory")


def predict(a) -> dict:
  """Run the command for parsed arguments ``a``; returns the summary."""
  import jax
  from tqdm import tqdm

  from geojax import runtime
  from geojax.predict import core, export, inputs, weights

  _check_args(a)
  scenes = inputs.resolve(a.inputs, fps=a.fps, max_views=a.max_views, exif=not a.ignore_exif)
  runtime.tune_host_allocator()
  runtime.enable_compilation_cache()
  overrides = {k: v for k, v in (("dtype", a.dtype), ("attn_impl", a.attn),
                                 ("head_chunk", a.head_chunk)) if v is not None}
  path = weights.hub_snapshot(a.hub) if a.hub else a.weights
  model, info = weights.load_model(path, preset=a.model, overrides=overrides)
  family = registry.family_of(model)
  options = {arg.dest: getattr(a, arg.dest) for arg in family.predict_args}
  for other in registry.families().values():
    for arg in other.predict_args:
      if arg.dest not in options and getattr(a, arg.dest, None) != arg.kwargs.get(
          "default", False if arg.kwargs.get("action") == "store_true" else None):
        raise ValueError(f"{arg.flags[0]} does not apply to {family.name} models")
  mesh = None
  if a.view_devices:
    from geojax.parallel.sharding import make_view_mesh
    mesh = make_view_mesh(a.view_devices)
  out_dir = os.path.abspath(a.out)
  os.makedirs(out_dir, exist_ok=True)
  results, forward_s, views = [], 0.0, 0
  t0 = time.perf_counter()
  bar = tqdm(scenes, desc="scenes", unit="scene", disable=a.no_progress, file=sys.stderr)
  for sc in bar:
    bar.set_postfix_str(f"{sc.name}: {len(sc.images)} views")
    posed = sc.extrinsics is not None and not a.no_poses
    try:
      pred = core.run(model, sc.images, extrinsics=sc.extrinsics if posed else None,
                      intrinsics=sc.intrinsics if posed else None, names=sc.names, mesh=mesh,
                      **options)
    except ValueError as e:  # name the input the problem came from
      msg = str(e)
      if not msg.startswith("--") and sc.source not in msg:
        msg = f"{sc.source}: {msg}"
      raise ValueError(msg) from None
    summary = export.write_prediction(
        pred, os.path.join(out_dir, sc.name), overwrite=a.overwrite,
        conf_percentile=a.conf_percentile, max_points=a.max_points, glb=a.glb,
        camera_source="given" if posed else "predicted",
        info={"family": family.name, "preset": info.get("preset"), "weights": info["weights"],
              "format": info["format"], "input": sc.source, "kind": sc.kind,
              "devices": jax.device_count() if mesh is None else mesh.size})
    results.append(summary)
    forward_s += pred.seconds
    views += len(sc.images)
  total = time.perf_counter() - t0
  line = (f"{PROG}: {len(results)} scene(s), {views} views -> {out_dir}; forward "
          f"{views / max(forward_s, 1e-9):.2f} views/s, overall {views / max(total, 1e-9):.2f} "
          f"views/s ({total:.1f} s incl. compilation and export)")
  print(line)
  return {"scenes": results, "views": views, "seconds": total, "forward_seconds": forward_s}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  _one_line_warnings()
  parser = build_parser()
  try:
    a = parser.parse_args(argv)
    predict(a)
  except _UsageError as e:
    print(f"{PROG}: error: {e} (see {PROG} --help)", file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    msg = " ".join(str(e).split())
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2
  return 0
