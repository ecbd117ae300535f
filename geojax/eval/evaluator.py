"""Scene-level evaluation: run a model over scenes, score every metric group that applies.

Used by ``evaluate.py``. Metric groups:

- ``depth``: :func:`geojax.eval.metrics.depth_metrics` per view, averaged over the views of a
  scene, after alignment (``depth_align``) per view (``depth_scope="view"``) or once over all views
  of the scene (``depth_scope="sequence"``: one scale (and shift) for the whole video, the usual
  protocol of video depth benchmarks);
- ``pose`` (models that predict cameras, >= 2 views): pose AUC over all view pairs, RRA/RTA and,
  with >= 3 views, ATE and RPE (consecutive frames: ``rpe_trans``, ``rpe_rot`` in degrees and
  their RMSE / mean companions) after Sim(3) alignment of camera centres;
- ``pointcloud``: predicted depth un-projected with the predicted cameras (GT cameras for
  depth-only models), aligned to the GT points by Umeyama Sim(3) over pixel correspondences, then
  accuracy / completeness / Chamfer / precision / recall / F-score;
- ``pointmap``: per-camera (local) point maps -- the model's ``local_points`` when it returns
  them, else its depth un-projected with its intrinsics (GT intrinsics for depth-only models) --
  against the GT depth un-projected with the GT intrinsics; one alignment over all views of the
  scene (``pointmap_align``: ``none``, ``scale`` (default) or ``scale_shift``), then ``rel_p`` and
  ``delta_p`` (:func:`geojax.eval.metrics.pointmap_metrics`, threshold 0.25);
- ``normal`` (models that predict normals, scenes with GT ``normals``): angular error on valid
  pixels (:func:`geojax.eval.metrics.normal_metrics`), keys prefixed ``normal_``;
- ``edge``: the edge-aware Chamfer distance on GT depth edges
  (:func:`geojax.eval.metrics.edge_chamfer`, prediction aligned as ``depth_align``, scale and
  shift when that is ``none``) and the flying-pixel ratio at those edges
  (:func:`geojax.eval.metrics.flying_pixels`), keys prefixed ``edge_``;
- ``seam`` (models that return per-crop predictions, URGT): ``seam_ce_provisional``, the mean
  absolute depth difference between overlapping crops relative to the mean depth
  (:func:`seam_error`); a stand-in for the paper's Consistency Error, whose definition is not
  published, so not comparable with its numbers;
- ``track`` (models that predict 3D tracks, scenes with GT ``tracks``): each GT track is queried
  at the first frame it is visible in (``track_queries`` ``(P, 3)`` ``(t, u, v)`` passed to the
  predictor), and the predicted world tracks, moved into each frame's camera (predicted cameras
  when the model has them), are scored with the TAPVid-3D metrics (median scaling), keys
  prefixed ``track_``.

Scene-level numbers are averaged over scenes with equal weight.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable, Iterable

import jax
import numpy as np

from geojax.eval import metrics as M
from geojax.geometry import alignment, unproject
from geojax.io import visualize as viz

GROUPS = ("depth", "pose", "pointcloud", "pointmap", "normal", "track", "edge", "seam")
NEEDS = {"depth": "depth", "pose": "cameras", "pointcloud": "depth", "pointmap": "depth",
         "normal": "normals", "track": "tracks", "edge": "depth", "seam": "patches"}
DEPTH_GROUPS = ("depth", "pointcloud", "pointmap", "edge")  # groups scored against GT depth
GT_KEYS = {"normal": "normals", "track": "tracks"}  # scene keys those groups need
DEPTH_SCOPES = ("view", "sequence")  # one depth alignment per view, or one per scene


def parse_groups(spec: str, predicts: tuple[str, ...], has_depth: bool = True
                 ) -> tuple[tuple[str, ...], list[str]]:
  """``"all"`` or ``"depth,pose"`` -> (groups to run, notes on groups skipped).

  A group is skipped (with a note) when the model does not predict what it needs, or when the
  dataset has no ground-truth depth (``has_depth=False``, e.g. COLMAP sparse models).
  """
  names = GROUPS if spec.strip() == "all" else tuple(
      s.strip() for s in spec.split(",") if s.strip())
  unknown = [n for n in names if n not in GROUPS]
  if unknown or not names:
    raise ValueError(f"metrics: unknown metric group(s) {unknown or [spec]}; choose from "
                     f"{', '.join(GROUPS)} or 'all'")
  explicit = spec.strip() != "all"
  run, notes = [], []
  for n in names:
    if NEEDS[n] not in predicts:
      if explicit or n in DEPTH_GROUPS + ("pose",):
        notes.append(f"{n}: skipped, the model does not predict {NEEDS[n]}")
    elif n in DEPTH_GROUPS and not has_depth:
      notes.append(f"{n}: skipped, the dataset has no ground-truth depth")
    else:
      run.append(n)
  return tuple(run), notes


def valid_mask(scene: dict[str, np.ndarray], max_depth: float) -> np.ndarray:
  if "depth" not in scene:
    raise ValueError("scene has no ground-truth depth; choose --config.metrics=pose")
  d = scene["depth"]
  m = scene["valid"] & np.isfinite(d) & (d > 0)
  if max_depth > 0:
    m &= d <= max_depth
  return m


def score_scene(pred: dict[str, np.ndarray], scene: dict[str, np.ndarray], mask: np.ndarray,
                groups: Iterable[str], options: dict[str, Any]) -> dict[str, float]:
  """All metrics of one scene as a flat ``{name: value}`` dict."""
  out: dict[str, float] = {}
  s = scene["extrinsics"].shape[0]
  if "depth" in groups:
    depth, align = pred["depth"], options["depth_align"]
    if options.get("depth_scope", "view") == "sequence":
      depth, align = sequence_aligned(depth, scene["depth"], mask, align), "none"
    per_view = [M.depth_metrics(depth[i], scene["depth"][i], mask[i], align=align)
                for i in range(s) if mask[i].any()]
    for k in per_view[0]:
      out[k] = float(np.mean([v[k] for v in per_view]))
  if "pose" in groups and s >= 2:
    ext_p, ext_g = pred["extrinsics"], scene["extrinsics"]
    out.update(M.pose_auc(ext_p, ext_g, thresholds=tuple(options["pose_thresholds"])))
    out.update(M.rra_rta(ext_p, ext_g))
    if s >= 3:
      out["ate"] = float(M.ate(ext_p, ext_g))
      out.update(M.rpe(ext_p, ext_g))
  if "normal" in groups and "normals" in scene:
    nm = M.normal_metrics(pred["normals"], scene["normals"], mask)
    out.update({f"normal_{k}": v for k, v in nm.items()})
  if "track" in groups and "tracks" in scene and "queries" in options:
    out.update(track_scores(pred, scene, options["queries"]))
  if "pointcloud" in groups:
    use_pred = "extrinsics" in pred
    k = pred["intrinsics"] if use_pred else scene["intrinsics"]
    w2c = pred["extrinsics"] if use_pred else scene["extrinsics"]
    p_pts = np.asarray(unproject.depth_to_world_points(pred["depth"], k, w2c))[mask]
    g_pts = np.asarray(unproject.depth_to_world_points(
        scene["depth"], scene["intrinsics"], scene["extrinsics"]))[mask]
    rng = np.random.default_rng(0)
    n = int(options["pointcloud_max_points"])
    if len(p_pts) > n:
      idx = rng.choice(len(p_pts), n, replace=False)
      p_pts, g_pts = p_pts[idx], g_pts[idx]
    sc, rot, tr = (np.asarray(a, np.float64) for a in alignment.umeyama(p_pts, g_pts))
    aligned = sc * p_pts @ rot.T + tr
    out.update(M.pointcloud_metrics(aligned, g_pts, threshold=options["pointcloud_threshold"]))
  if "pointmap" in groups:
    out.update(pointmap_scores(pred, scene, mask, options.get("pointmap_align", "scale")))
  if "edge" in groups:
    out.update(edge_scores(pred, scene, mask, options["depth_align"]))
  if "seam" in groups and "patch_depth" in pred:
    out["seam_ce_provisional"] = float(np.mean([
        seam_error(p, b) for p, b in zip(pred["patch_depth"], pred["patch_boxes"])]))
  return out


def sequence_aligned(pred_depth: np.ndarray, gt_depth: np.ndarray, mask: np.ndarray,
                     mode: str) -> np.ndarray:
  """``(S, H, W)`` predicted depth aligned to the GT by one fit (``mode`` of
  :func:`geojax.geometry.alignment.align_depth`) over the valid pixels of all ``S`` views."""
  p, g, m = (np.asarray(a) for a in (pred_depth, gt_depth, mask))
  s, h, w = p.shape
  flat = lambda a: a.reshape(s * h, w)  # the views stacked into one image: one alignment
  return np.asarray(alignment.align_depth(flat(p), flat(g), flat(m), mode=mode)).reshape(s, h, w)


def edge_scores(pred: dict[str, np.ndarray], scene: dict[str, np.ndarray], mask: np.ndarray,
                align: str) -> dict[str, float]:
  """Edge-aware Chamfer distance (:func:`geojax.eval.metrics.edge_chamfer`, GT intrinsics)
  averaged over the views that have GT depth edges; keys prefixed ``edge_``."""
  align = "scale_shift" if align == "none" else align
  rows = []
  for i in range(scene["depth"].shape[0]):
    try:
      row = M.edge_chamfer(pred["depth"][i], scene["depth"][i], scene["intrinsics"][i],
                           mask[i], align=align)
      row.update(M.flying_pixels(pred["depth"][i], scene["depth"][i], mask[i], align=align))
      rows.append(row)
    except ValueError:  # no valid pixel on a GT edge in this view (a flat view)
      continue
  if not rows:
    return {}
  return {f"edge_{k}": float(np.mean([r[k] for r in rows]))
          for k in ("chamfer", "accuracy", "completeness", "flying_ratio")}


def seam_error(patches: np.ndarray, boxes: np.ndarray) -> float:
  """Provisional seam error of one image: the mean over its crops' overlaps of the mean
  absolute difference of the crops' depths (:func:`geojax.eval.metrics.consistency_error`),
  relative to the mean absolute depth of the crops (so that it has no units); NaN without
  overlapping crops (grid mode)."""
  try:
    ce = M.consistency_error(list(patches), boxes)
  except ValueError:
    return float("nan")
  return ce / max(float(np.mean(np.abs(patches[np.isfinite(patches)]))), 1e-12)


def pointmap_scores(pred: dict[str, np.ndarray], scene: dict[str, np.ndarray], mask: np.ndarray,
                    align: str) -> dict[str, float]:
  """``rel_p`` / ``delta_p`` of the scene's camera-frame point maps (one alignment per scene)."""
  gt_depth = np.asarray(scene["depth"], np.float64)
  with jax.enable_x64(True):  # float64 un-projection (geojax pixel centres: offset 0)
    g_pts = np.asarray(unproject.depth_to_camera_points(
        gt_depth, np.asarray(scene["intrinsics"], np.float64)))
    if "local_points" in pred:
      p_pts = np.asarray(pred["local_points"], np.float64)
      if p_pts.shape != g_pts.shape:
        raise ValueError(f"pred local_points must have shape (S, H, W, 3) = {g_pts.shape} (the "
                         f"scene's views at its resolution), got {p_pts.shape}")
    else:
      k = pred["intrinsics"] if "intrinsics" in pred else scene["intrinsics"]
      p_pts = np.asarray(unproject.depth_to_camera_points(
          np.asarray(pred["depth"], np.float64), np.asarray(k, np.float64)))
  return M.pointmap_metrics(p_pts, g_pts, mask, align=align)


def track_queries(scene: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """``(queries (P', 3) (t, u, v), kept (P,) bool)``: the scene's own ``track_queries`` when it
  has them (TAPVid-3D files), else each GT track at the first frame it is visible in, projected
  with the GT camera; tracks never visible are dropped."""
  if "track_queries" in scene:
    q = np.asarray(scene["track_queries"], np.float32)
    return q, np.ones(len(q), bool)
  tracks, vis = scene["tracks"].astype(np.float64), scene["track_visible"].astype(bool)
  kept = vis.any(0)
  t0 = np.argmax(vis, 0)
  p = np.arange(tracks.shape[1])
  x = tracks[t0, p]
  ext, k = scene["extrinsics"][t0].astype(np.float64), scene["intrinsics"][t0].astype(np.float64)
  cam = np.einsum("pij,pj->pi", ext[:, :3, :3], x) + ext[:, :3, 3]
  uv = np.einsum("pij,pj->pi", k[:, :2], cam / np.maximum(cam[:, 2:], 1e-9))
  q = np.concatenate([t0[:, None].astype(np.float64), uv], 1).astype(np.float32)
  return q[kept], kept


def track_scores(pred: dict[str, np.ndarray], scene: dict[str, np.ndarray],
                 kept: np.ndarray) -> dict[str, float]:
  """TAPVid-3D metrics of predicted world tracks against the kept GT tracks (camera frames)."""
  gt_w2c = scene["extrinsics"].astype(np.float64)
  w2c = pred["extrinsics"].astype(np.float64) if "extrinsics" in pred else gt_w2c
  to_cam = lambda e, x: np.einsum("sij,spj->spi", e[:, :3, :3], x) + e[:, None, :3, 3]
  gt = to_cam(gt_w2c, scene["tracks"][:, kept].astype(np.float64))
  pt = to_cam(w2c, np.asarray(pred["tracks"], np.float64))
  h, w = scene.get("image_hw", scene["images"].shape[1:3])
  tm = M.tapvid3d_metrics(pt, gt, np.asarray(pred["track_visible"]) > 0.5,
                          scene["track_visible"][:, kept], scene["intrinsics"][0], (h, w))
  return {f"track_{k}": v for k, v in tm.items() if k != "average_pts_within_thresh"}


def scene_picture(images: np.ndarray, pred: dict[str, np.ndarray], scene: dict[str, np.ndarray],
                  mask: np.ndarray, align: str) -> np.ndarray:
  """Rows = views; columns = image, GT depth, aligned predicted depth, AbsRel error."""
  rows = []
  for i in range(images.shape[0]):
    gt = scene["depth"][i]
    rng = viz.depth_range(gt, mask[i])
    if mask[i].any():
      aligned = np.asarray(alignment.align_depth(pred["depth"][i], gt, mask[i], mode=align))
    else:
      aligned = pred["depth"][i]
    err = np.abs(aligned - gt) / np.where(mask[i], gt, 1.0)
    rows.append([images[i], viz.colorize_depth(gt, mask[i], rng),
                 viz.colorize_depth(aligned, None, rng), viz.colorize_error(err, mask[i])])
  return viz.grid(rows)


def prepare_out_dir(out_dir: str, overwrite: bool) -> str:
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, "results.json")) and not overwrite:
    raise FileExistsError(f"out_dir {out_dir} already holds results.json; choose another "
                          "--config.out_dir or pass --config.overwrite=True")
  os.makedirs(os.path.join(out_dir, "pictures"), exist_ok=True)
  return out_dir


def aggregate(rows: list[dict[str, Any]]) -> dict[str, float]:
  keys = [k for k in rows[0] if k != "scene"]
  return {k: float(np.mean([r[k] for r in rows if k in r and math.isfinite(r[k])]))
          for k in keys}


def write_results(out_dir: str, rows: list[dict[str, Any]], mean: dict[str, float],
                  meta: dict[str, Any]) -> None:
  """``results.json`` and ``scenes.csv``, each written to a temporary file and renamed."""
  tmp = os.path.join(out_dir, f".results.json.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump({**meta, "mean": mean, "scenes": rows}, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, "results.json"))
  keys = ["scene"] + [k for k in rows[0] if k != "scene"]
  tmp = os.path.join(out_dir, f".scenes.csv.tmp-{os.getpid()}")
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in keys})
  os.replace(tmp, os.path.join(out_dir, "scenes.csv"))


def format_table(mean: dict[str, float], n_scenes: int) -> str:
  width = max(len(k) for k in mean)
  lines = [f"{'metric':<{width}}  mean over {n_scenes} scene(s)", "-" * (width + 24)]
  lines += [f"{k:<{width}}  {v:.4f}" for k, v in mean.items()]
  return "\n".join(lines)


def run(predict: Callable[[np.ndarray], dict[str, np.ndarray]],
        scenes: Iterable[tuple[str, dict[str, np.ndarray]]], groups: tuple[str, ...],
        options: dict[str, Any], out_dir: str | None, pictures: bool,
        progress: Callable[[Iterable], Iterable] = lambda x: x,
        scene_inputs: Callable[[dict], dict] | None = None) -> list[dict[str, Any]]:
  """Score each ``(name, scene)``; pictures go to ``out_dir/pictures/<name>.png``.

  ``scene_inputs(scene)``: extra predictor inputs made from the ground-truth scene
  (``Family.eval_inputs``). A prediction holding a ``prior`` dict (a refiner's coarse input) has
  that scored as well, with the depth, normal and edge groups, keys prefixed ``prior_``."""
  rows = []
  need_depth = any(g in groups for g in DEPTH_GROUPS + ("normal",))
  for name, scene in progress(scenes):
    mask = valid_mask(scene, float(options.get("max_depth", 0.0))) if need_depth else None
    if need_depth and not mask.any():
      raise ValueError(f"scene {name}: no valid ground-truth depth (all pixels masked; "
                       f"max_depth={options.get('max_depth', 0.0)})")
    opts = options
    extra = scene_inputs(scene) if scene_inputs is not None else {}
    if "track" in groups and "tracks" in scene:
      queries, kept = track_queries(scene)
      pred = predict(scene["images"], track_queries=queries, **extra)
      opts = {**options, "queries": kept}
    else:
      pred = predict(scene["images"], **extra)
    row = {"scene": name, **score_scene(pred, scene, mask, groups, opts)}
    if isinstance(pred.get("prior"), dict):
      prior_groups = [g for g in groups if g in ("depth", "normal", "edge")]
      prior = score_scene(pred["prior"], scene, mask, prior_groups, opts)
      row.update({f"prior_{k}": v for k, v in prior.items()})
    rows.append(row)
    if len(rows[-1]) == 1:
      raise ValueError(f"scene {name}: no metric applies (pose needs >= 2 views)")
    if pictures and out_dir and mask is not None:
      viz.save_png(os.path.join(out_dir, "pictures", f"{name}.png"),
                   scene_picture(scene["images"], pred, scene, mask, options["depth_align"]),
                   overwrite=True)
  return rows
