"""``geojax convert``: official PyTorch checkpoints (pickles) -> safetensors, once.

    geojax convert --family da3 model.pth OUT_DIR [--preset da3-large] [--overwrite]

The library reads weights only from safetensors. Released checkpoints that ship as pickles
(``.pth``, ``.pt``, ``.bin``, ``.ckpt``) are converted here, once, with
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors and plain containers
only, no code execution), which needs ``torch`` installed. The state dict is taken from the file
itself or its ``model`` / ``state_dict`` / ``module`` entry, or, for a family with a
``convert_state_dict`` hook, taken by that hook from the whole checkpoint (which may also return
a config for ``config.json``), written as ``OUT_DIR/model.safetensors`` (+ ``config.json``
naming the preset) and then loaded back with the
family's official loader, so a file that does not fit the family fails here and not later.

``--with OTHER`` passes a second official checkpoint (a pickle or a ``.safetensors`` file) to the
family's hook, for models whose release is split over files (PPD: the DiT and its frozen
semantic encoder).
Exit status 0 on success, 2 with a one-line message otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile

PROG = "geojax convert"
PICKLE_EXTS = (".pth", ".pt", ".bin", ".ckpt")


def _to_numpy(obj, torch):
  """Tensors -> float32/int NumPy arrays, recursively through dicts and lists."""
  if isinstance(obj, torch.Tensor):
    v = obj.detach().cpu()
    return (v.float() if v.is_floating_point() else v).contiguous().numpy()
  if isinstance(obj, dict):
    return {str(k): _to_numpy(v, torch) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_numpy(v, torch) for v in obj)
  return obj


def read_pickled_checkpoint(path: str):
  """The whole official pickled checkpoint (``weights_only``), tensors as NumPy arrays."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{PROG} needs PyTorch to read {path}: pip install torch") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors have many types
    raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
  return _to_numpy(obj, torch)


def state_dict_of(obj, path: str) -> dict:
  """The tensors of a checkpoint: the file itself or its ``model`` / ``state_dict`` /
  ``module`` entry."""
  for key in ("model", "state_dict", "module"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f"{path}: holds no state dict (a mapping of names to tensors)")
  out = {k: v for k, v in obj.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
  if not out:
    raise ValueError(f"{path}: the state dict holds no tensors")
  return out


def read_pickled_state_dict(path: str) -> dict:
  """Tensors of an official pickled checkpoint as float32/int NumPy arrays (weights_only)."""
  return state_dict_of(read_pickled_checkpoint(path), path)


def _read_other(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--with {path}: no such file")
  if path.endswith(".safetensors"):
    from geojax.convert.torch_layout import load_file
    return load_file(path)
  if not path.lower().endswith(PICKLE_EXTS):
    raise ValueError(f"--with {path}: expected a pickled PyTorch checkpoint "
                     f"({', '.join(PICKLE_EXTS)}) or a .safetensors file")
  return read_pickled_checkpoint(path)


def convert(src: str, dst: str, family: str, *, preset: str | None = None,
            overwrite: bool = False, tensors_only: bool = False,
            other: str | None = None) -> str:
  """Convert ``src`` into ``dst/model.safetensors`` and check that it loads; returns ``dst``.

  ``tensors_only``: skip the load check, for a checkpoint that is a part of the family's
  initialisation rather than one of its models (e.g. MoGe-2 for DAGE's stage-1 merge)."""
  from safetensors.numpy import save_file

  from geojax.models import registry
  fam = registry.get_family(family)
  if fam.load_official is None:
    raise ValueError(f"family {family!r} has no official weights to convert")
  if not os.path.isfile(src):
    raise FileNotFoundError(f"{src}: no such file")
  if not src.lower().endswith(PICKLE_EXTS):
    raise ValueError(f"{src}: expected a pickled PyTorch checkpoint ({', '.join(PICKLE_EXTS)}); "
                     "safetensors files need no conversion")
  if preset is not None and preset not in fam.presets:
    raise ValueError(f"--preset {preset!r} is not a {family} preset; expected one of "
                     f"{fam.presets}")
  target = os.path.join(dst, "model.safetensors")
  if os.path.exists(target) and not overwrite:
    raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
  if other is not None and (fam.convert_state_dict is None or len(
      inspect.signature(fam.convert_state_dict).parameters) < 2):
    raise ValueError(f"family {family!r} converts a single checkpoint; drop --with")
  obj = read_pickled_checkpoint(src)
  config = None
  if fam.convert_state_dict is not None:  # the whole checkpoint -> tensors [, config]
    sd = (fam.convert_state_dict(obj) if other is None
          else fam.convert_state_dict(obj, _read_other(other)))
    if isinstance(sd, tuple):
      sd, config = sd
  else:
    sd = state_dict_of(obj, src)
  created = not os.path.exists(dst)
  os.makedirs(dst, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=".convert-", dir=dst)
  done = False
  try:
    save_file(sd, os.path.join(stage, "model.safetensors"))
    if preset or config:
      with open(os.path.join(stage, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**(config or {}), **({"model_name": preset} if preset else {}),
                   "family": family}, f, indent=1)
    if not tensors_only:
      fam.load_official(stage, {"preset": preset or ""})  # fails here if it does not fit
    for name in sorted(os.listdir(stage)):
      os.replace(os.path.join(stage, name), os.path.join(dst, name))
    done = True
  finally:
    shutil.rmtree(stage, ignore_errors=True)
    if created and not done:  # a failed conversion leaves no folder behind
      shutil.rmtree(dst, ignore_errors=True)
  return dst


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit status 2, like every other bad input
    raise ValueError(f"{message} (see {PROG} --help)")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = _Parser(prog=PROG, description=__doc__.split("\n\n")[1])
  p.add_argument("src", help="official pickled checkpoint (.pth/.pt/.bin/.ckpt)")
  p.add_argument("dst", help="output directory (model.safetensors, config.json)")
  p.add_argument("--family", required=True, help="model family of the checkpoint")
  p.add_argument("--preset", default=None, help="preset (default: inferred when loading)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing conversion")
  p.add_argument("--tensors-only", action="store_true",
                 help="write the tensors without checking that they load as a model of the "
                      "family (for parts of its initialisation, e.g. MoGe-2 for DAGE)")
  p.add_argument("--with", dest="other", default=None, metavar="OTHER",
                 help="a second official checkpoint the model needs (PPD: its semantic "
                      "encoder's, e.g. depth_anything_v2_vitl.pth, MoGe-2's model.pt, "
                      "pi3.safetensors)")
  try:
    a = p.parse_args(argv)
    convert(a.src, a.dst, a.family, preset=a.preset, overwrite=a.overwrite,
            tensors_only=a.tensors_only, other=a.other)
  except SystemExit as e:
    return int(e.code or 0)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(f"{PROG}: {a.src} -> {os.path.join(a.dst, 'model.safetensors')}")
  return 0
