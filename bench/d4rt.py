"""D4RT cost: encoder time per clip, decoder queries per second against the number of queries,
and camera (pose) estimation frames per second.

A randomly initialised model (the cost does not depend on the weights) is built at ``--preset``
and a random clip of ``--frames`` frames at the preset's square size encoded; each timing is the
median of ``--reps`` runs after one compiling run:

* **encoder**: ``model.encode`` plus every decoder layer's keys and values of the clip (done once
  per clip, as :class:`geojax.models.d4rt_readout.ClipAnswers` does);
* **decoder**: one jitted decode of ``N`` queries for each ``N`` in ``--queries`` (queries per
  second = N / time);
* **pose**: the camera read-out of every frame (:func:`geojax.models.d4rt_readout.extrinsics`,
  a 16 x 16 grid, ``2 x 256`` queries per frame, decoded in one chunk) plus the rigid fits;
  frames per second = T / (encoder + pose read-out) and for the read-out alone.

    python bench/d4rt.py --preset d4rt-tiny --frames 8 --queries 256,1024,4096,16384
    # one GPU (not run yet; bf16, cuDNN attention; the paper: 200+ FPS for pose on an A100):
    python bench/d4rt.py --preset d4rt-g --frames 48 --dtype bf16 --attn cudnn \\
        --queries 2048,8192,32768,131072
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _ints(text: str) -> list[int]:
  try:
    out = [int(x) for x in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
  if not out or min(out) < 1:
    raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
  return out


def _time(fn, reps: int) -> float:
  fn()  # compile
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--preset", default="d4rt-tiny")
  ap.add_argument("--frames", type=int, default=8)
  ap.add_argument("--queries", type=_ints, default=[256, 1024, 4096, 16384])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
  ap.add_argument("--attn", default="xla", help="attention implementation (xla, cudnn, chunked)")
  a = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from geojax.models import d4rt
  from geojax.models import d4rt_readout as R

  over = dict(attn_impl=a.attn)
  if a.dtype == "bf16":
    over["dtype"] = jnp.bfloat16
  model = d4rt.D4RT.from_preset(a.preset, rngs=nnx.Rngs(0), **over)
  cfg = model.cfg
  s = cfg.img_size
  video = np.random.default_rng(0).random((a.frames, s, s, 3), dtype=np.float32)
  print(f"# {a.preset}, {a.frames} frames at {s}x{s}, {a.dtype}, attention {a.attn}; "
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}")
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, v):
    m = nnx.merge(graphdef, state)
    return m.decoder.context(m.encode(v[None]))

  vj = jnp.asarray(video)
  t_enc = _time(lambda: jax.block_until_ready(encode(state, vj)), a.reps)
  print(f"encoder: {t_enc * 1e3:.1f} ms per clip ({a.frames / t_enc:.1f} frames/s)")
  kv = encode(state, vj)

  @jax.jit
  def decode(state, kv, q):
    m = nnx.merge(graphdef, state)
    return m.decoder(kv, q[None], vj[None])

  rng = np.random.default_rng(1)
  print("| queries | decode ms | queries / s |")
  print("|---|---|---|")
  for n in a.queries:
    q = np.stack([rng.random(n), rng.random(n)] + [rng.integers(0, a.frames, n)] * 3,
                 -1).astype(np.float32)
    qj = jnp.asarray(q)
    t = _time(lambda: jax.block_until_ready(decode(state, kv, qj)), a.reps)
    print(f"| {n} | {t * 1e3:.1f} | {n / t:,.0f} |")
  ans = R.ClipAnswers(model, video, chunk=2 * 256 * a.frames)
  t_pose = _time(lambda: R.extrinsics(ans, a.frames, (16, 16)), a.reps)
  print(f"pose read-out: {t_pose * 1e3:.1f} ms for {a.frames} frames "
        f"({a.frames / t_pose:.1f} frames/s); with the encoder: "
        f"{a.frames / (t_pose + t_enc):.1f} frames/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
