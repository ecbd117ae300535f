"""Tests for geojax.train.optim: schedules, decay masks, LR groups, AdamW, EMA, accumulation."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from geojax.train import optim
from geojax.train.optim import (
    default_optim_config,
    ema_update,
    init_ema,
    is_no_decay,
    learning_rate_schedule,
    make_optimizer,
    param_labels,
)


def _cfg(**kw) -> ml_collections.ConfigDict:
  c = default_optim_config()
  for k, v in kw.items():
    c[k] = v
  return c


# ------------------------------------------------------------------------------------ schedule


def test_cosine_schedule_key_steps():
  sched = learning_rate_schedule(_cfg(lr=2.0, warmup_steps=10, total_steps=110, end_lr_factor=0.1))
  # warm-up: lr * t / W
  assert float(sched(0)) == pytest.approx(0.0)
  assert float(sched(5)) == pytest.approx(1.0)
  assert float(sched(10)) == pytest.approx(2.0)
  # cosine half-way (t - W = 50 of 100): f + (1 - f) * 0.5 * (1 + cos(pi / 2)) = 0.55
  assert float(sched(60)) == pytest.approx(2.0 * 0.55, rel=1e-5)
  assert float(sched(35)) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))), rel=1e-5)
  assert float(sched(110)) == pytest.approx(0.2, rel=1e-5)
  assert float(sched(500)) == pytest.approx(0.2, rel=1e-5)


def test_constant_schedule_and_nested_config():
  outer = ml_collections.ConfigDict({"optim": _cfg(lr=1.0, schedule="constant", warmup_steps=4)})
  sched = learning_rate_schedule(outer)
  assert [float(sched(t)) for t in (0, 2, 4, 1000)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
  sched0 = learning_rate_schedule(_cfg(lr=0.3, schedule="constant", warmup_steps=0))
  assert float(sched0(0)) == pytest.approx(0.3)


# ------------------------------------------------------------------------------------ decay mask

# Real parameter paths of DA3 (da3-small): nnx.eval_shape(DA3.from_preset(...)), nnx.to_flat_state.
_DA3_PATHS = {
    # path: (ndim, decayed?)
    "backbone/camera_token": (3, False),
    "backbone/vit/cls_token": (3, False),
    "backbone/vit/pos_embed": (3, False),
    "backbone/vit/norm/scale": (1, False),
    "backbone/vit/norm/bias": (1, False),
    "backbone/vit/patch_embed/proj/kernel": (4, True),
    "backbone/vit/patch_embed/proj/bias": (1, False),
    "backbone/vit/stacks/0/layers/attn/qkv/kernel": (3, True),
    "backbone/vit/stacks/0/layers/attn/qkv/bias": (2, False),  # stacked: 2-D bias
    "backbone/vit/stacks/0/layers/attn/proj/kernel": (3, True),
    "backbone/vit/stacks/0/layers/ls1/gamma": (2, False),
    "backbone/vit/stacks/0/layers/norm1/scale": (2, False),
    "backbone/vit/stacks/0/layers/norm1/bias": (2, False),
    "backbone/vit/stacks/1/layers/attn/q_norm/scale": (2, False),
    "backbone/vit/stacks/1/layers/attn/k_norm/bias": (2, False),
    "backbone/vit/stacks/0/layers/mlp/fc1/kernel": (3, True),
    "cam_dec/backbone/0/kernel": (2, True),
    "cam_dec/fc_qvec/kernel": (2, True),
    "cam_enc/token_norm/scale": (1, False),
    "cam_enc/trunk_norm/bias": (1, False),
    "cam_enc/trunk/layers/ls1/gamma": (2, False),
    "head/aux_norm/scale": (1, False),
    "head/fusion/refinenet1/resConfUnit1/conv1/kernel": (4, True),
    "head/reassemble/resize0/kernel": (4, True),
    "head/output_conv1_aux/0/0/bias": (1, False),
    # other families
    "encoder/register_tokens": (3, False),
    "decoder/mask_token": (3, False),
    "embed/rel_pos_h": (2, False),
    "normal_head/conv/kernel": (4, True),
    "blocks/0/LayerNorm_0/scale": (1, False),
    "logit_scale": (0, False),
    "tok/embedding": (2, True),
}


def _path_tree(paths: dict) -> dict:
  tree: dict = {}
  for path, (ndim, _) in paths.items():
    node = tree
    parts = path.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = jax.ShapeDtypeStruct((2,) * ndim, jnp.float32)
  return tree


def test_weight_decay_rule_on_da3_paths():
  for path, (ndim, decayed) in _DA3_PATHS.items():
    assert is_no_decay(path, ndim) == (not decayed), path
  tree = _path_tree(_DA3_PATHS)
  labels = param_labels(tree, _cfg(weight_decay=0.05))
  flat = dict(zip(optim.param_paths(tree), jax.tree_util.tree_leaves(labels)))
  assert set(flat) == set(_DA3_PATHS)
  for path, (_, decayed) in _DA3_PATHS.items():
    assert flat[path] == ("decay/lr_x1.0" if decayed else "no_decay/lr_x1.0"), path
  # Extra no_decay regexes; weight_decay 0 makes everything no_decay.
  labels = param_labels(tree, _cfg(no_decay=(r"^cam_dec/",)))
  flat = dict(zip(optim.param_paths(tree), jax.tree_util.tree_leaves(labels)))
  assert flat["cam_dec/fc_qvec/kernel"] == "no_decay/lr_x1.0"
  assert flat["head/reassemble/resize0/kernel"] == "decay/lr_x1.0"
  labels = param_labels(tree, _cfg(weight_decay=0.0))
  assert set(jax.tree_util.tree_leaves(labels)) == {"no_decay/lr_x1.0"}


def test_labels_on_abstract_da3_model():
  from geojax.models.da3 import DA3

  model = nnx.eval_shape(lambda: DA3.from_preset("da3-small", rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  cfg = _cfg(lr_multipliers=((r"^backbone/", 0.1),), frozen=(r"^cam_dec/",))
  labels = param_labels(state, cfg)
  flat = dict(zip(optim.param_paths(state), jax.tree_util.tree_leaves(labels)))
  for path, (_, decayed) in _DA3_PATHS.items():
    if path not in flat:
      continue
    if path.startswith("cam_dec/"):
      want = "frozen"
    else:
      want = ("decay" if decayed else "no_decay") + ("/lr_x0.1" if path.startswith("backbone/") else "/lr_x1.0")
    assert flat[path] == want, path
  assert "backbone/vit/stacks/0/layers/ls1/gamma" in flat
  assert sum(p in flat for p in _DA3_PATHS) >= 20
  # The optimizer builds (and initialises abstractly) on the real tree.
  tx = make_optimizer(cfg, state)
  opt_state = jax.eval_shape(tx.init, nnx.to_pure_dict(state))
  assert jax.tree_util.tree_leaves(opt_state)


# ------------------------------------------------------------------------------------ AdamW vs NumPy


def _numpy_adamw(params, grads_seq, mask, *, lr, b1, b2, eps, wd, clip):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  nu = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))
    if clip > 0 and norm > clip:
      g = {k: v * clip / norm for k, v in g.items()}
    for k in p:
      mu[k] = b1 * mu[k] + (1 - b1) * g[k]
      nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
      mhat = mu[k] / (1 - b1 ** t)
      nhat = nu[k] / (1 - b2 ** t)
      upd = mhat / (np.sqrt(nhat) + eps)
      if mask[k]:
        upd = upd + wd * p[k]
      p[k] = p[k] - lr * upd
  return p


def test_adamw_matches_numpy_with_mask_and_clipping():
  rng = np.random.default_rng(0)
  params = {
      "fc/kernel": rng.normal(size=(3, 4)).astype(np.float32),
      "fc/bias": rng.normal(size=(4,)).astype(np.float32),
      "cls_token": rng.normal(size=(1, 4)).astype(np.float32),
  }
  tree = {"fc": {"kernel": params["fc/kernel"], "bias": params["fc/bias"]}, "cls_token": params["cls_token"]}
  grads_seq = [{k: (3.0 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()} for _ in range(3)]
  cfg = _cfg(lr=0.01, schedule="constant", warmup_steps=0, b1=0.8, b2=0.95, eps=1e-6,
             weight_decay=0.3, clip_norm=1.0)
  tx = make_optimizer(cfg, tree)
  state = tx.init(tree)
  p = jax.tree_util.tree_map(jnp.asarray, tree)
  for g in grads_seq:
    gt = {"fc": {"kernel": g["fc/kernel"], "bias": g["fc/bias"]}, "cls_token": g["cls_token"]}
    updates, state = tx.update(gt, state, p)
    p = optax.apply_updates(p, updates)
  mask = {"fc/kernel": True, "fc/bias": False, "cls_token": False}
  ref = _numpy_adamw(params, grads_seq, mask, lr=0.01, b1=0.8, b2=0.95, eps=1e-6, wd=0.3, clip=1.0)
  np.testing.assert_allclose(p["fc"]["kernel"], ref["fc/kernel"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p["fc"]["bias"], ref["fc/bias"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p["cls_token"], ref["cls_token"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ groups


def test_lr_multipliers_and_frozen_sgd():
  tree = {
      "backbone": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
      "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
      "cam": {"kernel": jnp.ones((2, 2))},
      "enc": {"kernel": jnp.ones((2, 2))},
  }
  cfg = _cfg(name="sgd", lr=0.5, schedule="constant", weight_decay=0.0, clip_norm=0.0,
             lr_multipliers=((r"^backbone/", 0.1), (r"^backbone/bias", 7.0), (r"^enc/", 0.0)),
             frozen=(r"^cam/",))
  labels = param_labels(tree, cfg)
  assert labels["backbone"]["bias"] == "no_decay/lr_x0.1"  # first match wins
  assert labels["cam"]["kernel"] == "frozen" and labels["enc"]["kernel"] == "frozen"
  tx = jax.jit(make_optimizer(cfg, tree).update)
  state = make_optimizer(cfg, tree).init(tree)
  # Frozen parameters keep no optimizer state: every array leaf of the state is a non-frozen param
  # (SGD without momentum keeps only counters).
  assert all(x.ndim == 0 for x in jax.tree_util.tree_leaves(state))
  g = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 2.0), tree)
  p = tree
  for _ in range(3):
    updates, state = tx(g, state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.5 * 2.0 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["backbone"]["kernel"], 0.1 * updates["head"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(updates["backbone"]["bias"], 0.1 * updates["head"]["bias"], rtol=1e-6)
  np.testing.assert_array_equal(p["cam"]["kernel"], tree["cam"]["kernel"])
  np.testing.assert_array_equal(p["enc"]["kernel"], tree["enc"]["kernel"])
  np.testing.assert_allclose(p["head"]["kernel"], 1.0 - 3 * 1.0, rtol=1e-6)


def test_frozen_grads_excluded_from_clipping():
  tree = {"a": jnp.zeros((2,)), "frozen_b": jnp.zeros((2,))}
  cfg = _cfg(name="sgd", lr=1.0, schedule="constant", weight_decay=0.0, clip_norm=1.0,
             frozen=("frozen_",))
  tx = make_optimizer(cfg, tree)
  g = {"a": jnp.array([0.3, 0.4]), "frozen_b": jnp.array([100.0, 100.0])}
  updates, _ = tx.update(g, tx.init(tree), tree)
  np.testing.assert_allclose(updates["a"], [-0.3, -0.4], rtol=1e-6)  # norm 0.5 < 1: unclipped
  np.testing.assert_array_equal(updates["frozen_b"], [0.0, 0.0])


# ------------------------------------------------------------------------------------ nnx


class _Tiny(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, epsilon=1e-6, rngs=rngs)
    self.cls_token = nnx.Param(jnp.full((1, 4), 0.5))

  def __call__(self, x):
    return self.norm(self.fc(x)) + self.cls_token[...]


def test_nnx_optimizer_matches_pure_tree():
  cfg = _cfg(lr=0.05, warmup_steps=2, total_steps=20, weight_decay=0.1, clip_norm=0.5,
             lr_multipliers=(("norm", 0.1),), frozen=("fc/bias",))
  x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
  loss = lambda m: jnp.sum((m(x) - 1.0) ** 2)

  # nnx path.
  model = _Tiny(nnx.Rngs(0))
  params0 = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = make_optimizer(cfg, params0)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for _ in range(3):
    opt.update(model, nnx.grad(loss)(model))
  nnx_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  # Pure-tree path.
  graphdef, state = nnx.split(_Tiny(nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(state)

  def pure_loss(p):
    st = nnx.clone(state)
    nnx.replace_by_pure_dict(st, p)
    return loss(nnx.merge(graphdef, st))

  tx2 = make_optimizer(cfg, params)
  opt_state = tx2.init(params)
  for _ in range(3):
    grads = jax.grad(pure_loss)(params)
    updates, opt_state = tx2.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         nnx_params, params)
  np.testing.assert_array_equal(nnx_params["fc"]["bias"], params0["fc"]["bias"])
  assert not np.allclose(nnx_params["fc"]["kernel"], params0["fc"]["kernel"])
  assert not np.allclose(nnx_params["cls_token"], params0["cls_token"])


# ------------------------------------------------------------------------------------ EMA


def test_ema_update_formula_and_jit():
  ema = {"w": jnp.array([1.0, 2.0]), "n": jnp.array(3, jnp.int32), "h": jnp.array([1.0], jnp.bfloat16)}
  params = {"w": jnp.array([3.0, -2.0]), "n": jnp.array(5, jnp.int32), "h": jnp.array([3.0], jnp.bfloat16)}
  out = jax.jit(ema_update)(ema, params, 0.9)
  np.testing.assert_allclose(out["w"], [0.9 * 1.0 + 0.1 * 3.0, 0.9 * 2.0 - 0.1 * 2.0], rtol=1e-6)
  assert int(out["n"]) == 5
  assert out["h"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["h"], np.float32), [1.2], rtol=1e-2)
  out0 = ema_update(ema, params, 0.0)
  np.testing.assert_allclose(out0["w"], params["w"])
  e = init_ema(params)
  for _ in range(2):
    e = ema_update(e, {"w": jnp.zeros(2), "n": params["n"], "h": params["h"]}, jnp.float32(0.5))
  np.testing.assert_allclose(e["w"], 0.25 * params["w"], rtol=1e-6)


# ------------------------------------------------------------------------------------ MultiSteps


def test_multisteps_equals_big_batch_step():
  rng = np.random.default_rng(1)
  tree = {"fc": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                 "bias": jnp.zeros((2,), jnp.float32)}}
  micro = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)
           for _ in range(3)]
  base = dict(lr=0.1, schedule="constant", weight_decay=0.1, clip_norm=0.5)
  tx_acc = make_optimizer(_cfg(accum_steps=3, **base), tree)
  state = tx_acc.init(tree)
  p = tree
  for i, g in enumerate(micro):
    updates, state = tx_acc.update(g, state, p)
    if i < 2:
      assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates))
    p = optax.apply_updates(p, updates)

  tx = make_optimizer(_cfg(accum_steps=1, **base), tree)
  mean_g = jax.tree_util.tree_map(lambda *gs: sum(gs) / len(gs), *micro)
  updates, _ = tx.update(mean_g, tx.init(tree), tree)
  want = optax.apply_updates(tree, updates)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, want)


# ------------------------------------------------------------------------------------ bad config


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(schedule="linear"), "schedule"),
        (dict(name="lamb"), "name"),
        (dict(lr_multipliers=(("backbone/(", 0.1),)), "lr_multipliers[0]"),
        (dict(lr_multipliers=(("a", 1.0), ("b",))), "lr_multipliers[1]"),
        (dict(lr_multipliers=(("a", -1.0),)), "lr_multipliers[0]"),
        (dict(frozen=("ok", "[unclosed")), "frozen[1]"),
        (dict(frozen="backbone"), "frozen"),
        (dict(no_decay=("*bad",)), "no_decay[0]"),
        (dict(warmup_steps=200, total_steps=100), "warmup_steps"),
        (dict(accum_steps=0), "accum_steps"),
        (dict(clip_norm=-1.0), "clip_norm"),
        (dict(end_lr_factor=2.0), "end_lr_factor"),
        (dict(b2=1.0), "b2"),
        (dict(ema_decay=1.0), "ema_decay"),
    ],
)
def test_bad_config_raises_naming_field(kw, field):
  # A plain dict: ConfigDict's own type checks would reject some of these before we see them.
  cfg = {**default_optim_config().to_dict(), **kw}
  with pytest.raises(ValueError, match=rf"config\.optim\.{re.escape(field)}:"):
    make_optimizer(cfg, {"w": jnp.zeros((2, 2))})


def test_bad_schedule_in_configdict():
  with pytest.raises(ValueError, match=r"config\.optim\.schedule.*'warmup_cosine'"):
    learning_rate_schedule(ml_collections.ConfigDict({"optim": _cfg(schedule="warmup_cosine")}))
