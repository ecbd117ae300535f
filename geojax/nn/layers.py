"""Small layers whose defaults follow PyTorch, so that converted weights give the same numbers.

Everything here is channels-last (NHWC). Every parameter carries logical axis names
(``nnx.with_partitioning`` metadata) which :mod:`geojax.parallel.sharding` maps to mesh axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = jnp.dtype | None

# ImageNet normalisation of RGB in [0, 1] (DINOv2 inputs).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _axes(init, names):
  return nnx.with_partitioning(init, names)


def linear(din: int, dout: int, *, rngs: nnx.Rngs, bias: bool = True, dtype: Dtype = None,
           axes: tuple[str | None, str | None] = ("embed", "mlp")) -> nnx.Linear:
  """``torch.nn.Linear`` equivalent; kernel stored (in, out)."""
  return nnx.Linear(
      din, dout, use_bias=bias, dtype=dtype, rngs=rngs,
      kernel_init=_axes(nnx.initializers.lecun_normal(), axes),
      bias_init=_axes(nnx.initializers.zeros_init(), (axes[1],)))


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype: Dtype = None,
               axis_name: str | None = "embed") -> nnx.LayerNorm:
  """``torch.nn.LayerNorm`` equivalent: explicit eps and exact (two-pass) variance."""
  return nnx.LayerNorm(
      dim, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs,
      scale_init=_axes(nnx.initializers.ones_init(), (axis_name,)),
      bias_init=_axes(nnx.initializers.zeros_init(), (axis_name,)))


def conv(cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding: int | None = None, bias: bool = True, dtype: Dtype = None) -> nnx.Conv:
  """``torch.nn.Conv2d`` equivalent with torch's symmetric zero padding (default ``kernel // 2``).

  flax's ``"SAME"`` pads (0, 1) for a stride-2 conv on even inputs, which breaks parity; the
  padding here is always explicit.
  """
  p = kernel // 2 if padding is None else padding
  return nnx.Conv(
      cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
      padding=((p, p), (p, p)), use_bias=bias, dtype=dtype, rngs=rngs,
      kernel_init=_axes(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
      bias_init=_axes(nnx.initializers.zeros_init(), ("conv_out",)))


class ConvTransposeStrided(nnx.Module):
  """``torch.nn.ConvTranspose2d`` with ``stride == kernel_size`` and no padding (DPT x2/x4).

  Each input pixel writes one non-overlapping ``k x k`` block, so the op is an einsum and a
  reshape, exact by construction. Kernel layout ``(in, k, k, out)``; torch stores
  ``(in, out, k, k)``.
  """

  def __init__(self, cin: int, cout: int, k: int, *, rngs: nnx.Rngs, dtype: Dtype = None):
    self.k = k
    self.dtype = dtype
    init = _axes(nnx.initializers.lecun_normal(in_axis=0, out_axis=3),
                 ("conv_in", None, None, "conv_out"))
    self.kernel = nnx.Param(init(rngs.params(), (cin, k, k, cout)))
    self.bias = nnx.Param(_axes(nnx.initializers.zeros_init(), ("conv_out",))(
        rngs.params(), (cout,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    kern, bias = self.kernel[...], self.bias[...]
    if self.dtype is not None:
      x, kern, bias = x.astype(self.dtype), kern.astype(self.dtype), bias.astype(self.dtype)
    y = jnp.einsum("bhwc,cijo->bhiwjo", x, kern)
    y = y.reshape(b, h * self.k, w * self.k, -1)
    return y + bias


class LayerScale(nnx.Module):
  """Per-channel multiplier (DINOv2 ``ls1.gamma``)."""

  def __init__(self, dim: int, init_value: float = 1.0, *, rngs: nnx.Rngs | None = None):
    del rngs
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32), out_sharding=("embed",))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


def gelu(x):
  """Exact (erf) GELU, as ``torch.nn.GELU()``; ``jax.nn.gelu`` defaults to the tanh form."""
  return jax.nn.gelu(x, approximate=False)


def count_params(module: nnx.Module) -> int:
  """Number of scalar parameters (``nnx.Param`` leaves) in a module."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def check_image_batch(images, name: str, *, multiple: int, ndim: int = 5) -> None:
  """Raise a clear ``ValueError`` for image tensors of the wrong rank, channels or size."""
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != ndim or shape[-1] != 3:
    want = "(B, S, H, W, 3)" if ndim == 5 else "(B, H, W, 3)"
    raise ValueError(f"{name} must be a float array of shape {want} (channels last); got "
                     f"{None if shape is None else tuple(shape)}")
  h, w = shape[-3], shape[-2]
  if h % multiple or w % multiple or h == 0 or w == 0:
    raise ValueError(f"{name}: height and width must be positive multiples of {multiple}; got "
                     f"{h} x {w}. Resize or crop the images first (e.g. geojax.io.images).")
  if not jnp.issubdtype(getattr(images, "dtype", jnp.float32), jnp.floating):
    raise ValueError(f"{name} must be floating point (ImageNet-normalised); got {images.dtype}")


def as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)
