"""The training loop shared by every model family (``train.py`` calls :func:`train`).

One run lives in a *workdir*::

  workdir/
    checkpoints/<step>/   Orbax: train state, Grain iterator state, config (last N + best)
    tensorboard/          TensorBoard event files (scalars, eval metrics, depth pictures)
    eval/step_<N>/        results.json, scenes.csv, pictures/ of each periodic evaluation
    model/                final model checkpoint (EMA if enabled), for evaluate.py / predict
    summary.json          first and last evaluation, steps, seconds (path: config.summary_path)

Order of events: build the mesh and create model and optimizer state directly sharded under the
config's logical-axis rules; resume from the newest complete checkpoint if there is one
(parameters, optimizer, EMA, step and the data iterator's position); then loop over jitted,
donated train steps. SIGTERM makes the loop save a checkpoint at the current step and return
cleanly (``summary["preempted"]``); rerunning the same command resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from geojax.data import pipeline
from geojax.data.pipeline import DataWorkerError
from geojax.parallel import sharding
from geojax.train import optim
from geojax.train.checkpoint import TrainCheckpointer, abstract_like
from geojax.train.step import check_health, init_state, make_train_step, model_from_state
from geojax.train.tasks import make_task

DTYPES = {"float32": None, "bfloat16": "bfloat16", "float16": "float16"}


# ----------------------------------------------------------------------------------- helpers


def _is_chief() -> bool:
  return jax.process_index() == 0


def maybe_initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` when the config names a coordinator (or a cluster
  environment that JAX detects by itself sets ``config.distributed.auto``)."""
  d = config.get("distributed")
  if d is None:
    return
  if d.coordinator_address:
    if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
      raise ValueError(f"distributed: process_id {d.process_id} / num_processes "
                       f"{d.num_processes} are inconsistent")
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes, process_id=d.process_id,
                               initialization_timeout=int(d.timeout_s))
  elif d.auto:
    jax.distributed.initialize()


def model_config(config, family=None) -> dict[str, Any]:
  """The JSON-able family config stored with checkpoints (``registry.Family.build`` input):
  the family's own ``model_config`` if it has one, else ``{"preset", "overrides"}`` with the
  runtime fields ``attn_impl``, ``remat``, ``scan`` and ``dtype``."""
  if family is not None and family.model_config is not None:
    return family.model_config(config.model)
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}; got {m.dtype!r}")
  overrides = dict(attn_impl=m.attn_impl, remat=m.remat, scan=bool(m.scan))
  if DTYPES[m.dtype]:
    overrides["dtype"] = DTYPES[m.dtype]
  return {"preset": m.preset, "overrides": overrides}


def pipeline_config(config) -> pipeline.PipelineConfig:
  d = config.data
  fields = {f.name for f in dataclasses.fields(pipeline.PipelineConfig)}
  given = dict(d.pipeline)
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"config.data.pipeline has unknown fields {unknown}")
  given["batch_size"] = int(config.batch_size)
  given["buckets"] = tuple(tuple(b) for b in given.get("buckets", ((d.height, d.width),)))
  return pipeline.PipelineConfig(**given)


def make_source(data, split: str = "train"):
  """The random-access scene source named by ``data.source``."""
  if data.source == "synthetic":
    return pipeline.SyntheticSource(data.seed, data.num_scenes, data.num_views, data.height,
                                    data.width, dynamic=bool(data.get("dynamic", False)))
  if data.source == "folder":
    from geojax.data.formats.scene_folder import SceneFolderSource
    if not data.path:
      raise ValueError("data.path must name a folder of scene folders for data.source=folder")
    source = SceneFolderSource(data.path, on_error="skip", exif=bool(data.get("exif", True)))
    source[0]  # no readable scene at all: fail now, before the model is built
    return source
  if data.source == "tfds":
    from geojax.data.tfds_builder import load_data_source
    if not data.path:
      raise ValueError("data.path must name a built TFDS dataset folder for data.source=tfds")
    return load_data_source(data.path, split)
  raise ValueError(f"data.source {data.source!r} is not one of synthetic, folder, tfds")


_NUMERIC = "biufc"


def _device_batch(batch: dict, mesh) -> dict:
  """Numeric arrays of a host batch -> global arrays sharded over the batch axes."""
  arrays = {k: v for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in _NUMERIC}
  return pipeline.to_global_batch(arrays, mesh)


class _Preemption:
  """Turns SIGTERM into a flag the loop polls (installed only in the main thread)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _reshard_like(src: nnx.Module, dst: nnx.Module) -> None:
  """Copy ``src``'s parameters into the (sharded) ``dst`` leaf by leaf."""
  s_state, d_state = nnx.state(src), nnx.state(dst)
  s_paths = {p for p, _ in jax.tree_util.tree_leaves_with_path(s_state)}
  d_paths = {p for p, _ in jax.tree_util.tree_leaves_with_path(d_state)}
  if s_paths != d_paths:
    missing = sorted(map(jax.tree_util.keystr, d_paths - s_paths))[:5]
    raise ValueError(f"init weights do not match the model config (missing e.g. {missing})")
  new = jax.tree.map(lambda s, d: jax.device_put(jnp.asarray(s, d.dtype), d.sharding),
                     s_state, d_state)
  nnx.update(dst, new)


def build_model(config, family, mconfig: dict) -> nnx.Module:
  """Random init under the active mesh, then optional initial weights (official or geojax)."""
  model = family.build(mconfig, nnx.Rngs(int(config.seed)))
  init = config.init
  if init.weights and init.checkpoint:
    raise ValueError("init: set either init.weights or init.checkpoint, not both")
  if init.weights:
    if not os.path.exists(init.weights):
      raise FileNotFoundError(f"init.weights {init.weights} does not exist")
    src = family.load_official(init.weights, mconfig)
    _reshard_like(src, model)
    logging.info("initialised from official weights %s", init.weights)
  elif init.checkpoint:
    from geojax.models import registry
    model, _, _ = registry.load_checkpoint(init.checkpoint, family=family.name, into=model,
                                           what="init.checkpoint")
    logging.info("initialised from geojax checkpoint %s", init.checkpoint)
  if family.initialize is not None:  # the family's own init sources (e.g. a weight merge)
    src = family.initialize(model, init)
    if src is not None:
      if init.weights or init.checkpoint:
        raise ValueError("init: the family's merge sources replace init.weights / "
                         "init.checkpoint; set one or the other")
      _reshard_like(src, model)
  return model


# -------------------------------------------------------------------------------- evaluation


def evaluate_model(config, family, mconfig: dict, model: nnx.Module, out_dir: str
                   ) -> dict[str, float]:
  """Score ``model`` on ``config.eval``'s held-out synthetic scenes; writes ``out_dir``."""
  from geojax.data.synthetic import render_scene
  from geojax.eval import evaluator
  e = config.eval
  groups, notes = evaluator.parse_groups(e.metrics, family.predicts(mconfig))
  dynamic = bool(e.get("dynamic", False))
  scenes = ((f"scene_{i:04d}", render_scene(e.seed, i, num_views=e.num_views, height=e.height,
                                            width=e.width, dynamic=dynamic))
            for i in range(e.num_scenes))
  options = dict(depth_align=e.depth_align, pose_thresholds=tuple(e.pose_thresholds),
                 pointcloud_threshold=e.pointcloud_threshold, pointcloud_max_points=100_000,
                 max_depth=0.0, pointmap_align=e.get("pointmap_align", "scale"),
                 depth_scope=e.get("depth_scope", "view"))
  # The family's inference options, with the eval config's values where it sets them.
  opts = {k: e[k] if k in e else v for k, v in family.eval_options.items()}
  if "process_res" in opts:  # the eval scenes' own size
    opts["process_res"] = max(e.height, e.width)
  predict = family.get_predictor(model, opts)
  scene_inputs = None
  if family.eval_inputs is not None:
    scene_inputs = lambda scene: family.eval_inputs(scene, opts)
  out_dir = evaluator.prepare_out_dir(out_dir, overwrite=True)
  rows = evaluator.run(predict, scenes, groups, options, out_dir, bool(e.pictures),
                       scene_inputs=scene_inputs)
  mean = evaluator.aggregate(rows)
  evaluator.write_results(out_dir, rows, mean, {"model": {"family": family.name,
                                                           "config": mconfig},
                                                 "groups": list(groups), "notes": notes})
  return mean


def _log_pictures(tb, out_dir: str, step: int, limit: int) -> None:
  from PIL import Image
  pics = os.path.join(out_dir, "pictures")
  if not os.path.isdir(pics):
    return
  for name in sorted(os.listdir(pics))[:limit]:
    tb.image(f"eval/{os.path.splitext(name)[0]}", np.asarray(Image.open(os.path.join(pics, name))),
             step)


# ----------------------------------------------------------------------------------- the loop


def _format(metrics: dict[str, float], keys=None) -> str:
  keys = keys or sorted(metrics)
  return " ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)


def train(config, workdir: str) -> dict[str, Any]:
  """Train (or resume) the run in ``workdir``; returns the summary dict (also written as JSON).

  The chief process holds ``workdir``'s lock (:mod:`geojax.train.workdir`) for the whole run.

  Raises ``ValueError`` for inconsistent configs, :class:`~geojax.train.workdir.WorkdirBusyError`
  when another live run holds ``workdir``, :class:`~geojax.train.checkpoint.CheckpointWriteError`
  when a checkpoint cannot be written (the previous one stays restorable) and
  ``FloatingPointError`` after ``config.max_bad_in_row`` consecutive non-finite steps.
  """
  from geojax.train.workdir import LOCK_FILE, lock_workdir
  created = not os.path.exists(os.path.abspath(workdir))
  lock = lock_workdir(workdir) if _is_chief() else None
  try:
    return _train(config, workdir)
  except (ValueError, FileNotFoundError, TypeError):  # refused: bad config or data
    # a run refused before it saved anything leaves no workdir behind
    from geojax.train.checkpoint import complete_steps
    kept = set(os.listdir(workdir)) - {LOCK_FILE, "checkpoints", "tensorboard"}
    if created and lock is not None and not kept and not complete_steps(
        os.path.join(workdir, "checkpoints")):
      lock.release()
      lock = None
      import shutil
      shutil.rmtree(workdir, ignore_errors=True)
    raise
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir: str) -> dict[str, Any]:
  from geojax.models import registry
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  family = registry.get_family(config.model.family)
  mconfig = model_config(config, family)
  task = make_task(config)
  pcfg = pipeline_config(config)
  c = config.checkpoint
  if int(c.keep_last) < 1 or c.best_mode not in ("min", "max"):
    raise ValueError(f"checkpoint.keep_last must be >= 1 and checkpoint.best_mode 'min' or "
                     f"'max'; got {c.keep_last} and {c.best_mode!r}")
  if config.init.weights and not os.path.exists(config.init.weights):
    raise FileNotFoundError(f"init.weights {config.init.weights} does not exist")
  total = int(config.total_steps)
  if total < 1:
    raise ValueError(f"total_steps must be >= 1; got {total}")
  accum = int(config.optim.accum_steps)
  if accum < 1 or total % accum:
    raise ValueError(f"total_steps ({total}) must be a multiple of optim.accum_steps ({accum})")
  if int(config.optim.total_steps) not in (total, total // accum):
    raise ValueError(f"optim.total_steps ({config.optim.total_steps}) must equal total_steps "
                     f"({total}); configs tie the two with a FieldReference")
  # total_steps counts batches; with accumulation the schedule counts optimizer updates.
  optim_config = ml_collections.ConfigDict(config.optim.to_dict())
  optim_config.total_steps = total // accum
  optim.learning_rate_schedule(optim_config)  # bad optimizer fields: refused before any build
  if config.init.checkpoint:
    from geojax.io.checkpoint import read_model_info
    held = read_model_info(config.init.checkpoint)["family"]
    if held != family.name:
      raise ValueError(f"init.checkpoint {config.init.checkpoint} holds a {held!r} model, not a "
                       f"{family.name!r} one")
  mesh = sharding.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes))
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.mesh.rules)
  chief = _is_chief()
  os.makedirs(workdir, exist_ok=True)
  summary_path = config.summary_path or os.path.join(workdir, "summary.json")
  saved_config = json.loads(config.to_json())

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    source = make_source(config.data)  # data errors before the model is built
    model = build_model(config, family, mconfig)
    tx = optim.make_optimizer(optim_config, nnx.state(model, nnx.Param))
    ema_decay = float(config.optim.ema_decay)
    graphdef, state = init_state(model, tx, ema=ema_decay > 0)
    del model
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    iterator = pipeline.make_iterator(source, pcfg, seed=int(config.data.seed))
    c = config.checkpoint
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep_last=int(c.keep_last),
                             best_metric=c.best_metric or None, best_mode=c.best_mode,
                             keep_best=int(c.keep_best), async_save=bool(c.async_save))
    start = 0
    history: dict[str, Any] = {}
    data_counts = {k: 0 for k in pipeline.COUNT_KEYS}
    if os.path.exists(summary_path):
      with open(summary_path) as f:
        previous = json.load(f)
      history = previous.get("history", {})
      data_counts.update({k: int(v) for k, v in previous.get("data", {}).items()
                          if k in data_counts})
    if ckpt.latest_step() is not None:
      start = int(ckpt.latest_step())
      state = ckpt.restore(abstract_like(state), data_iterator=iterator)
      logging.info("resumed from %s at step %d", ckpt.directory, start)
      if chief:
        print(f"resumed from step {start} ({ckpt.directory})", flush=True)
    step_fn = make_train_step(graphdef, tx, task.loss_fn, ema_decay=ema_decay)
    # Arrays every step reads but never updates (e.g. a distillation teacher's weights):
    # replicated once, passed to the step as batch entries (arguments, not baked-in constants).
    step_inputs = task.step_inputs() if hasattr(task, "step_inputs") else None
    if step_inputs:
      step_inputs = jax.device_put(step_inputs, NamedSharding(mesh, P()))
    key = jax.random.key(int(config.seed))

    tb = None
    if chief and config.tensorboard:
      from geojax.io.tensorboard import SummaryWriter
      tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if chief:
      print(f"training {family.name} {config.model.preset} ({n_params / 1e6:.2f}M params) on "
            f"mesh {dict(mesh.shape)}: steps {start}->{total}, batch {pcfg.batch_size}, "
            f"workdir {workdir}", flush=True)

    evals: dict[int, dict[str, float]] = {int(k): v for k, v in history.items()}
    can_eval = config.eval.every > 0 or config.eval.at_start or config.eval.at_end
    if can_eval and jax.process_count() > 1:
      logging.warning("periodic evaluation runs single-process only; skipped")
      can_eval = False

    def run_eval(step: int) -> dict[str, float]:
      m = model_from_state(graphdef, state, use_ema=bool(config.eval.use_ema) and ema_decay > 0)
      out_dir = os.path.join(workdir, "eval", f"step_{step:07d}")
      t0 = time.time()
      res = evaluate_model(config, family, mconfig, m, out_dir)
      evals[step] = res
      if chief:
        msg = _format(res, ("abs_rel", "delta1", "auc03", "auc30", "chamfer"))
        print(f"eval @ step {step} ({time.time() - t0:.1f}s): {msg}", flush=True)
        if tb is not None:
          tb.scalars(res, step, prefix="eval")
          _log_pictures(tb, out_dir, step, int(config.eval.tb_pictures))
          tb.flush()
      return res

    def save(step: int, metrics: dict[str, float], force: bool = False) -> None:
      best = dict(metrics)
      if evals:
        best.update(evals[max(evals)])
      ckpt.save(step, state, data_iterator=iterator, config=saved_config, metrics=best,
                force=force)

    if can_eval and config.eval.at_start and start == 0 and 0 not in evals:
      run_eval(0)

    progress = None
    if chief and config.progress:
      from tqdm import tqdm
      progress = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    log = (progress.write if progress is not None else (lambda s: print(s, flush=True)))
    sched = optim.learning_rate_schedule(optim_config)
    step = start
    last: dict[str, float] = {}
    preempted = False
    t_loop = time.time()
    timed_steps, t_timed = 0, None
    bad_data_reported = False
    with _Preemption() as preempt:
      while step < total:
        try:
          host_batch = pipeline.next_batch(iterator)
        except pipeline.DataWorkerError as e:
          done = ckpt.latest_step()
          raise DataWorkerError(f"{e}; stopped at step {step}, " + (
              f"the last checkpoint (step {done}) is intact: rerun to resume" if done is not None
              else "no checkpoint yet")) from None
        except StopIteration:
          log(f"data exhausted at step {step} (data.pipeline.num_epochs); stopping")
          break
        new_bad = 0
        for k in pipeline.COUNT_KEYS:  # non-finite data the pipeline masked or skipped
          n = int(np.sum(host_batch.pop(k, 0)))
          data_counts[k] += n
          new_bad += n
        if new_bad and chief and not bad_data_reported:
          bad_data_reported = True
          log(f"step {step + 1}: non-finite training data: pixels are masked, scenes with "
              "non-finite cameras skipped; counts in the step lines and summary.json 'data'")
        batch = _device_batch(host_batch, mesh)
        if step_inputs:
          batch = dict(batch, **step_inputs)
        state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
        step += 1
        if step == start + 2:  # the first steps include compilation
          t_timed, timed_steps = time.time(), 0
        elif t_timed is not None:
          timed_steps += 1
        if progress is not None:
          progress.update(1)
        if step % config.log_every == 0 or step == total or preempt.requested:
          last = {k: float(v) for k, v in jax.device_get(metrics).items()}
          check_health(last, int(config.max_bad_in_row))
          last["lr"] = float(sched((step - 1) // accum))  # the rate of the last update
          if any(data_counts.values()):
            last.update(masked_px=data_counts["data_masked_pixels"],
                        skipped_scenes=data_counts["data_skipped_scenes"])
          if chief:
            log(f"step {step}/{total} " + _format(last, ("loss", "depth", "ray", "point",
                                                           "camera", "grad", "grad_norm",
                                                           "lr", "skipped", "masked_px",
                                                           "skipped_scenes")))
            if progress is not None:
              progress.set_postfix(loss=f"{last['loss']:.4g}")
            if tb is not None:
              tb.scalars({k: v for k, v in last.items() if k != "finite"}, step, prefix="train")
              if t_timed is not None and timed_steps:
                tb.scalar("perf/steps_per_second", timed_steps / (time.time() - t_timed), step)
              tb.flush()
        if preempt.requested:
          log(f"SIGTERM at step {step}: saving a checkpoint and exiting")
          save(step, last, force=True)
          preempted = True
          break
        periodic = config.eval.every > 0 and step % config.eval.every == 0
        if can_eval and (periodic or (step == total and config.eval.at_end)):
          run_eval(step)
        every = int(config.checkpoint.every)  # 0: only at the end
        if (every > 0 and step % every == 0) or step == total:
          save(step, last)
    ckpt.wait()
    ckpt.close()
    if progress is not None:
      progress.close()
    if not preempted and step == total and config.export_model:  # every process takes part
      from geojax.io import checkpoint as model_ckpt
      m = model_from_state(graphdef, state, use_ema=ema_decay > 0)
      model_ckpt.save_model(os.path.join(workdir, "model"), m, family.name, mconfig,
                            overwrite=True)
    if tb is not None:
      tb.close()

  seconds = time.time() - t_start
  steps_per_s = timed_steps / (time.time() - t_timed) if t_timed and timed_steps else float("nan")
  first = evals[min(evals)] if evals else {}
  final = evals[max(evals)] if evals else {}
  def pick(m, prefix=""):
    out = {k: m[prefix + k] for k in ("abs_rel", "delta1", "auc03", "auc30", "edge_chamfer",
                                      "edge_flying_ratio") if prefix + k in m}
    if prefix + "normal_mean" in m:
      out["normal_mean_deg"] = m[prefix + "normal_mean"]
    for k in ("ate", "track_apd3d", "track_average_jaccard", "track_occlusion_accuracy"):
      if prefix + k in m:  # video models: camera trajectory and 3D tracks (TAPVid-3D)
        out[k.removeprefix("track_")] = m[prefix + k]
    return out
  summary = {"before": pick(first), "after": pick(final), "steps": step,
             "seconds": round(seconds, 1), "preempted": preempted,
             "steps_per_second": None if math.isnan(steps_per_s) else round(steps_per_s, 3),
             "final_train": last, "data": dict(data_counts),
             "history": {str(k): v for k, v in sorted(evals.items())}}
  if pick(final, "prior_"):  # a refiner's coarse input, scored on the same images
    summary = {"prior": pick(final, "prior_"), **summary}
  if chief:
    os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
    tmp = summary_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(tmp, summary_path)
  return summary


# ------------------------------------------------------------------------------ the command


def run(config, workdir: str, prog: str = "train.py") -> int:
  """``train.py``'s body: train and print the outcome. Returns the exit status: 0 done or
  preempted; 2 bad input or config (one line); 1 a fault that stopped the run (one line: a
  checkpoint write failed, a data worker died), after which a rerun resumes from the newest
  complete checkpoint."""
  import sys

  from geojax.runtime import enable_compilation_cache, tune_host_allocator
  from geojax.train.checkpoint import CheckpointWriteError
  tune_host_allocator()
  one_line = lambda e: " ".join(str(e).split())
  try:
    maybe_initialize_distributed(config)
    enable_compilation_cache()
    summary = train(config, workdir)
  except (CheckpointWriteError, DataWorkerError) as e:
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return 1
  except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return 2
  if summary.get("preempted"):
    print(f"stopped by SIGTERM at step {summary['steps']}; rerun the same command to resume")
  else:
    keys = ("abs_rel", "auc30")
    fmt = lambda m: ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m) or "-"
    print(f"done: {summary['steps']} steps in {summary['seconds']:.0f}s; "
          f"eval before: {fmt(summary['before'])}; after: {fmt(summary['after'])}")
  return 0
