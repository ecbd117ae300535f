"""Flow matching on a linear ("lerp") schedule with integer timesteps (Pixel-Perfect Depth's
``LinearSchedule`` / ``Timesteps`` / ``EulerSampler`` / ``LogitNormalTrainingTimesteps``;
reference ``ppd.md`` section 3).

* Schedule: ``x_t = (1 - t/T) x_0 + (t/T) x_T`` with ``T = 1000``; ``x_0`` the clean sample,
  ``x_T`` the noise (``t = T`` is pure noise). The network predicts the velocity
  ``v = x_T - x_0``; :func:`from_velocity` inverts ``x_t`` to ``(x_0, x_T)``.
* Sampling timesteps (:func:`sampling_timesteps`): ``round_half_even(arange(T, -1,
  -(T + 1) / steps))`` in float32 (4 steps: 1000, 750, 500, 249), each followed by the next one
  and ``-1`` after the last.
* Euler step (:func:`euler_step`) in the official order of operations: ``x_0``, ``x_T`` from
  ``v``, then ``x_s = (1 - s/T) x_0 + (s/T) x_T`` with ``s`` clamped to ``[0, T]``, and ``x_0``
  itself after the last step.
* Training timesteps (:func:`logit_normal_timesteps`): ``round_half_even(T * sigmoid(z))``,
  ``z ~ N(loc, scale^2)``, as integers.

Timesteps are integers divided as float32 (``t / T``), like the reference's integer tensors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

T = 1000


def sampling_timesteps(steps: int, num_train: int = T) -> tuple[np.ndarray, np.ndarray]:
  """``(timesteps, next)`` int32 ``(steps,)`` of the Euler sampler (``next[-1] = -1``)."""
  steps = int(steps)
  if steps < 1:
    raise ValueError(f"sampling steps must be >= 1; got {steps}")
  t = np.arange(num_train, -1, -(num_train + 1) / steps, dtype=np.float64).astype(np.float32)
  t = np.round(t).astype(np.int32)  # numpy rounds half to even, as torch.round
  if len(t) != steps:  # float steps of arange can add an element; the reference never does
    raise ValueError(f"{steps} steps give {len(t)} timesteps")
  return t, np.append(t[1:], -1).astype(np.int32)


def _frac(t: jax.Array, num_train: int, ndim: int) -> jax.Array:
  t = jnp.asarray(t, jnp.float32) / jnp.float32(num_train)
  return t.reshape(t.shape + (1,) * (ndim - t.ndim)) if t.ndim else t


def noised(x0: jax.Array, noise: jax.Array, t: jax.Array, num_train: int = T) -> jax.Array:
  """``x_t = (1 - t/T) x_0 + (t/T) noise``; ``t`` a scalar or per-sample ``(B,)``."""
  w = _frac(t, num_train, x0.ndim)
  return (1 - w) * x0 + w * noise


def from_velocity(v: jax.Array, x_t: jax.Array, t: jax.Array, num_train: int = T
                  ) -> tuple[jax.Array, jax.Array]:
  """Predicted ``(x_0, x_T)`` from a velocity ``v`` at ``x_t``: ``x_t - (t/T) v`` and
  ``x_t + (1 - t/T) v``."""
  b = _frac(t, num_train, x_t.ndim)
  return x_t - b * v, x_t + (1 - b) * v


def euler_step(v: jax.Array, x_t: jax.Array, t: jax.Array, s: jax.Array,
               num_train: int = T) -> jax.Array:
  """One Euler step from timestep ``t`` to ``s`` (``s < 0``: the final step, giving ``x_0``)."""
  x0, xT = from_velocity(v, x_t, t, num_train)
  s_arr = jnp.asarray(s)
  xs = noised(x0, xT, jnp.clip(s_arr, 0, num_train), num_train)
  keep = s_arr.reshape(s_arr.shape + (1,) * (x_t.ndim - s_arr.ndim)) if s_arr.ndim else s_arr
  xs = jnp.where(keep >= 0, xs, x0)
  return jnp.where(keep <= num_train, xs, xT)


def timesteps_from_normal(z: jax.Array, num_train: int = T) -> jax.Array:
  """Integer training timesteps from standard-normal draws ``z`` (already shifted / scaled):
  ``round_half_even(T * sigmoid(z))`` with sigmoid clipped to ``[tiny, 1 - eps]`` (the
  reference's one-dimensional ``LogisticNormal``)."""
  f = jnp.finfo(jnp.float32)
  p = jnp.clip(jax.nn.sigmoid(jnp.asarray(z, jnp.float32)), f.tiny, 1 - f.eps)
  return jnp.round(p * jnp.float32(num_train)).astype(jnp.int32)


def logit_normal_timesteps(key: jax.Array, shape, loc: float = 0.0, scale: float = 1.0,
                           num_train: int = T) -> jax.Array:
  """Logit-normal integer timesteps in ``[0, T]`` of ``shape``."""
  z = loc + scale * jax.random.normal(key, shape, jnp.float32)
  return timesteps_from_normal(z, num_train)
