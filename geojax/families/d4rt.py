"""The D4RT family (one video encoder, an independent-query decoder): build, run, train.

- network: :class:`geojax.models.d4rt.D4RT` (presets ``d4rt-g`` / ``-l`` / ``-b`` and the
  CPU-sized ``d4rt-tiny``); built from the paper, no official weights exist. The encoder can
  start from VideoMAE v2 weights (:mod:`geojax.convert.d4rt`, ``init.videomae`` in training);
- inference (:func:`predict`): the frames of one video are resized (squashed) to the model's
  square size with the original aspect ratio as the aspect token; the RGB patches come from the
  full-resolution frames. Everything is read out of the same decoder
  (:mod:`geojax.models.d4rt_readout`): depth, normals and camera-frame point maps (queries
  ``(u, v, t, t, t)`` on a pixel grid of ``--resolution``), the point cloud of all frames in
  camera 0 (``(u, v, t, t, 0)``), cameras by Umeyama on a 16 x 16 grid (``--keep`` most
  confident), intrinsics by the median rule, and 3D tracks of a grid of points of frame 0
  (``--track-grid``) or of ``--queries file.npz``. Videos longer than the model's clip run as
  overlapping clips aligned by Sim(3) (``--overlap``), with tracks chained from clip to clip
  through the frames they share (:func:`geojax.models.d4rt_readout.long_tracks`);
- training (:class:`D4RTTask`, ``configs/d4rt.py``): the composite per-query loss
  (:func:`geojax.losses.d4rt.d4rt_loss`) on the pipeline's ``d4rt`` queries.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from geojax.models import d4rt
from geojax.models import d4rt_readout as R
from geojax.models.registry import Demo, Family, PredictArg, config_overrides, register
from geojax.predict.core import Prediction

CAMERA_GRID = (16, 16)


def build(config: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  return d4rt.D4RT.from_preset(config["preset"], rngs=rngs, **config_overrides(config))


def load_official(path: str, config: dict[str, Any]) -> nnx.Module:
  """VideoMAE v2 weights (converted by ``geojax convert --family d4rt``) in a new D4RT: the
  encoder from them, the aspect embedding and decoder at their seed-0 initialisation -- a
  training start (``init.videomae``), not a predictor. The preset from ``config``, from
  ``config.json`` or from the tensors' widths."""
  from geojax.convert import d4rt as conv
  from geojax.convert.torch_layout import read_safetensors
  sd, ref = read_safetensors(path, "d4rt")
  preset = config.get("preset") or (ref or {}).get("model_name") or conv.videomae_preset(sd)
  model = d4rt.D4RT.from_preset(preset, rngs=nnx.Rngs(0), **config_overrides(config))
  return conv.load_videomae(model, sd)


def convert_state_dict(checkpoint: Any):
  """``geojax convert --family d4rt``: a VideoMAE v2 checkpoint -> its encoder tensors."""
  from geojax.convert import d4rt as conv
  return conv.convert_state_dict(checkpoint)


def predicts(config: dict[str, Any]) -> tuple[str, ...]:
  return ("depth", "confidence", "cameras", "points", "local_points", "normals", "tracks")


# ------------------------------------------------------------------------------------ inference


def clip_inputs(model, images) -> tuple[np.ndarray, np.ndarray, float, int]:
  """``(video (T', S, S, 3), frames (T', H, W, 3), aspect W / H, T)`` float32 in [0, 1]: the
  frames squashed to the model's ``S x S`` (bilinear with antialiasing) and at full resolution,
  ``T'`` the frame count rounded up to the tubelet by repeating the last frame (a video shorter
  than one tubelet is refused)."""
  shapes = {tuple(im.shape) for im in images}
  if len(shapes) != 1:
    raise ValueError(f"D4RT needs the frames of one video at one size; got sizes "
                     f"{sorted(s[:2] for s in shapes)}")
  n = len(images)
  cfg = model.cfg
  if n < cfg.tubelet:
    raise ValueError(f"D4RT needs a video of at least {cfg.tubelet} frames (one "
                     f"{cfg.tubelet}-frame tubelet); got {n}")
  h, w = images[0].shape[:2]
  size = cfg.img_size
  video = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                    for im in images]).astype(np.float32) / 255.0
  frames = np.stack(images).astype(np.float32) / 255.0
  pad = (-n) % cfg.tubelet
  if pad:
    video = np.concatenate([video, np.repeat(video[-1:], pad, 0)])
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, 0)])
  return video, frames, w / h, n


def output_hw(hw: tuple[int, int], resolution: int) -> tuple[int, int]:
  """Map size: the input's, or (``resolution > 0``) its long side brought down to
  ``resolution`` with the aspect ratio kept."""
  h, w = hw
  if resolution <= 0 or max(h, w) <= resolution:
    return h, w
  s = resolution / max(h, w)
  return max(1, round(h * s)), max(1, round(w * s))


def read_queries(path: str) -> np.ndarray:
  """``--queries``: an ``.npz`` with ``queries`` ``(P, 3)`` ``(t, u, v)`` (frame and pixel of
  the input video; the layout of an exported ``tracks.npz``)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--queries {path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as f:
      if "queries" not in f.files:
        raise ValueError(f"--queries {path}: no 'queries' array (has {sorted(f.files)}); "
                         "expected queries (P, 3) (t, u, v) in pixels")
      q = np.asarray(f["queries"], np.float64)
  except (OSError, ValueError) as e:
    if str(e).startswith("--queries"):
      raise
    raise ValueError(f"--queries {path}: not a readable .npz file ({e})") from None
  if q.ndim != 2 or q.shape[1] != 3 or not np.isfinite(q).all():
    raise ValueError(f"--queries {path}: queries must be finite (P, 3) (t, u, v); got "
                     f"{q.shape}")
  return q


def _track_queries(track_queries, num_frames: int, hw: tuple[int, int], grid: int):
  """Pixel ``(t, u, v)`` queries -> ``(pixel (P, 3), normalised (P, 3) (t, u, v))``."""
  h, w = hw
  if track_queries is None:
    if grid <= 0:
      return None, None
    g = R.pixel_grid(grid, grid)
    q = np.concatenate([np.zeros((len(g), 1)), g[:, :1] * w - 0.5, g[:, 1:] * h - 0.5], 1)
  else:
    q = np.asarray(track_queries, np.float64).reshape(-1, 3)
  t = q[:, 0]
  if (t < 0).any() or (t > num_frames - 1).any() or (t != np.round(t)).any():
    raise ValueError(f"track queries ask for frames {sorted(set(t[(t < 0) | (t > num_frames - 1)].tolist()))[:5]}"
                     f"; the video has frames 0 .. {num_frames - 1}")
  bad = (q[:, 1] < -0.5) | (q[:, 1] > w - 0.5) | (q[:, 2] < -0.5) | (q[:, 2] > h - 0.5)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"track query {i} at pixel ({q[i, 1]:g}, {q[i, 2]:g}) lies outside the "
                     f"{w} x {h} frames")
  norm = np.stack([t, (q[:, 1] + 0.5) / w, (q[:, 2] + 0.5) / h], -1)
  return q.astype(np.float32), norm


def _clip_outputs(ans, num_frames: int, hw: tuple[int, int], keep: float) -> dict:
  """Depth, normals, local / world points, cameras of one clip's answer function."""
  h, w = hw
  grid = R.pixel_grid(h, w)
  q = np.concatenate([np.concatenate([R.make_queries(grid, t, t, t), R.make_queries(grid, t, t, 0)])
                      for t in range(num_frames)])
  a = ans(q)
  pts = a["points"].reshape(num_frames, 2, h, w, 3)
  conf = a["confidence"].reshape(num_frames, 2, h, w)
  return {"local_points": pts[:, 0], "world_points": pts[:, 1], "depth": pts[:, 0, ..., 2],
          "depth_conf": conf[:, 0], "normals": a["normal"].reshape(num_frames, 2, h, w, 3)[:, 0],
          "extrinsics": R.extrinsics(ans, num_frames, CAMERA_GRID, ref=0, keep=keep),
          "intrinsics": R.intrinsics(ans, num_frames, hw, CAMERA_GRID)}


def predict(model: nnx.Module, images: list[np.ndarray], *, extrinsics: np.ndarray | None = None,
            intrinsics: np.ndarray | None = None, names: list[str] | None = None,
            mesh: jax.sharding.Mesh | None = None, resolution: int = 256, query_chunk: int = 4096,
            keep: float = 0.85, overlap: int = 0, track_grid: int = 8, queries: str | None = None,
            track_queries: np.ndarray | None = None) -> Prediction:
  """D4RT on the frames of one video (module docstring). ``track_queries`` ``(P, 3)``
  ``(t, u, v)`` pixels (the evaluator's), or ``queries`` (an ``.npz`` path), or a
  ``track_grid`` x ``track_grid`` grid of frame 0 (0: no tracks)."""
  chunk = int(query_chunk)
  if chunk < 1:
    raise ValueError(f"--query-chunk must be >= 1 query; got {query_chunk}")
  if not 0 < float(keep) <= 1:
    raise ValueError(f"--keep must be in (0, 1]; got {keep}")
  if int(overlap) < 0:
    raise ValueError(f"--overlap must be >= 0 frames (0: the default overlap); got {overlap}")
  if int(track_grid) < 0:
    raise ValueError(f"--track-grid must be >= 0 (0: no tracks); got {track_grid}")
  names = list(names) if names is not None else [f"frame {i}" for i in range(len(images))]
  cfg = model.cfg
  video, frames, aspect, n = clip_inputs(model, images)
  hw = output_hw(images[0].shape[:2], int(resolution))
  if queries is not None:
    track_queries = read_queries(queries)
  t0 = time.perf_counter()
  warn = []
  tp, tn = _track_queries(track_queries, n, images[0].shape[:2], int(track_grid))
  total = video.shape[0]
  if total <= cfg.num_frames:
    ans = R.ClipAnswers(model, video, frames=frames, aspect=aspect, chunk=int(chunk))
    out = _clip_outputs(ans, total, hw, float(keep))
    if tn is not None:
      tr = R.tracks(ans, total, tn)
      c2w = np.linalg.inv(out["extrinsics"].astype(np.float64))
      cam = tr["points"].astype(np.float64)
      out["tracks"] = np.einsum("tij,tpj->tpi", c2w[:, :3, :3], cam) + c2w[:, None, :3, 3]
      out["track_visibility"] = tr["visibility"]
  else:
    ov = int(overlap) or max(cfg.tubelet, (cfg.num_frames // 4) // cfg.tubelet * cfg.tubelet)
    if ov % cfg.tubelet or not 0 < ov < cfg.num_frames:
      raise ValueError(f"--overlap must be a positive multiple of {cfg.tubelet} below the clip "
                       f"length {cfg.num_frames}; got {ov}")
    answer_for = lambda s, e: R.ClipAnswers(model, video[s:e], frames=frames[s:e], aspect=aspect,  # noqa: E731
                                            chunk=int(chunk))
    rec = R.reconstruct_long(answer_for, total, cfg.num_frames, ov, hw, grid=CAMERA_GRID,
                             keep=float(keep))
    w2c = rec["extrinsics"]
    cam = np.einsum("tij,thwj->thwi", w2c[:, :3, :3], rec["points"]) + w2c[:, None, None, :3, 3]
    first = R.ClipAnswers(model, video[:cfg.num_frames], frames=frames[:cfg.num_frames],
                          aspect=aspect, chunk=int(chunk))
    k = R.intrinsics(first, cfg.num_frames, hw, CAMERA_GRID)
    out = {"local_points": cam, "world_points": rec["points"], "depth": rec["depth"],
           "depth_conf": rec["confidence"], "normals": None, "extrinsics": w2c,
           "intrinsics": np.broadcast_to(np.median(k, 0), (total, 3, 3))}
    if tn is not None:  # chained from clip to clip through the shared frames
      tr = R.long_tracks(answer_for, total, rec["chunks"], rec["sim3"], tn)
      out["tracks"], out["track_visibility"] = tr["points"], tr["visibility"]
  seconds = time.perf_counter() - t0
  hh, ww = hw
  pixels = np.stack([np.asarray(Image.fromarray(im).resize((ww, hh), Image.BILINEAR))
                     if im.shape[:2] != hw else im for im in images])
  f32 = lambda x: None if x is None else np.asarray(x[:n], np.float32)  # noqa: E731
  pred = Prediction(
      depth=f32(out["depth"]), depth_conf=f32(out["depth_conf"]),
      extrinsics=f32(out["extrinsics"]), intrinsics=f32(out["intrinsics"]),
      world_points=f32(out["world_points"]), images=pixels, names=names,
      input_hw=[tuple(im.shape[:2]) for im in images], seconds=seconds,
      local_points=f32(out["local_points"]), normals=f32(out["normals"]),
      tracks=f32(out.get("tracks")), track_visibility=f32(out.get("track_visibility")),
      track_queries=tp)
  pred.warnings.extend(warn)
  return pred


# ------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class D4RTTask:
  """D4RT training (``configs/d4rt.py``; reference ``d4rt.md`` sections 3-4).

  A batch holds ``B`` clips of ``T`` square frames (uint8) with ``N`` queries each and their
  targets (:func:`geojax.data.transforms.sample_d4rt_queries`). Queries whose target is not
  finite are masked (and counted: ``nonfinite_queries``), so a bad sample never turns into a NaN
  step. Loss: :func:`geojax.losses.d4rt.d4rt_loss` with ``weights``."""
  weights: tuple[tuple[str, float], ...] = ()
  family: str = "d4rt"

  def loss_fn(self, model, batch: dict[str, Any], rng: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    from geojax.losses import d4rt as L
    video = jnp.asarray(batch["images"], jnp.float32) / 255.0
    q = jnp.asarray(batch["queries"], jnp.float32)
    tgt = {k: v for k, v in batch.items() if k.startswith("query_")}
    finite = jnp.isfinite(jnp.asarray(tgt["query_points"], jnp.float32)).all(-1)
    for key in ("query_uv", "query_displacement", "query_normal"):
      if key in tgt:
        finite &= jnp.isfinite(jnp.asarray(tgt[key], jnp.float32)).all(-1)
    finite &= jnp.isfinite(q).all(-1)
    valid = jnp.asarray(tgt["query_valid"], bool) & finite
    for key in ("query_points", "query_uv", "query_displacement", "query_normal"):
      if key in tgt:
        tgt[key] = jnp.where(finite[..., None], jnp.asarray(tgt[key], jnp.float32), 0.0)
    tgt["query_valid"] = valid
    q = jnp.where(jnp.isfinite(q), q, 0.0)
    aspect = jnp.asarray(batch["aspect"], jnp.float32) if "aspect" in batch else 1.0
    pred = model(video, q, aspect=aspect)
    parts = L.d4rt_loss(pred, tgt, dict(self.weights) or None)
    aux = {k: parts[k] for k in L.TERMS + ("l3d",)}
    aux["nonfinite_queries"] = jnp.sum(~finite).astype(jnp.float32)
    aux["valid_queries"] = parts["valid"]
    return parts["total"], aux


def make_task(config) -> D4RTTask:
  """:class:`D4RTTask` from ``config.model.preset``, ``config.data.pipeline`` and
  ``config.loss`` (the clip must fit the preset)."""
  from geojax.losses import d4rt as L
  cfg = d4rt.get_config(config.model.preset)
  pipe = config.data.pipeline
  if pipe.get("family") != "d4rt":
    raise ValueError(f"D4RT trains on query batches: set data.pipeline.family = 'd4rt'; got "
                     f"{pipe.get('family')!r}")
  buckets = [tuple(int(v) for v in b) for b in pipe.get("buckets", ())]
  if any(h != w or h % cfg.patch for h, w in buckets):
    raise ValueError(f"D4RT trains on square clips with sides that are multiples of "
                     f"{cfg.patch}; data.pipeline.buckets = {buckets}")
  lo, hi = int(pipe.get("min_views", 0)), int(pipe.get("max_views", 0))
  if lo != hi or lo % cfg.tubelet or not 0 < lo <= cfg.num_frames:
    raise ValueError(f"D4RT trains on clips of a fixed number of frames, a multiple of the "
                     f"{cfg.tubelet}-frame tubelet and at most {cfg.num_frames}: set "
                     f"data.pipeline.min_views = max_views; got {lo}..{hi}")
  loss = dict(config.get("loss", {}))
  unknown = sorted(set(loss) - {f"w_{k}" for k in L.WEIGHTS})
  if unknown:
    raise ValueError(f"config.loss has unknown fields {unknown}; expected "
                     f"{', '.join('w_' + k for k in L.WEIGHTS)}")
  return D4RTTask(weights=tuple((k[2:], float(v)) for k, v in sorted(loss.items())))


def initialize(model: nnx.Module, init) -> nnx.Module | None:
  """``init.videomae``: the encoder from VideoMAE v2 weights (a ``.safetensors`` file or a
  ``geojax convert --family d4rt`` directory; the paper's start: random initialisation is far
  worse); the aspect embedding and the decoder keep their random start."""
  path = init.get("videomae", "")
  if not path:
    return None
  if init.get("weights") or init.get("checkpoint"):
    raise ValueError("init.videomae starts a new model; it excludes init.weights and "
                     "init.checkpoint")
  from geojax.convert import d4rt as conv
  if not os.path.exists(path):
    raise FileNotFoundError(f"init.videomae {path}: no such file or directory")
  try:
    conv.load_videomae(model, path)
  except ValueError as e:
    raise ValueError(f"init.videomae {path}: {e}") from None
  print(f"D4RT init: encoder from VideoMAE v2 weights {path}", flush=True)
  return model


PREDICT_ARGS = (
    PredictArg(("--resolution",), dict(type=int, default=256,
                                       help="D4RT: long side of the output maps (queries on that "
                                            "pixel grid; 0 = the video's size)")),
    PredictArg(("--query-chunk",), dict(type=int, default=4096,
                                  help="D4RT: queries decoded at a time (answers do not "
                                       "depend on it)")),
    PredictArg(("--keep",), dict(type=float, default=0.85,
                                 help="D4RT: fraction of most confident grid points the camera "
                                      "and chunk alignments use")),
    PredictArg(("--overlap",), dict(type=int, default=0,
                                    help="D4RT: frames shared by consecutive clips of a long "
                                         "video (0 = a quarter of the clip)")),
    PredictArg(("--track-grid",), dict(type=int, default=8,
                                       help="D4RT: track an N x N grid of frame-0 points "
                                            "(0 = none)")),
    PredictArg(("--queries",), dict(default=None, metavar="NPZ",
                                    help="D4RT: track these points instead: an .npz with "
                                         "queries (P, 3) (t, u, v) pixels")),
)


FAMILY = register(Family(
    name="d4rt", build=build, predict=predict, predicts=predicts, presets=d4rt.PRESET_NAMES,
    load_official=load_official, convert_state_dict=convert_state_dict,
    model_types=(d4rt.D4RT,), predict_args=PREDICT_ARGS, make_task=make_task,
    initialize=initialize,
    eval_options=dict(resolution=0, query_chunk=4096, keep=0.85, track_grid=0),
    demo=Demo(config_arg="runlocal", rows=(
        ("depth AbsRel, median-aligned per frame (lower is better)", "abs_rel"),
        ("3D tracks APD3D (higher is better)", "apd3d"),
        ("3D tracks 3D-AJ (higher is better)", "average_jaccard"),
        ("camera ATE after Sim(3) (lower is better)", "ate")))))
