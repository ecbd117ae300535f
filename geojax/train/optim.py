"""Optax optimizer construction shared by every geojax model family.

Everything is driven by an ``ml_collections.ConfigDict`` (``config.optim``; see
:func:`default_optim_config` for the fields). The public entry points are

* :func:`default_optim_config` -- the documented default ``config.optim``;
* :func:`learning_rate_schedule` -- ``step -> lr`` (linear warm-up, then cosine or constant);
* :func:`param_labels` -- a pytree of group labels (``"frozen"``, ``"decay/lr_x1.0"``,
  ``"no_decay/lr_x0.1"``, ...) with the structure of the parameter tree, for inspection;
* :func:`weight_decay_mask` / :func:`is_no_decay` -- the weight-decay rule;
* :func:`make_optimizer` -- the full ``optax.GradientTransformation``;
* :func:`ema_update` / :func:`init_ema` -- parameter EMA held *outside* the optimizer state.

Parameter paths
  A parameter's path is its pytree key path joined by ``"/"`` (dict keys, attribute names and
  sequence indices; a trailing ``.value`` of an ``nnx.Variable`` is dropped), e.g.
  ``backbone/vit/stacks/0/layers/norm1/scale``. Pure dicts (``nnx.to_pure_dict``), ``nnx.State``
  of ``nnx.Param`` variables and the pure-array states ``nnx.Optimizer`` passes to Optax all give
  the same paths, so the same optimizer works with ``optax.apply_updates`` on a pure dict and with
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

Weight-decay rule (:func:`is_no_decay`)
  A parameter gets **no** weight decay when any of the following holds, otherwise it is decayed:

  1. its leaf name is ``bias``, ``scale``, ``gamma`` or ``beta`` (norm affine parameters, biases,
     LayerScale gammas) -- the name is used rather than ``ndim`` because layer stacks built with
     ``nnx.vmap`` carry a leading layer axis (a stacked bias is 2-D);
  2. a path component is a normalisation module: ``norm``, ``norm1``, ``q_norm``,
     ``token_norm``, ``LayerNorm_0``, ``layer_norm``, ``rms_norm``, ``group_norm``, ... (regex
     ``(?i)^(\\w*_)?(layer|group|batch|rms)?_?norm(_?\\d+)?$``; ``normal_head`` does not match);
  3. a path component is a LayerScale module (``ls1``, ``ls2``, ``layer_scale``, ``layerscale``);
  4. a path component is a learned token: ``token``/``tokens`` or ending in ``_token(s)``
     (``cls_token``, ``camera_token``, ``register_tokens``, ``mask_token``);
  5. a path component is a position embedding (``pos_embed``, ``pos_embedding``, ``posemb``,
     ``position_embedding(s)``, ``pos_emb``, ``rel_pos_*``, ``abs_pos_*``);
  6. the array has ``ndim <= 1`` (scalars and vectors);
  7. the path matches one of the extra regexes in ``config.optim.no_decay``.

  Matrices, conv kernels and embedding tables (``kernel``, ``embedding``) are decayed.

Learning-rate multipliers and freezing
  ``config.optim.lr_multipliers`` is a tuple of ``(regex, multiplier)`` pairs searched
  (``re.search``, anchor with ``^``/``$`` if needed) in the path; the **first** match wins, no match
  means ``1.0``. A path matching any regex in ``config.optim.frozen``, or whose multiplier is ``0``,
  is *frozen*: its update is ``optax.set_to_zero()`` and no optimizer state is kept for it (its
  gradient is also zeroed before clipping, so frozen gradients do not enter the global norm).
  Trainable parameters are grouped by ``(decay?, multiplier)`` with ``optax.multi_transform``; each
  group runs its own AdamW (or SGD) chain whose learning rate is ``schedule(step) * multiplier``.
  Weight decay is decoupled and scaled by the group's learning rate (``optax.adamw`` semantics:
  ``p <- p - lr * m * (adam_update + wd * p)``).

Transformation order
  ``[MultiSteps(accum_steps)](chain(zero frozen grads, clip_by_global_norm(clip_norm),
  multi_transform({group: chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)})))``.
  With gradient accumulation the schedule counts *optimizer* steps (one per ``accum_steps``
  micro-batches) and the accumulated gradient is the mean of the micro-batch gradients.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

__all__ = [
    "SCHEDULES",
    "OPTIMIZERS",
    "FROZEN_LABEL",
    "default_optim_config",
    "learning_rate_schedule",
    "param_path",
    "param_paths",
    "is_no_decay",
    "weight_decay_mask",
    "lr_multiplier_tree",
    "param_labels",
    "make_optimizer",
    "init_ema",
    "ema_update",
]

SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")
FROZEN_LABEL = "frozen"

_NO_DECAY_LEAVES = frozenset({"bias", "scale", "gamma", "beta"})
_NORM_RE = re.compile(r"(?i)^(\w*_)?(layer|group|batch|rms)?_?norm(_?\d+)?$")
_LAYERSCALE_RE = re.compile(r"(?i)^(ls\d*|layer_?scale\d*)$")
_TOKEN_RE = re.compile(r"(?i)^(\w*_)?tokens?$")
_POS_RE = re.compile(
    r"(?i)^(pos_?embed(ding)?s?|pos_?emb|posemb\w*|position_?embed(ding)?s?"
    r"|(rel|abs)_pos\w*)$"
)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def default_optim_config() -> ml_collections.ConfigDict:
  """Returns the default ``config.optim`` ConfigDict.

  Fields:
    name: ``"adamw"`` (default) or ``"sgd"`` (heavy-ball momentum, decoupled weight decay).
    lr: peak learning rate (after warm-up).
    schedule: ``"cosine"`` (linear warm-up from 0, then cosine decay to ``lr * end_lr_factor`` at
      ``total_steps``) or ``"constant"`` (linear warm-up from 0, then constant ``lr``).
    warmup_steps: number of linear warm-up steps (0 = none); ``lr(0) = 0`` when > 0.
    total_steps: total optimizer steps including warm-up (end of the cosine decay).
    end_lr_factor: final learning rate as a fraction of ``lr`` (cosine only).
    b1, b2, eps: Adam moment decay rates and epsilon (torch defaults 0.9, 0.999, 1e-8).
    momentum: SGD momentum (``name="sgd"`` only; 0 = plain SGD).
    weight_decay: decoupled weight decay coefficient (torch AdamW default is 1e-2; Optax's is 1e-4,
      so always set it explicitly). Applied only where :func:`is_no_decay` is False.
    no_decay: extra regexes; a matching parameter path gets no weight decay.
    clip_norm: global-norm gradient clipping threshold (0 = off).
    lr_multipliers: tuple of ``(regex, multiplier)``; first match on the ``/``-joined path wins,
      default 1.0; multiplier 0 freezes the parameter.
    frozen: tuple of regexes; matching parameters are frozen (no update, no optimizer state).
    ema_decay: parameter EMA decay (0 = off); used by the training loop with :func:`ema_update`.
    accum_steps: gradient accumulation micro-steps per optimizer step (1 = off), via
      ``optax.MultiSteps``.
  """
  c = ml_collections.ConfigDict()
  c.name = "adamw"
  c.lr = 1e-4
  c.schedule = "cosine"
  c.warmup_steps = 0
  c.total_steps = 100_000
  c.end_lr_factor = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.momentum = 0.0
  c.weight_decay = 0.05
  c.no_decay = ()
  c.clip_norm = 1.0
  c.lr_multipliers = ()
  c.frozen = ()
  c.ema_decay = 0.0
  c.accum_steps = 1
  return c


def _optim_cfg(config: Any) -> Any:
  """Returns ``config.optim`` if present, else ``config`` itself (an optim ConfigDict)."""
  if isinstance(config, ml_collections.ConfigDict) and "optim" in config:
    return config.optim
  if isinstance(config, Mapping) and "optim" in config:
    return config["optim"]
  if not isinstance(config, (Mapping, ml_collections.ConfigDict)) and hasattr(config, "optim"):
    return config.optim
  return config


def _get(cfg: Any, name: str) -> Any:
  """Reads field ``name`` of ``cfg`` falling back to :func:`default_optim_config`."""
  try:
    if isinstance(cfg, Mapping) or isinstance(cfg, ml_collections.ConfigDict):
      if name in cfg:
        return cfg[name]
    elif hasattr(cfg, name):
      return getattr(cfg, name)
  except (KeyError, AttributeError):
    pass
  return default_optim_config()[name]


def _field_error(name: str, msg: str) -> ValueError:
  return ValueError(f"config.optim.{name}: {msg}")


def _compile(name: str, idx: int, pattern: Any) -> re.Pattern[str]:
  """Compiles a regex from config field ``name[idx]`` or raises ``ValueError`` naming it."""
  if not isinstance(pattern, str):
    raise _field_error(f"{name}[{idx}]", f"expected a regex string, got {pattern!r}")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise _field_error(f"{name}[{idx}]", f"invalid regex {pattern!r}: {e}") from None


def _float(cfg: Any, name: str, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> float:
  """Reads a float field and checks its range; raises ``ValueError`` naming the field."""
  v = _get(cfg, name)
  try:
    f = float(v)
  except (TypeError, ValueError):
    raise _field_error(name, f"expected a number, got {v!r}") from None
  if not math.isfinite(f):
    raise _field_error(name, f"must be finite, got {f}")
  if lo is not None and (f < lo or (lo_open and f == lo)):
    raise _field_error(name, f"must be {'>' if lo_open else '>='} {lo}, got {f}")
  if hi is not None and (f > hi or (hi_open and f == hi)):
    raise _field_error(name, f"must be {'<' if hi_open else '<='} {hi}, got {f}")
  return f


def _int(cfg: Any, name: str, *, lo: int) -> int:
  """Reads an integer field ``>= lo``; raises ``ValueError`` naming the field."""
  v = _get(cfg, name)
  if isinstance(v, bool) or not isinstance(v, (int,)) and not (
      isinstance(v, float) and v.is_integer()):
    raise _field_error(name, f"expected an integer, got {v!r}")
  i = int(v)
  if i < lo:
    raise _field_error(name, f"must be >= {lo}, got {i}")
  return i


class _Rules:
  """Compiled, validated per-parameter rules of an optim config."""

  def __init__(self, cfg: Any):
    mults = _get(cfg, "lr_multipliers") or ()
    if isinstance(mults, (str, bytes)) or not isinstance(mults, Sequence):
      raise _field_error("lr_multipliers", f"expected a tuple of (regex, multiplier), got {mults!r}")
    self.multipliers: list[tuple[re.Pattern[str], float]] = []
    for i, item in enumerate(mults):
      if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
        raise _field_error(f"lr_multipliers[{i}]", f"expected (regex, multiplier), got {item!r}")
      pat = _compile("lr_multipliers", i, item[0])
      try:
        m = float(item[1])
      except (TypeError, ValueError):
        raise _field_error(f"lr_multipliers[{i}]", f"multiplier must be a number, got {item[1]!r}") from None
      if not math.isfinite(m) or m < 0:
        raise _field_error(f"lr_multipliers[{i}]", f"multiplier must be finite and >= 0, got {m}")
      self.multipliers.append((pat, m))
    self.frozen = [_compile("frozen", i, p) for i, p in enumerate(_seq(cfg, "frozen"))]
    self.no_decay = [_compile("no_decay", i, p) for i, p in enumerate(_seq(cfg, "no_decay"))]

  def multiplier(self, path: str) -> float:
    """Learning-rate multiplier of ``path`` (0.0 when frozen)."""
    if any(p.search(path) for p in self.frozen):
      return 0.0
    for pat, m in self.multipliers:
      if pat.search(path):
        return m
    return 1.0


def _seq(cfg: Any, name: str) -> tuple[Any, ...]:
  """Reads a tuple-of-strings field (a bare string is rejected)."""
  v = _get(cfg, name) or ()
  if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
    raise _field_error(name, f"expected a tuple of regex strings, got {v!r}")
  return tuple(v)


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def learning_rate_schedule(config: Any) -> optax.Schedule:
  """Builds ``step -> learning rate`` from ``config.optim`` (or an optim ConfigDict).

  ``cosine``: ``lr * t / W`` for ``t < W`` (``W = warmup_steps``), then
  ``lr * (f + (1 - f) * 0.5 * (1 + cos(pi * (t - W) / (T - W))))`` with ``f = end_lr_factor``,
  ``T = total_steps``, and ``lr * f`` for ``t >= T``. ``constant``: same warm-up, then ``lr``.

  Raises:
    ValueError: naming the offending field (unknown schedule, negative steps, warm-up longer
      than ``total_steps``, ...).
  """
  cfg = _optim_cfg(config)
  name = _get(cfg, "schedule")
  if name not in SCHEDULES:
    raise _field_error("schedule", f"unknown schedule {name!r}; expected one of {SCHEDULES}")
  lr = _float(cfg, "lr", lo=0.0)
  warmup = _int(cfg, "warmup_steps", lo=0)
  if name == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  total = _int(cfg, "total_steps", lo=1)
  if warmup >= total:
    raise _field_error("warmup_steps", f"must be < total_steps ({total}) for the cosine schedule, got {warmup}")
  end = _float(cfg, "end_lr_factor", lo=0.0, hi=1.0)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total, end_value=lr * end)


# --------------------------------------------------------------------------------------------
# Paths, labels, masks
# --------------------------------------------------------------------------------------------


def _key_str(k: Any) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return str(k.name)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def param_path(key_path: Sequence[Any]) -> str:
  """Joins a JAX key path with ``"/"``; a trailing ``value`` attribute (nnx.Variable) is dropped."""
  keys = list(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_str(k) for k in keys)


def _map_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """``tree_map_with_path`` with the ``/``-joined path string (``None`` leaves kept as None)."""
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(param_path(kp), x), tree)


def param_paths(params_tree: Any) -> list[str]:
  """Lists the ``/``-joined paths of all leaves of ``params_tree`` (flatten order)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params_tree)
  return [param_path(kp) for kp, _ in leaves]


def is_no_decay(path: str, ndim: int | None = None, extra: Sequence[re.Pattern[str] | str] = ()) -> bool:
  """Returns True when the parameter at ``path`` must get no weight decay (module docstring rule).

  Args:
    path: ``/``-joined parameter path.
    ndim: the array's rank, or None if unknown (rule 6 then does not apply).
    extra: additional regexes (strings or compiled) searched in ``path``.
  """
  parts = [p for p in path.split("/") if p]
  if parts and parts[-1] in _NO_DECAY_LEAVES:
    return True
  for part in parts:
    if _NORM_RE.match(part) or _LAYERSCALE_RE.match(part) or _TOKEN_RE.match(part) or _POS_RE.match(part):
      return True
  if ndim is not None and ndim <= 1:
    return True
  return any(re.search(p, path) for p in extra)


def _ndim(x: Any) -> int | None:
  shape = getattr(x, "shape", None)
  return None if shape is None else len(shape)


def weight_decay_mask(params_tree: Any, config: Any = None) -> Any:
  """Pytree of bools, True where weight decay applies (see :func:`is_no_decay`)."""
  rules = _Rules(_optim_cfg(config) if config is not None else default_optim_config())
  return _map_paths(lambda p, x: not is_no_decay(p, _ndim(x), rules.no_decay), params_tree)


def lr_multiplier_tree(params_tree: Any, config: Any) -> Any:
  """Pytree of float learning-rate multipliers (0.0 = frozen) for each parameter."""
  rules = _Rules(_optim_cfg(config))
  return _map_paths(lambda p, x: rules.multiplier(p), params_tree)


def _label(decay: bool, mult: float) -> str:
  if mult == 0.0:
    return FROZEN_LABEL
  return f"{'decay' if decay else 'no_decay'}/lr_x{float(mult)!r}"


def _labels_fn(rules: _Rules, use_decay: bool) -> Callable[[Any], Any]:
  def fn(tree: Any) -> Any:
    def leaf(path: str, x: Any) -> str:
      decay = use_decay and not is_no_decay(path, _ndim(x), rules.no_decay)
      return _label(decay, rules.multiplier(path))
    return _map_paths(leaf, tree)
  return fn


def param_labels(params_tree: Any, config: Any) -> Any:
  """Pytree of group labels with the structure of ``params_tree``.

  Labels are ``"frozen"`` or ``"{decay|no_decay}/lr_x{multiplier}"``, e.g. ``"decay/lr_x1.0"``,
  ``"no_decay/lr_x0.1"``. With ``weight_decay == 0`` every trainable label is ``no_decay``.

  Raises:
    ValueError: naming the field for a malformed ``lr_multipliers``/``frozen``/``no_decay``.
  """
  cfg = _optim_cfg(config)
  rules = _Rules(cfg)
  wd = _float(cfg, "weight_decay", lo=0.0)
  return _labels_fn(rules, wd > 0)(params_tree)


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def _group_tx(cfg: Any, name: str, schedule: optax.Schedule, decay: bool, mult: float,
              wd: float) -> optax.GradientTransformation:
  """AdamW / SGD chain of one (decay, multiplier) parameter group."""
  parts: list[optax.GradientTransformation] = []
  if name == "adamw":
    b1 = _float(cfg, "b1", lo=0.0, hi=1.0, hi_open=True)
    b2 = _float(cfg, "b2", lo=0.0, hi=1.0, hi_open=True)
    eps = _float(cfg, "eps", lo=0.0)
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  else:
    momentum = _float(cfg, "momentum", lo=0.0, hi=1.0, hi_open=True)
    if momentum > 0:
      parts.append(optax.trace(decay=momentum))
  if decay and wd > 0:
    parts.append(optax.add_decayed_weights(wd))
  group_lr = schedule if mult == 1.0 else (lambda step: schedule(step) * mult)
  parts.append(optax.scale_by_learning_rate(group_lr))
  return optax.chain(*parts)


def make_optimizer(config: Any, params_tree: Any = None) -> optax.GradientTransformation:
  """Builds the geojax optimizer from ``config.optim`` (or an optim ConfigDict directly).

  Args:
    config: a ConfigDict with an ``optim`` field, or the optim ConfigDict itself; missing fields
      take :func:`default_optim_config` values.
    params_tree: the parameter pytree (pure dict, ``nnx.State`` of ``nnx.Param`` or any pytree of
      arrays / ``ShapeDtypeStruct``). Used to create only the parameter groups that occur; when
      None, groups for every configured multiplier are created. Labels are recomputed from the
      tree passed to ``init``/``update`` (so ``nnx.Optimizer``'s Variable and pure-array states
      both work); that tree must have the same paths.

  Returns:
    An ``optax.GradientTransformation`` (``MultiSteps``-wrapped when ``accum_steps > 1``).

  Raises:
    ValueError: naming the offending ``config.optim`` field.
  """
  cfg = _optim_cfg(config)
  name = _get(cfg, "name")
  if name not in OPTIMIZERS:
    raise _field_error("name", f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
  schedule = learning_rate_schedule(cfg)
  rules = _Rules(cfg)
  wd = _float(cfg, "weight_decay", lo=0.0)
  clip = _float(cfg, "clip_norm", lo=0.0)
  accum = _int(cfg, "accum_steps", lo=1)
  _float(cfg, "ema_decay", lo=0.0, hi=1.0, hi_open=True)  # validated here, used by the loop.

  labels_fn = _labels_fn(rules, wd > 0)
  if params_tree is not None:
    used = set(jax.tree_util.tree_leaves(labels_fn(params_tree)))
  else:
    mults = {1.0} | {m for _, m in rules.multipliers}
    used = {_label(d, m) for m in mults for d in (True, False)}
    if rules.frozen:
      used.add(FROZEN_LABEL)

  transforms: dict[str, optax.GradientTransformation] = {}
  for label in sorted(used):
    if label == FROZEN_LABEL:
      transforms[label] = optax.set_to_zero()
      continue
    kind, mult_s = label.split("/lr_x")
    transforms[label] = _group_tx(cfg, name, schedule, kind == "decay", float(mult_s), wd)

  parts: list[optax.GradientTransformation] = []
  if FROZEN_LABEL in used:
    # Zero frozen gradients first so they do not contribute to the clipping norm.
    frozen_mask = lambda tree: jax.tree_util.tree_map(lambda l: l == FROZEN_LABEL, labels_fn(tree))
    parts.append(optax.masked(optax.set_to_zero(), frozen_mask))
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.multi_transform(transforms, labels_fn))
  tx = optax.chain(*parts)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
  return tx


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


def init_ema(params: Any) -> Any:
  """Returns a copy of ``params`` to start the EMA from."""
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
  """One EMA step: ``ema <- decay * ema + (1 - decay) * params`` per leaf (jit-able).

  ``decay`` may be a Python float or a traced scalar (e.g. a warm-up of the decay). Floating
  leaves keep the EMA's dtype; non-floating leaves (counters) are copied from ``params``. The EMA
  is held outside the optimizer state, updated after ``optax.apply_updates``; ``decay = 0`` gives
  ``params`` back.
  """
  def leaf(e: jax.Array, p: jax.Array) -> jax.Array:
    e = jnp.asarray(e)
    p = jnp.asarray(p)
    if not jnp.issubdtype(e.dtype, jnp.floating):
      return p
    ct = jnp.promote_types(e.dtype, jnp.float32)
    d = jnp.asarray(decay, dtype=ct)
    out = d * e.astype(ct) + (1.0 - d) * p.astype(ct)
    return out.astype(e.dtype)
  return jax.tree_util.tree_map(leaf, ema_params, params)
