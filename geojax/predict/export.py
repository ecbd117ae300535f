"""Writing one scene's :class:`~geojax.predict.core.Prediction` to disk.

``OUT/<scene>/`` holds (``<stem>`` is the view's file stem, made unique and file-system safe):

- ``cameras.json`` and ``images/<stem>.png`` (the processed input views) - together with
  ``depth/<stem>.npy`` this folder is a geojax *scene folder*
  (:mod:`geojax.data.formats.scene_folder`), so it reads back with ``read_scene``;
- ``depth/<stem>.npy`` (float32 z-depth) and ``depth/<stem>.png`` (16-bit, ``value *
  depth_png_unit`` = depth; the unit is 1 mm, the scene-folder convention, whenever the largest
  depth fits in 65.535, else ``max_depth / 65535``; recorded in ``cameras.json``);
- ``confidence/<stem>.npy`` and ``confidence/<stem>.png`` (16-bit, unit ``conf_png_unit``), when
  the model predicts confidence;
- ``normals/<stem>.npy`` (float32 camera-frame unit normals, OpenCV axes) and
  ``normals/<stem>.png`` (colour ``(n + 1) / 2``), when the model predicts normals;
- ``point_map/<stem>.npy`` (float32 world point map) and ``point_map_local/<stem>.npy``
  (camera-frame), when the model predicts point maps itself;
- ``sky/<stem>.npy`` (sky probability), when predicted;
- ``<name>/<stem>.npy`` and ``<name>/<stem>.png`` for each of the family's extra maps
  (``Prediction.extras``, e.g. URGT's ``prior_depth``): maps named ``*depth`` coloured on the
  depth map's range, other scalar maps on their own range (larger is brighter), 3-vectors as
  normals;
- ``tracks.npz`` (``tracks`` (S, P, 3) world points, ``visibility`` (S, P), ``queries`` (P, 3)
  ``(t, u, v)``, ``uv`` (S, P, 2) the tracks projected into each frame) and ``tracks.png``
  (the tracks drawn over up to four frames), when the model predicts 3D tracks, and
  ``tracks.mp4`` (every frame with its tracks) when the ``video`` extra is installed;
- ``depth_vis/<stem>.png``: colourised depth (near is bright, shared range per scene);
- ``strip.png`` (scenes and videos of two or more views): a frame strip, up to
  :data:`STRIP_FRAMES` evenly spaced views side by side, each image above its colourised depth
  (one range for all, so a video's depth can be checked for flicker at a glance);
- ``points.ply``: binary PLY point cloud with colours, filtered like the official GLB export
  (adaptive confidence percentile, then at most ``max_points`` points);
- ``points.glb`` (optional, needs ``trimesh``): the same points plus camera frustums;
- ``colmap/``: ``cameras.txt``, ``images.txt``, ``points3D.txt`` (PINHOLE cameras; 3D points
  lifted from confident depth with tracks across views);
- ``preview.png``: an offscreen rendering of the point cloud with the cameras;
- ``index.html``: one page with an interactive 3D viewer of the point cloud and cameras
  (offline WebGL, :mod:`geojax.io.viewer`), thumbnails, depth (and normal) maps, the preview,
  any warnings about degenerate outputs and links to every file.

``cameras.json`` is the scene-folder file (frames with ``name``, ``width``, ``height``, ``fx``,
``fy``, ``cx``, ``cy``, world-to-camera ``extrinsics``; geojax pixel centres) plus ``model``,
``depth_png_unit``, ``conf_png_unit``, ``cameras`` (``predicted``, ``given`` or ``assumed`` for
monocular models, which get identity poses and a 60-degree field of view) and per-frame
``source`` (the input file name) and ``input_width``/``input_height``, plus ``metric_scale`` when
the model predicts one and ``warnings`` (degenerate outputs reported by
:func:`geojax.predict.run`).

A scene is assembled in a hidden temporary folder next to its destination and renamed into place
when complete.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from geojax.data.formats import colmap, scene_folder, video
from geojax.io import pointcloud, render, viewer, visualize
from geojax.predict.core import Prediction, assumed_intrinsics

VIEWER_MAX_POINTS = 150_000  # points embedded in index.html

PNG16_MAX = 65535
COLMAP_MAX_POINTS = 100_000  # points3D.txt stays small and quick to build for long sequences


def view_stems(names: Sequence[str]) -> list[str]:
  """File-system-safe, unique stems for view names (``a.jpg`` -> ``a``; duplicates ``a-2``)."""
  out, seen = [], set()
  for i, n in enumerate(names):
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(n))[0]).strip("._")
    stem = stem or f"view_{i:04d}"
    cand, k = stem, 2
    while cand in seen:
      cand, k = f"{stem}-{k}", k + 1
    seen.add(cand)
    out.append(cand)
  return out


def _png16(x: np.ndarray, unit: float) -> np.ndarray:
  q = np.rint(np.where(np.isfinite(x), x, 0) / unit)
  return np.clip(q, 0, PNG16_MAX).astype(np.uint16)


def _unit(x: np.ndarray, preferred: float) -> float:
  hi = float(np.nanmax(np.where(np.isfinite(x), x, 0))) if x.size else 0.0
  return preferred if hi <= preferred * PNG16_MAX else hi / PNG16_MAX


def _save16(path: str, a: np.ndarray) -> None:
  Image.fromarray(a).save(path, format="PNG")


def _cameras(pred: Prediction) -> tuple[np.ndarray, np.ndarray, str]:
  s, h, w = pred.depth.shape
  if pred.extrinsics is not None:
    return pred.extrinsics, pred.intrinsics, ""
  return np.tile(np.eye(4, dtype=np.float32), (s, 1, 1)), assumed_intrinsics(s, h, w), "assumed"


def write_prediction(pred: Prediction, dst: str, *, overwrite: bool = False,
                     conf_percentile: float = pointcloud.DEFAULT_CONF_PERCENTILE,
                     max_points: int | None = pointcloud.DEFAULT_MAX_POINTS, glb: bool = False,
                     colmap_points_per_view: int = 2000, preview_size: tuple[int, int] = (480, 640),
                     camera_source: str = "predicted", info: dict[str, Any] | None = None,
                     seed: int = 0) -> dict[str, Any]:
  """Write ``pred`` to the folder ``dst`` (see the module docstring); returns a summary dict.

  Raises:
    FileExistsError if ``dst`` exists and not ``overwrite``.
  """
  dst = os.path.abspath(dst)
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
  s, h, w = pred.depth.shape
  stems = view_stems(pred.names)
  ext, ks, assumed = _cameras(pred)
  camera_source = assumed or camera_source
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
  try:
    root = os.path.join(stage, "scene")
    scene = {"images": pred.images, "intrinsics": ks, "extrinsics": ext, "depth": pred.depth}
    scene_folder.write_scene(scene, root, names=[f"{t}.png" for t in stems])
    depth_unit = _unit(pred.depth, 1e-3)
    conf = pred.depth_conf
    conf_unit = _unit(conf, 1e-3) if conf is not None else None
    maps = {"confidence": conf, "normals": pred.normals, "point_map": None if pred.points_from_depth else pred.world_points,
            "point_map_local": pred.local_points, "sky": pred.sky}
    for sub in ["depth_vis"] + [k for k, v in maps.items() if v is not None]:
      os.mkdir(os.path.join(root, sub))
    vis_range = visualize.depth_range(pred.depth)
    for i, t in enumerate(stems):
      _save16(os.path.join(root, "depth", t + ".png"), _png16(pred.depth[i], depth_unit))
      Image.fromarray(visualize.colorize_depth(pred.depth[i], value_range=vis_range)).save(
          os.path.join(root, "depth_vis", t + ".png"))
      for sub, value in maps.items():
        if value is not None:
          np.save(os.path.join(root, sub, t + ".npy"), np.asarray(value[i], np.float32))
      if conf is not None:
        _save16(os.path.join(root, "confidence", t + ".png"), _png16(conf[i], conf_unit))
      if pred.normals is not None:
        Image.fromarray(visualize.colorize_normals(pred.normals[i])).save(
            os.path.join(root, "normals", t + ".png"))
    _write_extras(root, pred, stems, vis_range)
    if s >= 2:
      _write_strip(root, pred, vis_range)
    if pred.tracks is not None:
      _write_tracks(root, pred, ks, ext)
    # cameras.json: the scene-folder file plus prediction metadata.
    cam_path = os.path.join(root, scene_folder.CAMERAS_FILE)
    with open(cam_path, encoding="utf-8") as f:
      cams = json.load(f)
    for i, fr in enumerate(cams["frames"]):
      fr["source"] = pred.names[i]
      fr["input_height"], fr["input_width"] = (int(v) for v in pred.input_hw[i])
    cams.update(cameras=camera_source, depth_png_unit=depth_unit,
                **({"conf_png_unit": conf_unit} if conf is not None else {}),
                **({"metric_scale": float(pred.metric_scale)}
                   if pred.metric_scale is not None else {}),
                **({"warnings": list(pred.warnings)} if pred.warnings else {}),
                **({"model": info} if info else {}))
    with open(cam_path, "w", encoding="utf-8") as f:
      json.dump(cams, f, indent=1)
    # Point cloud.
    valid = np.isfinite(pred.depth) & (pred.depth > 0)
    if pred.sky is not None:
      valid &= pred.sky < 0.3
    valid &= np.all(np.isfinite(pred.world_points), -1)
    xyz, rgb = pointcloud.filter_points(pred.world_points, pred.images, conf,
                                        valid=valid, conf_percentile=conf_percentile,
                                        max_points=max_points, seed=seed)
    pointcloud.write_ply(os.path.join(root, "points.ply"), xyz, rgb)
    if glb:
      pointcloud.write_glb(os.path.join(root, "points.glb"), xyz, rgb, extrinsics=ext,
                           intrinsics=ks, image_hw=(h, w))
    # COLMAP text model: confident pixels lifted and tracked across views.
    conf_ok = valid if conf is None else _confident(conf, valid, conf_percentile)
    per_view = max(1, min(colmap_points_per_view, COLMAP_MAX_POINTS // s))
    model = colmap.model_from_scene(
        {"images": pred.images, "depth": np.where(conf_ok, pred.depth, 0.0), "intrinsics": ks,
         "extrinsics": ext}, points_per_view=per_view, seed=seed,
        names=[f"{t}.png" for t in stems])
    colmap.write_model(model, os.path.join(root, "colmap"), binary=False)
    # Preview and page.
    preview = render.render_point_cloud(xyz, rgb, extrinsics=ext, intrinsics=ks, image_hw=(h, w),
                                        size=preview_size, seed=seed)
    Image.fromarray(preview).save(os.path.join(root, "preview.png"))
    summary = {"scene": os.path.basename(dst), "views": s, "height": h, "width": w,
               "points": int(len(xyz)), "colmap_points": len(model.points3D),
               "cameras": camera_source, "outputs": list(pred.kinds()),
               "seconds": round(float(pred.seconds), 4)}
    if pred.tracks is not None:
      summary["tracks"] = int(pred.tracks.shape[1])
    if pred.warnings:
      summary["warnings"] = list(pred.warnings)
    view_html = viewer.viewer_html(xyz, rgb, extrinsics=ext, intrinsics=ks, image_hw=(h, w),
                                   max_points=VIEWER_MAX_POINTS, seed=seed)
    _write_index(root, pred, stems, summary, glb=glb, info=info, viewer_fragment=view_html)
    if os.path.lexists(dst):
      old = os.path.join(stage, "old")
      os.rename(dst, old)
    os.rename(root, dst)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return summary


STRIP_FRAMES = 8


def _write_strip(root: str, pred: Prediction, depth_range) -> None:
  """``strip.png``: up to :data:`STRIP_FRAMES` evenly spaced views, image over depth."""
  s = pred.depth.shape[0]
  idx = np.unique(np.linspace(0, s - 1, min(s, STRIP_FRAMES)).round().astype(int))
  cols = [np.concatenate([pred.images[i], visualize.colorize_depth(
      pred.depth[i], value_range=depth_range)], 0) for i in idx]
  Image.fromarray(np.concatenate(cols, 1)).save(os.path.join(root, "strip.png"))


def _write_extras(root: str, pred: Prediction, stems: list[str], depth_range) -> None:
  """``Prediction.extras``: an ``.npy`` and a picture per view and map."""
  for name, value in pred.extras.items():
    os.mkdir(os.path.join(root, name))
    own = None
    if not name.endswith("depth") and value.ndim == 3:  # larger is brighter (e.g. disparity)
      own = visualize.depth_range(value)[::-1]
    for i, t in enumerate(stems):
      np.save(os.path.join(root, name, t + ".npy"), np.asarray(value[i], np.float32))
      pic = (visualize.colorize_normals(value[i]) if value.ndim == 4 else
             visualize.colorize_depth(value[i], value_range=own or depth_range))
      Image.fromarray(pic).save(os.path.join(root, name, t + ".png"))


def _write_tracks(root: str, pred: Prediction, ks: np.ndarray, ext: np.ndarray) -> None:
  """``tracks.npz``, ``tracks.png`` (tracks projected with the exported cameras) and, with the
  ``video`` extra installed, ``tracks.mp4`` (every frame with its tracks)."""
  tracks = np.asarray(pred.tracks, np.float64)
  vis = np.asarray(pred.track_visibility, np.float32)
  cam = np.einsum("sij,spj->spi", ext[:, :3, :3], tracks) + ext[:, None, :3, 3]
  z = cam[..., 2]
  with np.errstate(divide="ignore", invalid="ignore"):
    uv = np.einsum("sij,spj->spi", ks[:, :2, :], cam / z[..., None])
  uv = np.where((z > 0)[..., None], uv, np.nan).astype(np.float32)
  queries = (np.asarray(pred.track_queries, np.float32) if pred.track_queries is not None
             else np.full((tracks.shape[1], 3), np.nan, np.float32))
  np.savez(os.path.join(root, "tracks.npz"), tracks=tracks.astype(np.float32), visibility=vis,
           queries=queries, uv=uv)
  Image.fromarray(visualize.draw_tracks(pred.images, uv, vis)).save(
      os.path.join(root, "tracks.png"))
  if len(pred.images) > 1 and video.video_available():  # the video extra is installed
    video.write_video(os.path.join(root, "tracks.mp4"),
                          visualize.track_frames(np.asarray(pred.images), uv, vis))


def _confident(conf: np.ndarray, valid: np.ndarray, percentile: float) -> np.ndarray:
  """Pixels at or above the official adaptive threshold (as :func:`pointcloud.filter_points`)."""
  c = conf[valid & np.isfinite(conf)]
  if c.size == 0 or not percentile:
    return valid
  return valid & (conf >= pointcloud.confidence_threshold(c, percentile))


def _write_index(root: str, pred: Prediction, stems: list[str], summary: dict[str, Any], *,
                 glb: bool, info: dict[str, Any] | None, viewer_fragment: str = "") -> None:
  esc = html.escape
  normals = pred.normals is not None
  rows = []
  for i, t in enumerate(stems):
    arrays = [f'<a href="depth/{t}.npy">npy</a> &middot; <a href="depth/{t}.png">png16</a>']
    if pred.depth_conf is not None:
      arrays.append(f'<a href="confidence/{t}.npy">conf npy</a> &middot; '
                    f'<a href="confidence/{t}.png">conf png16</a>')
    if normals:
      arrays.append(f'<a href="normals/{t}.npy">normals npy</a>')
    arrays += [f'<a href="{n}/{t}.npy">{esc(n)} npy</a>' for n in pred.extras]
    extra_cells = "".join(f'<td><a href="{n}/{t}.png"><img src="{n}/{t}.png"></a></td>'
                          for n in pred.extras)
    rows.append(
        f'<tr><td>{esc(pred.names[i])}<br><small>{pred.input_hw[i][1]}x{pred.input_hw[i][0]}'
        f'</small></td><td><a href="images/{t}.png"><img src="images/{t}.png"></a></td>'
        f'<td><a href="depth_vis/{t}.png"><img src="depth_vis/{t}.png"></a></td>'
        + (f'<td><a href="normals/{t}.png"><img src="normals/{t}.png"></a></td>' if normals
           else "") + extra_cells + f'<td>{"<br>".join(arrays)}</td></tr>')
  files = ['<a href="points.ply">points.ply</a>', '<a href="cameras.json">cameras.json</a>',
           '<a href="colmap/cameras.txt">colmap/cameras.txt</a>',
           '<a href="colmap/images.txt">colmap/images.txt</a>',
           '<a href="colmap/points3D.txt">colmap/points3D.txt</a>']
  if glb:
    files.insert(1, '<a href="points.glb">points.glb</a>')
  tracks = ""
  if pred.tracks is not None:
    files.append('<a href="tracks.npz">tracks.npz</a>')
    tracks = (f'<h2>3D tracks</h2><p>{pred.tracks.shape[1]} tracks over {pred.tracks.shape[0]} '
              'frames, projected with the exported cameras.</p>'
              '<p><a href="tracks.png"><img src="tracks.png" alt="tracks" style="max-width:100%">'
              '</a></p>')
  warn = ""
  if pred.warnings:
    warn = ('<div class="warn"><b>Warning:</b><ul>'
            + "".join(f"<li>{esc(m)}</li>" for m in pred.warnings) + "</ul></div>")
  facts = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
                  for k, v in {**summary, **({"model": info} if info else {})}.items())
  head = ("<th>view</th><th>input</th><th>depth</th>" + ("<th>normals</th>" if normals else "")
          + "".join(f"<th>{esc(n)}</th>" for n in pred.extras))
  page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>geojax predict: {esc(summary['scene'])}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 4px 8px; vertical-align: top; }}
#views img {{ height: 160px; }} #views tr:nth-child(even) {{ background: #f4f4f4; }}
th {{ text-align: left; }}
.warn {{ background: #fff3cd; border: 1px solid #e0b000; padding: 4px 12px; margin: 1em 0; }}
</style></head><body>
<h1>{esc(summary['scene'])}</h1>
<p>{summary['views']} views at {summary['width']}x{summary['height']} pixels;
{summary['points']} points in the cloud; cameras {esc(summary['cameras'])}.</p>
{warn}
<h2>Point cloud and cameras</h2>
{viewer_fragment}
<p>Still preview: <a href="preview.png"><img src="preview.png" alt="point cloud preview"
style="height:120px;vertical-align:middle"></a></p>
<p>Files: {' &middot; '.join(files)}</p>
{tracks}
<h2>Views</h2>
<table id="views"><tr>{head}<th>arrays</th></tr>
{chr(10).join(rows)}
</table>
<h2>Run</h2>
<table>{facts}</table>
</body></html>
"""
  with open(os.path.join(root, "index.html"), "w", encoding="utf-8") as f:
    f.write(page)
