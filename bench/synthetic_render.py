"""Single-core throughput of the synthetic renderer (``geojax.data.synthetic.render_scene``).

Run ``python bench/synthetic_render.py [--height 336 --width 504 --views 4 --scenes 6]``. The
BLAS / OpenMP thread pools are pinned to one thread by setting ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ``NUMEXPR_NUM_THREADS`` and
``VECLIB_MAXIMUM_THREADS`` to 1 *before* NumPy is imported (the renderer itself is
single-threaded element-wise NumPy). Prints views per second by wall clock and by
``time.process_time`` (CPU time of this process, less sensitive to other load on the machine).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
  os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from geojax.data.synthetic import render_scene  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--height", type=int, default=336)
  ap.add_argument("--width", type=int, default=504)
  ap.add_argument("--views", type=int, default=4)
  ap.add_argument("--scenes", type=int, default=8)
  ap.add_argument("--dynamic", action="store_true")
  args = ap.parse_args()
  render_scene(0, 0, num_views=1, height=args.height, width=args.width)  # warm-up (noise table)
  w0, c0 = time.perf_counter(), time.process_time()
  for i in range(args.scenes):
    render_scene(0, i, num_views=args.views, height=args.height, width=args.width,
                 dynamic=args.dynamic)
  wall, cpu = time.perf_counter() - w0, time.process_time() - c0
  n = args.scenes * args.views
  print(f"{n} views of {args.width}x{args.height}: {n / wall:.1f} views/s (wall), "
        f"{n / cpu:.1f} views/s (process CPU time)")


if __name__ == "__main__":
  main()
