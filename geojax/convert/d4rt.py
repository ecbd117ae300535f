"""VideoMAE v2 encoder weights <-> the video encoder of geojax's :class:`~geojax.models.d4rt.D4RT`.

D4RT releases no weights; its encoder starts from VideoMAE v2 (``OpenGVLab/VideoMAEv2``:
ViT-B/16, ViT-L/16 of the same code, ViT-g/14). Two official layouts are read, with the
``model`` / ``module`` wrapper already removed (``geojax convert`` does it):

* fine-tuned ``models/modeling_finetune.py`` ``VisionTransformer``: ``patch_embed.proj.weight``
  ``(D, 3, 2, p, p)`` (a Conv3d) and ``.bias``; per block ``blocks.{i}.norm1`` / ``norm2``,
  ``attn.qkv.weight`` ``(3D, D)`` without a bias plus ``attn.q_bias`` / ``attn.v_bias`` (the
  key bias is a constant zero), ``attn.proj``, ``mlp.fc1`` / ``fc2``; ``fc_norm`` (mean
  pooling, the released setting, where ``norm`` is an ``Identity`` with no tensors) or
  ``norm``; ``head``;
* pre-training ``models/modeling_pretrain.py``: the same encoder under ``encoder.`` with
  ``encoder.norm``, next to ``decoder.*``, ``encoder_to_decoder.weight`` and ``mask_token``.

Mapping (geojax path <- official key; Linear weights transposed, blocks stacked):

* ``patch_embed.kernel`` ``(2, p, p, 3, D)`` <- ``patch_embed.proj.weight`` permuted. ViT-g
  has ``14 x 14`` patches and D4RT ``16 x 16``: the kernel is then resized by FlexiViT's
  pseudo-inverse resize (``patch_resize="pinv"``, :func:`resize_patch_kernel`): ``w' =
  pinv(B^T) w`` with ``B`` the bilinear (half-pixel, no antialias) upsampling of a patch, so
  every token of a bilinearly upsampled patch equals the token of the original patch exactly
  (``<B x, w'> = <x, w>``); ``patch_resize=None`` refuses a mismatch.
* ``blocks.layers.attn.qkv.bias`` <- ``concat(q_bias, 0, v_bias)`` (or ``attn.qkv.bias`` when
  a checkpoint has one, zeros when it has no qkv bias at all). The released models all use
  the ``q_bias`` / ``v_bias`` form (``qkv_bias=True``).
* LayerScale ``gamma_1`` / ``gamma_2`` (only when ``init_values > 0``; the released models
  have none) are folded exactly into ``attn.proj`` and ``mlp.fc2``: ``gamma * (x W^T + b) =
  x (gamma W)^T + gamma b``, the branch output is all they scale.
* ``norm`` <- ``norm``, or ``fc_norm`` when there is no ``norm`` (the fine-tuned release: that
  LayerNorm was trained on mean-pooled features, the nearest there is to a per-token norm);
  ``fc_norm`` next to a ``norm`` is dropped.
* ``pos_embed`` ``(slots, g, g, D)``: from ``pos_embed`` ``(1, N, D)`` when the checkpoint
  learned its positions (slot-major, row-major tokens; the source grid is the model's, or
  guessed from ``N``, or ``pos_grid``), resized trilinearly
  (:func:`geojax.nn.video.resize_space_time`) when the grids differ. The released models use
  the fixed 1D sin-cos table, which is not in the state dict: the table is then
  :func:`geojax.nn.video.sinusoid_table` over the model's own ``slots * g * g`` tokens, as
  VideoMAE v2 builds it for a new input size (for ViT-g, 16 x 16 tokens a slot as at 224^2,
  the first 8 slots equal the pre-training table).
* ``aspect_embed`` and the whole decoder are not in VideoMAE: they keep their initialisation.
* dropped: ``head.*``, ``decoder.*``, ``encoder_to_decoder.*``, ``mask_token``; any other
  unknown key (e.g. ``attn.scale`` of the cos-attention variant) is a ``ValueError``.

:func:`to_videomae_state_dict` is the inverse (fine-tuned layout with ``norm``, ``q_bias`` /
``v_bias``, a learned ``pos_embed`` ``(1, N, D)``, no LayerScale). It drops the key bias, which
changes no output: it adds ``q . b_k``, the same for every key of a query, before a softmax.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geojax.convert import torch_layout as tl
from geojax.models import d4rt as d4rt_lib
from geojax.nn import video as vid
from geojax.parallel.sharding import creation_context

# geojax dotted path (leaf renamed to weight/bias) -> official key; "{i}" = stacked layer index.
_RULES = [
    (r"^blocks\.layers\.", "blocks.{i}."),
    (r"^patch_embed\.", "patch_embed.proj."),
]
# encoder parameters VideoMAE has no counterpart for (kept at their initialisation)
_NOT_IN_VIDEOMAE = ("aspect_embed.",)
# official tensors that are not the encoder (classifier, pre-training decoder)
_DROPPED = ("head.", "decoder.", "encoder_to_decoder.", "mask_token")
_QKV_BIAS = "blocks.layers.attn.qkv.bias"
# geojax parameter -> the LayerScale folded into it
_GAMMA = {"blocks.layers.attn.proj.kernel": "gamma_1", "blocks.layers.attn.proj.bias": "gamma_1",
          "blocks.layers.mlp.fc2.kernel": "gamma_2", "blocks.layers.mlp.fc2.bias": "gamma_2"}
# VideoMAE v2 models with no D4RT preset: (width, depth) -> heads, for the error message
_OTHER_VITS = {(384, 12): ("ViT-S", 6), (1280, 32): ("ViT-H", 16)}


def videomae_tensors(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The encoder's tensors of a VideoMAE v2 state dict as float32 NumPy arrays, in the
  fine-tuned naming: ``encoder.`` removed (pre-training layout), the classifier and the
  pre-training decoder dropped, ``fc_norm`` renamed ``norm`` when there is no ``norm`` (and
  dropped when there is). Other keys are kept (they are reported as unexpected later)."""
  sd = dict(state_dict)
  if any(k.startswith("encoder.") for k in sd):
    sd = {(k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in sd.items()
          if k.startswith("encoder.") or not k.startswith(_DROPPED)}
  sd = {k: v for k, v in sd.items() if not k.startswith(_DROPPED)}
  fc = {k: v for k, v in sd.items() if k.startswith("fc_norm.")}
  if fc:
    for k in fc:
      del sd[k]
    if not any(k.startswith("norm.") for k in sd):
      sd.update({"norm." + k[len("fc_norm."):]: v for k, v in fc.items()})
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _width_depth(sd: Mapping[str, Any]) -> tuple[int, int]:
  if "patch_embed.proj.weight" not in sd:
    raise ValueError("not a VideoMAE v2 encoder: no patch_embed.proj.weight (nor "
                     "encoder.patch_embed.proj.weight)")
  depth = len({m[1] for m in (re.match(r"^blocks\.(\d+)\.", k) for k in sd) if m})
  return int(np.shape(sd["patch_embed.proj.weight"])[0]), depth


def videomae_preset(state_dict: Mapping[str, Any]) -> str:
  """The D4RT preset whose encoder has the width and depth of a VideoMAE v2 state dict
  (ViT-B -> ``d4rt-b``, ViT-L -> ``d4rt-l``, ViT-g -> ``d4rt-g``); ``ValueError`` if none."""
  sd = {k[len("encoder."):] if k.startswith("encoder.") else k: v
        for k, v in state_dict.items()}
  dim, depth = _width_depth(sd)
  for name in d4rt_lib.PRESET_NAMES:
    c = d4rt_lib.PRESETS[name]
    if (c.enc_dim, c.enc_depth) == (dim, depth):
      return name
  known = ", ".join(f"{n} {d4rt_lib.PRESETS[n].enc_dim} x {d4rt_lib.PRESETS[n].enc_depth}"
                    for n in d4rt_lib.PRESET_NAMES)
  other = _OTHER_VITS.get((dim, depth))
  hint = (f"; this is VideoMAE's {other[0]}: build it with d4rt.get_config('d4rt-b', "
          f"enc_dim={dim}, enc_depth={depth}, enc_heads={other[1]})" if other else "")
  raise ValueError(f"a VideoMAE v2 encoder {dim} wide and {depth} deep fits no D4RT preset "
                   f"(width x depth: {known}){hint}")


def _fit_hint(sd: Mapping[str, Any]) -> str:
  try:
    return f"the checkpoint fits preset {videomae_preset(sd)!r}"
  except ValueError as e:
    return str(e)


def _abstract_encoder(cfg: d4rt_lib.D4RTConfig) -> d4rt_lib.VideoEncoder:
  with creation_context():
    return nnx.eval_shape(lambda: d4rt_lib.VideoEncoder(cfg, rngs=nnx.Rngs(0)))


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``(n_out, n_in)`` matrix of 1D bilinear resizing, half-pixel centres
  (``align_corners=False``), no antialiasing (``torch`` ``F.interpolate(mode="bilinear")``)."""
  src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def resize_patch_kernel(kernel: np.ndarray, patch: int) -> np.ndarray:
  """FlexiViT pseudo-inverse resize of a tubelet kernel ``(kt, p, p, C, D)`` to ``(kt, patch,
  patch, C, D)``: ``w' = pinv(B^T) w`` per ``(t, c, d)``, ``B = R kron R`` the bilinear resize
  (:func:`_bilinear_matrix`) of a row-major ``p x p`` patch. For ``patch > p`` (ViT-g's 14 ->
  16) ``B^T w' = w`` holds exactly, i.e. ``<B x, w'> = <x, w>`` for every patch ``x``; for
  ``patch < p`` it is the least-squares fit. Computed in float64."""
  kt, p, p2, c, d = kernel.shape
  if p != p2:
    raise ValueError(f"patch kernel {kernel.shape} is not square")
  if p == patch:
    return kernel
  r = _bilinear_matrix(p, patch)
  b = np.kron(r, r)  # (patch^2, p^2)
  w = np.moveaxis(np.asarray(kernel, np.float64), 0, 2).reshape(p * p, kt * c * d)
  out = np.linalg.pinv(b.T) @ w  # (patch^2, kt*c*d)
  out = np.moveaxis(out.reshape(patch, patch, kt, c, d), 2, 0)
  return np.ascontiguousarray(out, dtype=np.float32)


def _source_grid(n: int, cfg: d4rt_lib.D4RTConfig) -> tuple[int, int, int] | None:
  """The ``(slots, g, g)`` grid of a learned ``pos_embed`` of ``n`` tokens: the model's when
  the counts match, else the model's slot count or side with a square remainder, else
  VideoMAE's 16-frame default (8 slots)."""
  slots, g, _ = cfg.grid
  if n == slots * g * g:
    return slots, g, g
  for s in (slots, 8):
    side = int(round(np.sqrt(n / s)))
    if s * side * side == n:
      return s, side, side
  if n % (g * g) == 0:
    return n // (g * g), g, g
  return None


def encoder_from_videomae(state_dict: Mapping[str, Any], cfg: d4rt_lib.D4RTConfig, *,
                          patch_resize: str | None = "pinv",
                          pos_grid: tuple[int, int, int] | None = None
                          ) -> dict[str, np.ndarray]:
  """The D4RT encoder's parameters (dotted geojax paths of ``D4RT.encoder``, e.g.
  ``blocks.layers.attn.qkv.kernel`` stacked over layers; float32) from a VideoMAE v2 state dict
  (module docstring), for the encoder of ``cfg``. ``aspect_embed`` is not among them.

  ``patch_resize``: ``"pinv"`` resizes a kernel of another patch size
  (:func:`resize_patch_kernel`), ``None`` refuses it. ``pos_grid``: the ``(slots, g, g)`` of a
  learned ``pos_embed`` whose token count is not the model's (guessed otherwise). Missing and
  unexpected keys and wrong shapes raise ``ValueError`` naming the keys."""
  if patch_resize not in ("pinv", None):
    raise ValueError(f"patch_resize must be 'pinv' or None; got {patch_resize!r}")
  sd = videomae_tensors(state_dict)
  d = cfg.enc_dim
  used: set[str] = set()
  missing: list[str] = []

  def get(key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if key not in sd:
      missing.append(key)
      return None
    used.add(key)
    a = sd[key]
    if tuple(a.shape) != tuple(shape):
      raise ValueError(f"VideoMAE tensor {key} has shape {tuple(a.shape)}, but this D4RT "
                       f"encoder (width {d}, depth {cfg.enc_depth}) needs {tuple(shape)}; "
                       f"{_fit_hint(sd)}")
    return a

  out: dict[str, np.ndarray] = {}
  for path, _, shape, keys, kind, stacked in tl.entries(_abstract_encoder(cfg), _RULES):
    name = ".".join(str(p) for p in path)
    if name.startswith(_NOT_IN_VIDEOMAE):
      continue
    if name == "patch_embed.kernel":
      out[name] = _patch_kernel(sd, cfg, used, missing, patch_resize)
      continue
    if name == "pos_embed":
      out[name] = _pos_table(sd, cfg, used, pos_grid)
      continue
    one = shape[1:] if stacked else shape
    arrays = []
    for i, key in enumerate(keys):
      if name == _QKV_BIAS:
        a = _qkv_bias(sd, i, d, get)
      else:
        a = get(key, tuple(reversed(one)) if kind == "linear" else one)
        if a is not None:
          a = tl.to_jax(a, kind)
          gamma = _GAMMA.get(name)
          if gamma is not None and f"blocks.{i}.{gamma}" in sd:
            a = a * get(f"blocks.{i}.{gamma}", (d,))  # scales the output channels (last axis)
      arrays.append(a)
    if any(a is None for a in arrays):
      continue
    out[name] = np.ascontiguousarray(np.stack(arrays) if stacked else arrays[0], np.float32)
  if missing:
    more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
    raise ValueError(f"VideoMAE state dict misses {len(missing)} tensors of this D4RT encoder "
                     f"(width {d}, depth {cfg.enc_depth}): {missing[:10]}{more}; "
                     f"{_fit_hint(sd)}")
  unexpected = sorted(set(sd) - used)
  if unexpected:
    more = f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else ""
    raise ValueError(f"VideoMAE state dict has {len(unexpected)} tensors the D4RT encoder does "
                     f"not use: {unexpected[:10]}{more}; {_fit_hint(sd)}")
  return out


def _qkv_bias(sd, i: int, d: int, get) -> np.ndarray | None:
  """Layer ``i``'s ``(3D,)`` qkv bias: ``[q_bias, 0, v_bias]``, ``qkv.bias`` or zeros."""
  b = f"blocks.{i}.attn."
  if b + "q_bias" in sd or b + "v_bias" in sd:
    q, v = get(b + "q_bias", (d,)), get(b + "v_bias", (d,))
    return None if q is None or v is None else np.concatenate([q, np.zeros_like(q), v])
  if b + "qkv.bias" in sd:
    return get(b + "qkv.bias", (3 * d,))
  return np.zeros(3 * d, np.float32)  # qkv_bias=False


def _patch_kernel(sd, cfg, used, missing, patch_resize) -> np.ndarray | None:
  key, d, kt = "patch_embed.proj.weight", cfg.enc_dim, cfg.tubelet
  if key not in sd:
    missing.append(key)
    return None
  used.add(key)
  w = sd[key]
  if w.ndim != 5 or w.shape[:3] != (d, 3, kt) or w.shape[3] != w.shape[4]:
    raise ValueError(f"VideoMAE tensor {key} has shape {tuple(w.shape)}, but this D4RT encoder "
                     f"needs ({d}, 3, {kt}, p, p); {_fit_hint(sd)}")
  if w.shape[3] != cfg.patch and patch_resize is None:
    raise ValueError(f"VideoMAE tensor {key} has {w.shape[3]} x {w.shape[3]} patches and the "
                     f"model {cfg.patch} x {cfg.patch}; pass patch_resize='pinv' to resize it")
  return resize_patch_kernel(w.transpose(2, 3, 4, 1, 0), cfg.patch)  # (kt, p, p, 3, D)


def _pos_table(sd, cfg, used, pos_grid) -> np.ndarray:
  slots, g, _ = cfg.grid
  d = cfg.enc_dim
  if "pos_embed" not in sd:  # the fixed sin-cos table: built for the model's own grid
    return vid.sinusoid_table(slots * g * g, d).reshape(slots, g, g, d)
  used.add("pos_embed")
  pe = sd["pos_embed"]
  grid = tuple(pos_grid) if pos_grid is not None else (
      _source_grid(pe.shape[1], cfg) if pe.ndim == 3 else None)
  if (pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != d or grid is None
      or int(np.prod(grid)) != pe.shape[1]):
    raise ValueError(f"VideoMAE tensor pos_embed has shape {tuple(pe.shape)}, but this D4RT "
                     f"encoder needs (1, slots * g * g, {d}) (its own grid is {cfg.grid}; pass "
                     f"pos_grid=(slots, g, g) for another); {_fit_hint(sd)}")
  table = pe[0].reshape(*grid, d)
  if grid != (slots, g, g):
    table = np.asarray(vid.resize_space_time(jnp.asarray(table), (slots, g, g)), np.float32)
  return np.ascontiguousarray(table)


def load_videomae(model: d4rt_lib.D4RT, source: str | os.PathLike | Mapping[str, Any], *,
                  patch_resize: str | None = "pinv",
                  pos_grid: tuple[int, int, int] | None = None) -> d4rt_lib.D4RT:
  """Put VideoMAE v2 weights into ``model.encoder`` in place (``nnx.update``) and return
  ``model``. ``source``: a state dict (NumPy or anything ``np.asarray`` reads), a
  ``.safetensors`` file or a directory holding ``model.safetensors`` (as ``geojax convert
  --family d4rt`` writes it). Each new value keeps the old one's dtype and sharding; the
  aspect embedding and the decoder are left as they are. Options: :func:`encoder_from_videomae`."""
  if isinstance(source, Mapping):
    sd = source
  else:
    sd, _ = tl.read_safetensors(os.fspath(source), "d4rt")
  params = encoder_from_videomae(sd, model.cfg, patch_resize=patch_resize, pos_grid=pos_grid)
  state = nnx.state(model.encoder, nnx.Param)
  pure = nnx.to_pure_dict(state)
  for name, value in params.items():
    *parents, leaf = name.split(".")
    node = pure
    for p in parents:
      node = node[p]
    old = node[leaf]
    new = jnp.asarray(value, old.dtype)
    if isinstance(old, jax.Array) and getattr(old, "sharding", None) is not None:
      new = jax.device_put(new, old.sharding)
    node[leaf] = new
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model.encoder, state)
  return model


def to_videomae_state_dict(model: d4rt_lib.D4RT) -> dict[str, np.ndarray]:
  """``model.encoder`` as a VideoMAE v2 fine-tuned-layout state dict (float32 NumPy): the
  patch kernel at the model's patch size, ``q_bias`` / ``v_bias`` (the key bias dropped, see
  the module docstring), ``norm``, ``pos_embed`` ``(1, slots * g * g, D)``, no LayerScale and
  no classifier. :func:`load_videomae` of it gives back the same encoder bit for bit."""
  d = model.cfg.enc_dim
  out: dict[str, np.ndarray] = {}
  for path, value, _, keys, kind, stacked in tl.entries(model.encoder, _RULES):
    name = ".".join(str(p) for p in path)
    if name.startswith(_NOT_IN_VIDEOMAE):
      continue
    value = np.asarray(value, np.float32)
    if name == "patch_embed.kernel":
      out[keys[0]] = np.ascontiguousarray(value.transpose(4, 3, 0, 1, 2))
    elif name == "pos_embed":
      out[keys[0]] = np.ascontiguousarray(value.reshape(1, -1, d))
    elif name == _QKV_BIAS:
      for i in range(len(keys)):
        out[f"blocks.{i}.attn.q_bias"] = value[i, :d].copy()
        out[f"blocks.{i}.attn.v_bias"] = value[i, 2 * d:].copy()
    else:
      for i, key in enumerate(keys):
        out[key] = np.ascontiguousarray(tl.to_torch(value[i] if stacked else value, kind))
  return out


def convert_state_dict(checkpoint: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``geojax convert --family d4rt``: a whole VideoMAE v2 checkpoint (its tensors, or under
  ``model`` / ``module`` / ``state_dict``) -> the encoder's tensors (:func:`videomae_tensors`,
  official names) and ``{"model_name": preset, "source": ...}``."""
  from geojax.convert.cli import state_dict_of
  tensors = videomae_tensors(state_dict_of(checkpoint, "the VideoMAE v2 checkpoint"))
  return tensors, {"model_name": videomae_preset(tensors), "source": "VideoMAE v2"}
