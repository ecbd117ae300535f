"""Grain input pipelines for multi-view geometry training (DA3, URGT, D4RT, PPD families).

Chain (all on ``grain.MapDataset``, so every element is a pure function of its index and the
iterator state is just a position)::

  MapDataset.source(source)            # random access over scenes (SyntheticSource, SceneFolderSource)
    [process_index::process_count]     # per-host shard of the scenes (disjoint, covering)
    .shuffle(seed)  .repeat(num_epochs)  # reshuffled every epoch (train only)
    .map_with_index(SceneTransform)    # views, bucket resize / crop, jitter, family targets
    .batch(per_host_batch, drop_remainder=True)
    .to_iter_dataset(ReadOptions)  [.mp_prefetch(MultiprocessingOptions(num_workers))]

Static shapes: the resolution bucket ``(H, W)``, the number of views ``S`` and the URGT GridMix grid
``n`` are drawn from ``np.random.default_rng([seed, batch_index, ...])``, a function of the batch
index only, so every sample of a batch (and every host's part of a global batch) shares them while
batches vary. Per-sample randomness (views, crop, colour jitter, queries) uses
``default_rng([seed, process_index, element_index, ...])``. Same seed -> identical batches.

Batches are dicts of NumPy arrays with a leading batch axis ``B`` (per host): ``images``
(B, S, H, W, 3) uint8, ``depth`` (B, S, H, W) float32, ``valid`` (B, S, H, W) bool, ``normals``
(B, S, H, W, 3), ``intrinsics`` (B, S, 3, 3) px (pixel-centre convention, updated exactly),
``extrinsics`` (B, S, 4, 4) w2c, ``scene_index`` (B,) int64 (index into the source),
``view_index`` (B, S) int32, plus the family extras (see :class:`PipelineConfig.family`).
Training batches also carry ``data_masked_pixels`` and ``data_skipped_scenes`` (B,) int64: the
non-finite pixels masked in each sample and the unusable scenes (non-finite cameras) skipped to
reach it (:class:`FiniteSource`).
:func:`to_global_batch` places one onto a mesh with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import grain
import numpy as np

from geojax.data import transforms as T
from geojax.data.synthetic import render_scene

FAMILIES = ("da3", "urgt", "d4rt", "ppd")
VIEW_ORDERS = ("ordered", "random", "first", "strided")
PPD_RANGES = ("symmetric", "unit", "ppd")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Configuration of :func:`make_dataset` (validated on construction; errors name the field).

  Attributes:
    patch_size: ViT patch size; every bucket side must be a multiple of it (14).
    buckets: resolution buckets ``((H, W), ...)``; each batch uses one, chosen per batch index with
      ``bucket_weights`` (uniform when ``None``). Scenes are resized to cover and cropped.
    bucket_weights: optional sampling weights of the buckets.
    min_views, max_views: per-batch number of views ``S ~ U{min_views..max_views}`` (DA3: 2..18).
    view_order: ``"ordered"`` (random subset, increasing order), ``"random"`` (random subset and
      order), ``"first"`` (views 0..S-1) or ``"strided"`` (every k-th frame from a random start,
      k random: videos).
    batch_size: **global** batch size; each host gets ``batch_size // process_count``.
    num_epochs: train epochs (``None``: infinite); eval splits always read one epoch.
    augment: colour jitter (train only); same factors for all views of a scene.
    brightness, contrast, saturation: jitter factors ``U[1 - x, 1 + x]``; hue: shift ``U[-x, x]`` turns.
    random_crop: random (train) instead of centred crop after the bucket resize.
    crop_area: (train, with ``random_crop``) a random-resized crop instead: a box of area
      fraction ``U[crop_area]`` and aspect ratio (width / height) log-uniform in ``crop_aspect``,
      the same for every view, resized to the bucket (the aspect ratio may change; D4RT clips get
      the box's ``aspect`` for the aspect token). ``None`` (default): aspect-preserving fit.
    zoom_prob, zoom_factor: with a ``crop_area`` crop, the probability that the box zooms in
      over the clip (view 0 the drawn box, the last view the same centre with sides
      ``U[zoom_factor]`` as long, linear in between; per-view intrinsics).
    color_drop_prob: (train, with ``augment``) probability that the clip turns grey (one draw
      per clip). blur_prob, blur_sigma: probability of a Gaussian blur with sigma
      ``U[blur_sigma]`` pixels, the same for every view.
    family: extra targets. ``"da3"``: none. ``"urgt"``: GridMix -- the bucket image is a
      ``gridmix_size``^2 lattice of patches of (H/4, W/4); per batch a grid ``n`` in 1..4 is drawn
      with ``gridmix_probs`` and each sample keeps a random contiguous n x n block (images
      (B, S, nH/4, nW/4, 3); ``grid_n``, ``grid_origin`` (B, 2) lattice cell, ``grid_patch_hw``).
      ``"d4rt"``: ``num_queries`` queries per clip (``queries`` (B, N, 5), ``query_pixels``,
      ``query_near_edge`` and the targets ``query_points``, ``query_uv``, ``query_visible``,
      ``query_displacement``, ``query_normal``, ... with their masks; see
      :func:`geojax.data.transforms.sample_d4rt_queries`), drawn after the views are chosen,
      resized, cropped and colour-jittered, so every target matches the clip the model sees. ``"ppd"``: ``depth_encoded`` (B, S, H, W)
      = log(d + 1) normalised by the per-view ``ppd_quantiles`` into ``ppd_range``
      (``"symmetric"`` [-1, 1] by default, ``"unit"`` [0, 1], ``"ppd"`` [-1, 0.5] as released),
      with ``depth_q_lo`` / ``depth_q_hi`` (B, S) for the inverse.
    num_workers: Grain worker processes (``mp_prefetch``); 0 reads in the main process.
    worker_buffer_size: batches buffered per worker.
    read_threads, read_buffer_size: Grain ``ReadOptions`` (threads per process, prefetch).
  """

  patch_size: int = 14
  buckets: tuple[tuple[int, int], ...] = ((280, 504),)
  bucket_weights: tuple[float, ...] | None = None
  min_views: int = 2
  max_views: int = 6
  view_order: str = "ordered"
  batch_size: int = 4
  num_epochs: int | None = None
  augment: bool = True
  brightness: float = 0.2
  contrast: float = 0.2
  saturation: float = 0.2
  hue: float = 0.02
  random_crop: bool = True
  crop_area: tuple[float, float] | None = None
  crop_aspect: tuple[float, float] = (0.75, 4 / 3)
  zoom_prob: float = 0.0
  zoom_factor: tuple[float, float] = (0.5, 0.9)
  color_drop_prob: float = 0.0
  blur_prob: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  family: str = "da3"
  gridmix_probs: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
  gridmix_size: int = 4
  num_queries: int = 2048
  edge_fraction: float = 0.3
  same_time_prob: float = 0.4
  edge_threshold: float = 0.05
  ppd_quantiles: tuple[float, float] = (0.02, 0.98)
  ppd_max_depth: float = 80.0
  ppd_range: str = "symmetric"
  num_workers: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 1
  read_buffer_size: int = 4

  def __post_init__(self):
    object.__setattr__(self, "buckets", tuple((int(h), int(w)) for h, w in self.buckets))
    if self.bucket_weights is not None:
      object.__setattr__(self, "bucket_weights", tuple(float(x) for x in self.bucket_weights))
    object.__setattr__(self, "gridmix_probs", tuple(float(x) for x in self.gridmix_probs))
    object.__setattr__(self, "ppd_quantiles", tuple(float(x) for x in self.ppd_quantiles))
    for f in ("crop_area", "crop_aspect", "zoom_factor", "blur_sigma"):
      v = getattr(self, f)
      if v is not None:
        try:
          v = tuple(float(x) for x in v)
        except (TypeError, ValueError):
          raise ValueError(f"PipelineConfig.{f}: expected a pair of numbers (lo, hi); got {v!r}")
        object.__setattr__(self, f, v)
    self.validate()

  def validate(self) -> None:
    """Raise ``ValueError`` naming the first offending field."""
    def bad(field, msg):
      raise ValueError(f"PipelineConfig.{field}: {msg}")

    if self.patch_size < 1:
      bad("patch_size", f"must be >= 1; got {self.patch_size}")
    if not self.buckets:
      bad("buckets", "needs at least one (H, W) bucket")
    unit = self.patch_size * (self.gridmix_size if self.family == "urgt" else 1)
    for b in self.buckets:
      if len(b) != 2 or min(b) < 1 or b[0] % unit or b[1] % unit:
        bad("buckets", f"bucket {b} must be positive multiples of {unit} (patch_size "
            f"{self.patch_size}{' x gridmix_size' if self.family == 'urgt' else ''})")
    if self.bucket_weights is not None and (len(self.bucket_weights) != len(self.buckets)
                                            or min(self.bucket_weights) < 0 or sum(self.bucket_weights) <= 0):
      bad("bucket_weights", "needs one non-negative weight per bucket, with a positive sum")
    if self.min_views < 1:
      bad("min_views", f"must be >= 1; got {self.min_views}")
    if self.min_views > self.max_views:
      bad("min_views", f"min_views ({self.min_views}) > max_views ({self.max_views})")
    if self.view_order not in VIEW_ORDERS:
      bad("view_order", f"must be one of {VIEW_ORDERS}; got {self.view_order!r}")
    if self.batch_size < 1:
      bad("batch_size", f"must be >= 1; got {self.batch_size}")
    if self.num_epochs is not None and self.num_epochs < 1:
      bad("num_epochs", f"must be None or >= 1; got {self.num_epochs}")
    for f in ("brightness", "contrast", "saturation"):
      if not 0 <= getattr(self, f) < 1:
        bad(f, f"must be in [0, 1); got {getattr(self, f)}")
    if not 0 <= self.hue <= 0.5:
      bad("hue", f"must be in [0, 0.5]; got {self.hue}")
    def pair(f, lo, hi, strict_lo=False):
      v = getattr(self, f)
      if (len(v) != 2 or not v[0] <= v[1] or not hi >= v[1] or
          not (v[0] > lo if strict_lo else v[0] >= lo)):
        bad(f, f"needs {lo} {'<' if strict_lo else '<='} lo <= hi <= {hi}; got {v}")
    if self.crop_area is not None:
      pair("crop_area", 0.0, 1.0, strict_lo=True)
    pair("crop_aspect", 0.0, float("inf"), strict_lo=True)
    pair("zoom_factor", 0.0, 1.0, strict_lo=True)
    pair("blur_sigma", 0.0, float("inf"))
    for f in ("zoom_prob", "color_drop_prob", "blur_prob"):
      if not 0 <= getattr(self, f) <= 1:
        bad(f, f"must be in [0, 1]; got {getattr(self, f)}")
    if self.family not in FAMILIES:
      bad("family", f"must be one of {FAMILIES}; got {self.family!r}")
    if (len(self.gridmix_probs) != self.gridmix_size or min(self.gridmix_probs) < 0
        or sum(self.gridmix_probs) <= 0):
      bad("gridmix_probs", f"needs {self.gridmix_size} non-negative probabilities; got {self.gridmix_probs}")
    if self.num_queries < 1:
      bad("num_queries", f"must be >= 1; got {self.num_queries}")
    for f in ("edge_fraction", "same_time_prob"):
      if not 0 <= getattr(self, f) <= 1:
        bad(f, f"must be in [0, 1]; got {getattr(self, f)}")
    lo, hi = self.ppd_quantiles
    if not 0 <= lo < hi <= 1:
      bad("ppd_quantiles", f"needs 0 <= lo < hi <= 1; got {self.ppd_quantiles}")
    if self.ppd_range not in PPD_RANGES:
      bad("ppd_range", f"must be one of {PPD_RANGES}; got {self.ppd_range!r}")
    if self.num_workers < 0:
      bad("num_workers", f"must be >= 0; got {self.num_workers}")
    if self.read_threads < 1:
      bad("read_threads", f"must be >= 1; got {self.read_threads}")

  def replace(self, **kw) -> PipelineConfig:
    """A copy with fields replaced (validated)."""
    return dataclasses.replace(self, **kw)


class SyntheticSource:
  """Grain random-access source over :func:`geojax.data.synthetic.render_scene`.

  ``source[i]`` renders scene ``i`` of family ``seed`` (deterministic, picklable) with
  ``num_views`` views of ``height x width``; the dict is that of ``render_scene``.
  """

  def __init__(self, seed: int, num_scenes: int, num_views: int, height: int, width: int,
               dynamic: bool = False):
    if num_scenes < 1:
      raise ValueError(f"SyntheticSource: num_scenes must be >= 1; got {num_scenes}")
    self.seed, self.num_scenes, self.num_views = int(seed), int(num_scenes), int(num_views)
    self.height, self.width, self.dynamic = int(height), int(width), bool(dynamic)

  def __len__(self) -> int:
    return self.num_scenes

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_scenes:
      raise IndexError(f"scene {index} out of range [0, {self.num_scenes})")
    kw = {"dynamic": True} if self.dynamic else {}
    return render_scene(self.seed, index, num_views=self.num_views, height=self.height,
                        width=self.width, **kw)

  def __repr__(self) -> str:
    return (f"SyntheticSource(seed={self.seed}, num_scenes={self.num_scenes}, num_views="
            f"{self.num_views}, {self.height}x{self.width}, dynamic={self.dynamic})")


class FiniteSource:
  """Wraps a training source so no non-finite value reaches a batch (see
  :func:`geojax.data.transforms.mask_non_finite`).

  Non-finite pixels are masked; a scene whose cameras (or other per-view values) are not finite
  is skipped: the next good scene (wrapping around) takes its place, so the source keeps its
  length and stays deterministic, and an absl warning names it once per process. Every element
  carries the counts, ``data_masked_pixels`` and ``data_skipped_scenes`` (int64 scalars), which
  travel with the batch (also out of worker processes): the trainer sums and reports them.
  """

  def __init__(self, source):
    self.source = source
    self._bad: dict[int, str] = {}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self.source)
    index = int(index) % n
    for j in range(n):
      i = (index + j) % n
      if i in self._bad:
        continue
      scene, masked, problem = T.mask_non_finite(dict(self.source[i]))
      if problem is None:
        scene["data_masked_pixels"] = np.int64(masked)
        scene["data_skipped_scenes"] = np.int64(j)
        return scene
      self._bad[i] = problem
      from absl import logging
      name = scene.get("scene", i)
      logging.warning("training data: skipping scene %s: %s", name, problem)
    raise ValueError(f"no usable training scene: all {n} have non-finite cameras or poses "
                     f"(e.g. scene {next(iter(self._bad))}: {next(iter(self._bad.values()))})")


COUNT_KEYS = ("data_masked_pixels", "data_skipped_scenes")


class DataWorkerError(RuntimeError):
  """A data worker process died (killed, crashed); raised instead of a hang or a bare trace."""


def next_batch(iterator, where: str = "training data") -> dict:
  """``next(iterator)``, with a dead worker process reported as one :class:`DataWorkerError`.

  Grain notices a worker that exits without a result (the out-of-memory killer, a segfault in
  a decoder, ``kill -9``) within seconds; this names it as a data worker, says how it died and
  what usually helps, and closes the iterator so its other workers stop.
  """
  try:
    return next(iterator)
  except RuntimeError as e:
    msg = str(e)
    if "Worker process" not in msg and "worker process" not in msg:
      raise
    import re
    import signal
    m = re.search(r"exit code (-?\d+)", msg)
    code = int(m.group(1)) if m else None
    if code is not None and code < 0:
      try:
        how = f"was killed by {signal.Signals(-code).name}"
      except ValueError:
        how = f"was killed by signal {-code}"
    elif code is not None:
      how = f"exited with status {code}"
    else:
      how = "died"
    hint = ("; SIGKILL is usually the out-of-memory killer: lower data.pipeline.num_workers or "
            "worker_buffer_size, or give the job more memory" if code == -9 else "")
    try:
      iterator.close()
    except Exception:  # noqa: BLE001 - the worker is gone; closing is best effort
      pass
    raise DataWorkerError(f"{where}: a data worker process (Grain mp_prefetch) {how}{hint}"
                          ) from None


class IndexedSource:
  """Wraps a source so each element carries ``scene_index`` (its index in the wrapped source)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    scene = dict(self.source[int(index)])
    scene["scene_index"] = np.int64(index)
    return scene


def batch_plan(config: PipelineConfig, seed: int, batch_index: int) -> dict[str, Any]:
  """Shape-determining choices of batch ``batch_index``: ``bucket`` (H, W), ``num_views`` and
  (URGT) ``grid_n``. A pure function of ``(config, seed, batch_index)``, identical on all hosts."""
  rng = np.random.default_rng([int(seed), int(batch_index), 0x5EED])
  w = None
  if config.bucket_weights is not None:
    w = np.asarray(config.bucket_weights) / sum(config.bucket_weights)
  bucket = config.buckets[int(rng.choice(len(config.buckets), p=w))]
  num_views = int(rng.integers(config.min_views, config.max_views + 1))
  grid_n = T.sample_gridmix(rng, config.gridmix_probs) if config.family == "urgt" else None
  return {"bucket": bucket, "num_views": num_views, "grid_n": grid_n}


class SceneTransform:
  """``(element_index, scene) -> sample``: view sampling, bucket fit, jitter and family targets.

  ``element_index`` is the position in this host's stream, so the batch is
  ``element_index // per_host_batch`` (see :func:`batch_plan`).
  """

  def __init__(self, config: PipelineConfig, seed: int, per_host_batch: int, train: bool,
               process_index: int = 0):
    self.config, self.seed, self.per_host_batch = config, int(seed), int(per_host_batch)
    self.train, self.process_index = bool(train), int(process_index)

  def __call__(self, index: int, scene: dict) -> dict:
    cfg = self.config
    counts = {k: np.int64(scene[k]) for k in COUNT_KEYS if k in scene}
    scene = {k: v for k, v in scene.items() if k not in COUNT_KEYS}
    plan = batch_plan(cfg, self.seed, index // self.per_host_batch)
    rng = np.random.default_rng([self.seed, self.process_index, int(index), 0xDA7A])
    n_avail = scene["images"].shape[0]
    order = cfg.view_order if self.train else "first"
    views = T.sample_views(n_avail, plan["num_views"], rng, order)
    out = T.select_views(scene, views)
    hb, wb = plan["bucket"]
    aspect = wb / hb
    if self.train and cfg.random_crop and cfg.crop_area is not None:
      hw = out["images"].shape[1:3]
      box = T.sample_crop_box(rng, hw, cfg.crop_area, cfg.crop_aspect)
      boxes = np.tile(np.asarray(box), (out["images"].shape[0], 1))
      if cfg.zoom_prob > 0 and rng.uniform() < cfg.zoom_prob:
        boxes = T.zoom_boxes(box, len(boxes), rng.uniform(*cfg.zoom_factor), hw)
      out = T.crop_resize_views(out, boxes, (hb, wb))
      aspect = box[3] / box[2]
    else:
      out = T.fit_to_bucket(out, (hb, wb), rng if (self.train and cfg.random_crop) else None)
    if self.train and cfg.augment:
      params = T.sample_color_jitter(rng, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
      out["images"] = T.apply_color_jitter(out["images"], params)
      if cfg.color_drop_prob > 0 and rng.uniform() < cfg.color_drop_prob:
        out["images"] = T.color_drop(out["images"])
      if cfg.blur_prob > 0 and rng.uniform() < cfg.blur_prob:
        out["images"] = T.random_blur(out["images"], rng.uniform(*cfg.blur_sigma))
    if cfg.family == "urgt":
      out = T.gridmix_crop(out, plan["grid_n"], rng if self.train else None, cfg.gridmix_size)
    elif cfg.family == "d4rt":
      out.update(T.sample_d4rt_queries(out, rng, cfg.num_queries, cfg.edge_fraction,
                                       cfg.same_time_prob, cfg.edge_threshold))
      out["aspect"] = np.float32(aspect)  # W / H of what the square clip shows (aspect token)
    elif cfg.family == "ppd":
      enc, q_lo, q_hi = T.encode_depth_ppd(out["depth"], out["valid"], quantiles=cfg.ppd_quantiles,
                                           max_depth=cfg.ppd_max_depth, out_range=cfg.ppd_range)
      out.update(depth_encoded=enc, depth_q_lo=q_lo, depth_q_hi=q_hi)
    out["view_index"] = views.astype(np.int32)
    out["scene_index"] = np.int64(scene.get("scene_index", -1))
    out.update(counts)
    return {k: np.asarray(v) for k, v in out.items()}


def _process_index_count(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # local: keeps worker processes free of JAX initialisation until needed
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def make_dataset(source, config: PipelineConfig, *, seed: int, split: str = "train",
                 process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
  """The batched per-host ``grain.MapDataset`` (see module docstring for the chain).

  ``split="train"``: shuffled per epoch, repeated ``config.num_epochs`` times (``None``: forever),
  random crops, colour jitter. Any other split: source order, one epoch, centred crops, views
  ``0..S-1``, no jitter. ``process_index`` / ``process_count`` default to JAX's. Each host reads
  the scenes ``process_index::process_count``; its batch is ``config.batch_size // process_count``.
  """
  if not isinstance(config, PipelineConfig):
    raise TypeError(f"config must be a PipelineConfig; got {type(config).__name__}")
  p, n = _process_index_count(process_index, process_count)
  if config.batch_size % n:
    raise ValueError(f"PipelineConfig.batch_size: {config.batch_size} is not divisible by "
                     f"process_count {n}")
  per_host = config.batch_size // n
  train = split == "train"
  ds = grain.MapDataset.source(FiniteSource(IndexedSource(source)) if train else
                               IndexedSource(source))
  ds = ds[p::n]
  if len(ds) == 0:
    raise ValueError(f"source has {len(source)} scenes, too few for {n} processes")
  if train:
    ds = ds.shuffle(seed=int(seed)).repeat(config.num_epochs)
  ds = ds.map_with_index(SceneTransform(config, seed, per_host, train, p))
  return ds.batch(per_host, drop_remainder=True)


def make_iter_dataset(source, config: PipelineConfig, *, seed: int, split: str = "train",
                      process_index: int | None = None,
                      process_count: int | None = None) -> grain.IterDataset:
  """:func:`make_dataset` as a ``grain.IterDataset`` with threads and, if ``config.num_workers``,
  worker processes (``mp_prefetch``). Worker processes need absl flags parsed; when they are not
  (e.g. under pytest), they are marked parsed with their defaults."""
  ds = make_dataset(source, config, seed=seed, split=split, process_index=process_index,
                    process_count=process_count)
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                             prefetch_buffer_size=config.read_buffer_size))
  if config.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                       per_worker_buffer_size=config.worker_buffer_size))
  return ids


def make_iterator(source, config: PipelineConfig, *, seed: int, split: str = "train",
                  process_index: int | None = None, process_count: int | None = None,
                  state: dict | None = None) -> grain.DatasetIterator:
  """A checkpointable ``grain.DatasetIterator`` over batches; ``state`` (from ``get_state()`` or
  :func:`restore_iterator_state`) resumes at that position."""
  it = iter(make_iter_dataset(source, config, seed=seed, split=split, process_index=process_index,
                              process_count=process_count))
  if state is not None:
    it.set_state(state)
  return it


# --------------------------------------------------------------------------- iterator state


def save_iterator_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
  """Write ``iterator.get_state()`` as JSON to ``path`` (a file; parent folders are created).

  For Orbax, use ``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)``
  inside ``ocp.args.Composite`` (one ``process_i-of-n.json`` per host).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(iterator.get_state(), f)
  os.replace(tmp, path)


def restore_iterator_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> grain.DatasetIterator:
  """Set ``iterator`` to the state saved by :func:`save_iterator_state`; returns it."""
  with open(path) as f:
    iterator.set_state(json.load(f))
  return iterator


# ---------------------------------------------------------------------------- device placement


def batch_sharding(mesh, batch_axes=None):
  """``NamedSharding`` splitting the leading (batch) axis over ``batch_axes`` (default: the
  ``"batch"`` rule of :data:`geojax.parallel.sharding.DEFAULT_RULES`, i.e. ``("data", "fsdp")``,
  restricted to axes the mesh has)."""
  import jax
  from geojax.parallel.sharding import DEFAULT_RULES

  if batch_axes is None:
    batch_axes = dict(DEFAULT_RULES)["batch"]
  if isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, jax.P(axes if axes else None))


def to_global_batch(batch: dict, mesh, batch_axes=None) -> dict:
  """Per-host NumPy batch -> global ``jax.Array`` s sharded over the batch axis
  (``jax.make_array_from_process_local_data``); global batch = per-host batch x process_count."""
  import jax

  sharding = batch_sharding(mesh, batch_axes)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def device_iterator(iterator, mesh, batch_axes=None) -> Iterator[dict]:
  """Yield :func:`to_global_batch` of each batch of ``iterator`` (keep ``iterator`` for state)."""
  for batch in iterator:
    yield to_global_batch(batch, mesh, batch_axes)
