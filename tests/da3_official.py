"""Build the official DA3 PyTorch network (``depth-anything-3==0.1.1``) with random weights.

Used by the parity tests and ``bench/da3_forward.py``. The package imports ``evo`` (pose
alignment for its Gaussian adapter and API) at module import time although the bare network
never calls it; a minimal placeholder module is registered so that the network can be built
without that heavy optional dependency.
"""

from __future__ import annotations

import sys
import types

import numpy as np


def _placeholder_evo():
  if "evo" in sys.modules:
    return
  try:
    import evo  # noqa: F401
    return
  except ImportError:
    pass
  for name in ("evo", "evo.core", "evo.core.trajectory"):
    sys.modules[name] = types.ModuleType(name)
  sys.modules["evo.core.trajectory"].PosePath3D = object  # only referenced by the API path


def build(preset: str, seed: int = 0, sky_balance: bool = True):
  """Official ``DepthAnything3Net`` (or nested net) in eval mode with seeded random weights.

  Matrices keep torch's default (Kaiming-uniform) init; every vector parameter (biases, norms,
  LayerScale, tokens, position embedding) is randomised too so that no parameter is trivial.
  """
  _placeholder_evo()
  import torch
  from depth_anything_3.cfg import create_object, load_config
  from depth_anything_3.registry import MODEL_REGISTRY

  torch.manual_seed(seed)
  net = create_object(load_config(MODEL_REGISTRY[preset])).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith(("cls_token", "camera_token", "pos_embed")):
        p.copy_(torch.randn(p.shape, generator=g))
      elif p.ndim == 1 and ("norm" in name or name.endswith("gamma")) and name.endswith(
          ("weight", "gamma")):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return net


def state_dict_numpy(net) -> dict[str, np.ndarray]:
  """``net.state_dict()`` as NumPy arrays (views of the torch storage, no copy)."""
  return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def balance_sky(net, images_nchw, threshold: float = 0.3):
  """Shift the sky head's last bias so that about half the pixels of ``images`` are sky.

  With random weights the sky map is otherwise all zero or all large, and the sky handling
  (thresholds at 0.3) would not be exercised.
  """
  import torch
  metric = getattr(net, "da3_metric", net)
  seq = metric.head.scratch.sky_output_conv2
  captured = {}
  h = seq.register_forward_hook(lambda m, i, o: captured.__setitem__("o", o))
  with torch.no_grad():
    metric(images_nchw)
    h.remove()
    seq[2].bias += threshold - captured["o"].median()


def run(net, images_bshw3: np.ndarray, extrinsics=None, intrinsics=None, **kw):
  """Official forward on channels-last NumPy input; returns NumPy outputs (B, S, ...)."""
  import torch
  x = torch.from_numpy(np.ascontiguousarray(images_bshw3.transpose(0, 1, 4, 2, 3)))
  ext = None if extrinsics is None else torch.from_numpy(np.asarray(extrinsics, np.float32))
  ixt = None if intrinsics is None else torch.from_numpy(np.asarray(intrinsics, np.float32))
  with torch.no_grad():
    out = net(x, ext, ixt, **kw)
  res = {}
  for k, v in out.items():
    if k == "aux":
      res[k] = {a: b.numpy() for a, b in v.items()}
    elif isinstance(v, torch.Tensor):
      res[k] = v.numpy()
    else:
      res[k] = v
  return res
