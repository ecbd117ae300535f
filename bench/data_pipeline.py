"""Throughput of the Grain pipeline for a DA3 training batch (samples / second).

Batch 4, 2..6 views, one 280x504 bucket, synthetic scenes rendered at 280x504 (the renderer is
part of the cost), colour jitter on; measured with 0 and 2 worker processes after one warm-up
batch. Usage: ``python bench/data_pipeline.py [--batches 8] [--workers 0,2]``.
"""

from __future__ import annotations

import time

from absl import app, flags

from geojax.data.pipeline import PipelineConfig, SyntheticSource, make_iterator

_BATCHES = flags.DEFINE_integer("batches", 8, "batches timed per setting (after one warm-up)")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "worker counts to measure")


def measure(num_workers: int, batches: int) -> float:
  """Samples / second over ``batches`` batches with ``num_workers`` worker processes."""
  source = SyntheticSource(0, 64, 6, 280, 504)
  cfg = PipelineConfig(buckets=((280, 504),), min_views=2, max_views=6, batch_size=4,
                       num_workers=num_workers, read_threads=1)
  it = make_iterator(source, cfg, seed=0, process_index=0, process_count=1)
  next(it)  # warm-up: worker start, first renders
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t0
  return batches * cfg.batch_size / dt


def main(argv):
  del argv
  for w in _WORKERS.value:
    rate = measure(int(w), _BATCHES.value)
    print(f"data_pipeline: DA3 batch 4 x 2-6 views @ 280x504, workers={w}: {rate:.2f} samples/s")


if __name__ == "__main__":
  app.run(main)
