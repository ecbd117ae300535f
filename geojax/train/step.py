"""Train state and the jitted train step shared by every model family.

The model is split once into a static ``graphdef``, its parameters (``nnx.Param``) and the rest
of its variables; the train state holds only arrays, so it can be donated, sharded and
checkpointed with Orbax. ``loss_fn(model, batch, rng) -> (loss, aux)`` is family-specific
(a family's objective around its forward, see :mod:`geojax.train.tasks`).

Non-finite guard: when the loss or the global gradient norm is not finite, the update is
skipped (parameters, optimizer state and EMA keep their values), ``skipped`` and
``bad_in_row`` count it, and the caller stops after ``max_bad_in_row`` (see
:func:`check_health`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from geojax.train.optim import ema_update


@struct.dataclass
class TrainState:
  """Arrays of one training run (a pytree).

  Attributes:
    step: optimizer steps taken (int32 scalar; skipped steps do not count).
    params: ``nnx.State`` of the model's ``nnx.Param`` variables.
    rest: ``nnx.State`` of every other model variable (empty for most models).
    opt_state: the Optax state.
    ema: exponential moving average of ``params`` or None.
    skipped: updates skipped because of a non-finite loss or gradient (total).
    bad_in_row: consecutive skipped updates.
  """
  step: jax.Array
  params: Any
  rest: Any
  opt_state: Any
  ema: Any
  skipped: jax.Array
  bad_in_row: jax.Array


def init_state(model: nnx.Module, tx: optax.GradientTransformation, *, ema: bool = False
               ) -> tuple[nnx.GraphDef, TrainState]:
  """``(graphdef, state)`` for ``model``; the optimizer state follows the params' sharding."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = jax.jit(tx.init)(params)
  ema_tree = jax.tree.map(jnp.copy, params) if ema else None
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
  return graphdef, TrainState(step=zero(), params=params, rest=rest, opt_state=opt_state,
                              ema=ema_tree, skipped=zero(), bad_in_row=zero())


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict]],
                    *, ema_decay: float = 0.0, donate: bool = True):
  """``step(state, batch, rng) -> (state, metrics)``: two ``jax.jit`` programs, the loss and
  gradients (one compilation per batch shape) and the optimizer update (one compilation).

  ``loss_fn`` receives dict batches with ``train_step`` (the state's int32 step) added.
  ``metrics`` holds ``loss``, ``grad_norm``, ``finite`` (bool), ``skipped``, ``bad_in_row`` and
  every scalar of the loss's ``aux`` dict. The incoming state is donated unless ``donate`` is
  False.
  """

  def gradients(state: TrainState, batch, rng):
    if isinstance(batch, dict):  # schedules inside the loss (e.g. a teacher switch)
      batch = dict(batch, train_step=state.step)

    def objective(params):
      model = nnx.merge(graphdef, params, state.rest)
      loss, aux = loss_fn(model, batch, rng)
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return loss, grads, {k: v for k, v in aux.items() if jnp.ndim(v) == 0}

  def update(state: TrainState, loss, grads):
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    ema = state.ema
    if ema is not None:
      ema = keep(ema_update(ema, params, ema_decay), ema)
    bad = jnp.where(finite, 0, state.bad_in_row + 1).astype(jnp.int32)
    new = state.replace(step=state.step + finite.astype(jnp.int32), params=params,
                        opt_state=opt_state, ema=ema,
                        skipped=state.skipped + (~finite).astype(jnp.int32), bad_in_row=bad)
    return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                 "skipped": new.skipped, "bad_in_row": bad}

  # Two programs: the gradients (compiled once per batch shape) and the update (compiled once):
  # a task whose batches come in several shapes (view counts, buckets, GridMix grids) does not
  # recompile the optimizer for each.
  grad_fn = jax.jit(gradients)
  update_fn = jax.jit(update, donate_argnums=(0,) if donate else ())

  def step(state: TrainState, batch, rng):
    loss, grads, aux = grad_fn(state, batch, rng)
    new, metrics = update_fn(state, loss, grads)
    metrics.update(aux)
    return new, metrics

  return step


def check_health(metrics: dict, max_bad_in_row: int) -> None:
  """Raise ``FloatingPointError`` after ``max_bad_in_row`` consecutive non-finite steps."""
  bad = int(metrics["bad_in_row"])
  if max_bad_in_row > 0 and bad >= max_bad_in_row:
    raise FloatingPointError(
        f"training stopped: {bad} consecutive steps had a non-finite loss or gradient "
        f"(last loss {float(metrics['loss'])}, grad norm {float(metrics['grad_norm'])}); "
        "lower the learning rate, check the data, or raise train.max_bad_in_row")


def model_from_state(graphdef: nnx.GraphDef, state: TrainState, *, use_ema: bool = False
                     ) -> nnx.Module:
  """The model with the state's parameters (or their EMA)."""
  params = state.ema if use_ema and state.ema is not None else state.params
  return nnx.merge(graphdef, params, state.rest)
