"""D4RT's per-query training objective (paper section 3 and App. A; reference ``d4rt.md`` section 3).

For the ``N`` queries of a clip (predictions from :func:`geojax.models.d4rt.readout`, targets from
:func:`geojax.data.transforms.sample_d4rt_queries`)::

  L = (1 / N_valid) sum_i [ c_i l3d_i - w_conf log c_i + w_2d l2d_i + w_vis lvis_i
                            + w_disp ldisp_i + w_normal lnormal_i ]

* ``l3d``: L1 (summed over x, y, z) between ``signlog(P / mean_z(P))`` and
  ``signlog(G / mean_z(G))``, ``signlog(x) = sign(x) log(1 + |x|)``, each point set divided by its
  own mean depth over the clip's valid queries (prediction: the mean of ``|z|``, floored at
  ``1e-6``, so an untrained network cannot divide by zero). The depth normalisation makes the
  loss invariant to the scale of the prediction.
* ``c = 1 + exp(raw)`` (the read-out) weighs ``l3d`` with a ``-log c`` penalty (Kendall & Gal).
* ``l2d``: L1 of the normalised image position in frame ``t_tgt`` (where the point is in front
  of that camera); ``lvis``: binary cross-entropy of the visibility logit; ``ldisp``: L1 of the
  motion ``X(t_tgt) - X(t_src)`` in the ``t_cam`` frame after the same per-clip depth
  normalisation (prediction by its mean depth, target by the GT's); ``lnormal``: ``1 - cos``
  where the GT normal exists.

Every term is zero on invalid queries; the sum is divided by the clip's number of valid queries
and averaged over the batch. Weights: the paper's (``WEIGHTS``; which of the first two is 1.0
is a reconstruction, see the reference).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

WEIGHTS = {"3d": 1.0, "2d": 0.1, "vis": 0.1, "disp": 0.1, "conf": 0.2, "normal": 0.5}
TERMS = ("3d", "2d", "vis", "disp", "normal", "conf")


def signlog(x: jax.Array) -> jax.Array:
  """``sign(x) log(1 + |x|)``."""
  return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def _mean_depth(points: jax.Array, mask: jax.Array, floor: float = 1e-6) -> jax.Array:
  """Per-clip mean of ``|z|`` over the mask, ``(B, 1, 1)``."""
  m = mask.astype(points.dtype)
  z = jnp.sum(jnp.abs(points[..., 2]) * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)
  return jnp.maximum(z, floor)[:, None, None]


def d4rt_loss(pred: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
              weights: Mapping[str, float] | None = None) -> dict[str, jax.Array]:
  """The composite loss of a batch of clips.

  Args:
    pred: :func:`geojax.models.d4rt.readout` of the decoder, ``(B, N, .)``: ``points``, ``uv``,
      ``visibility_logit`` (B, N), ``displacement``, ``normal`` (unit), ``confidence`` (B, N),
      >= 1.
    batch: targets ``query_points`` (B, N, 3), ``query_valid`` (B, N); optional (their terms are
      skipped when absent) ``query_uv`` + ``query_uv_valid``, ``query_visible``,
      ``query_displacement``, ``query_normal`` + ``query_normal_valid``.
    weights: overrides of :data:`WEIGHTS`.

  Returns:
    ``total`` (the loss), each weighted term's batch mean (``3d`` is ``c l3d``, ``conf`` is
    ``-w_conf log c``), the unweighted mean ``l3d`` and ``valid`` (the mean number of valid
    queries per clip).
  """
  w = dict(WEIGHTS)
  if weights:
    unknown = sorted(set(weights) - set(WEIGHTS))
    if unknown:
      raise ValueError(f"d4rt_loss: unknown weights {unknown}; expected some of {sorted(WEIGHTS)}")
    w.update({k: float(v) for k, v in weights.items()})
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  valid = jnp.asarray(batch["query_valid"], bool)
  vf = valid.astype(jnp.float32)
  n_valid = jnp.maximum(jnp.sum(vf, -1), 1.0)  # (B,)
  p, g = f32(pred["points"]), f32(batch["query_points"])
  sp, sg = _mean_depth(p, valid), _mean_depth(g, valid)
  l3d = jnp.sum(jnp.abs(signlog(p / sp) - signlog(g / sg)), -1)
  conf = f32(pred["confidence"])
  per = {"3d": w["3d"] * conf * l3d, "conf": -w["conf"] * jnp.log(conf)}
  masks = {"3d": vf, "conf": vf}
  if "query_uv" in batch:
    m = valid & jnp.asarray(batch.get("query_uv_valid", valid), bool)
    per["2d"] = w["2d"] * jnp.sum(jnp.abs(f32(pred["uv"]) - f32(batch["query_uv"])), -1)
    masks["2d"] = m.astype(jnp.float32)
  if "query_visible" in batch:
    logit = f32(pred["visibility_logit"])
    y = jnp.asarray(batch["query_visible"], jnp.float32)
    bce = jnp.maximum(logit, 0) - logit * y + jnp.log1p(jnp.exp(-jnp.abs(logit)))
    per["vis"], masks["vis"] = w["vis"] * bce, vf
  if "query_displacement" in batch:
    d = jnp.abs(f32(pred["displacement"]) / sp - f32(batch["query_displacement"]) / sg)
    per["disp"], masks["disp"] = w["disp"] * jnp.sum(d, -1), vf
  if "query_normal" in batch:
    m = valid & jnp.asarray(batch.get("query_normal_valid", valid), bool)
    cos = jnp.sum(f32(pred["normal"]) * f32(batch["query_normal"]), -1)
    per["normal"], masks["normal"] = w["normal"] * (1.0 - cos), m.astype(jnp.float32)
  out = {}
  total = 0.0
  for k in TERMS:
    if k not in per:
      out[k] = jnp.zeros((), jnp.float32)
      continue
    term = jnp.sum(jnp.where(masks[k] > 0, per[k], 0.0), -1) / n_valid  # (B,)
    out[k] = jnp.mean(term)
    total = total + term
  out["total"] = jnp.mean(total)
  out["l3d"] = jnp.mean(jnp.sum(l3d * vf, -1) / n_valid)
  out["valid"] = jnp.mean(jnp.sum(vf, -1))
  return out
