"""Data: built-in synthetic scenes, the formats users have, TFDS datasets and Grain pipelines.

- :mod:`geojax.data.synthetic` - procedural scenes with exact depth, normals, cameras, ray maps,
  sky and (dynamic) 3D tracks, rendered by analytic ray casting;
- :mod:`geojax.data.formats` - scene folders, COLMAP sparse models, videos;
- :mod:`geojax.data.tfds_builder` - ArrayRecord TFDS datasets from scene folders or synthetic
  scenes, read back with ``tfds`` data sources;
- :mod:`geojax.data.transforms` and :mod:`geojax.data.pipeline` - Grain ``MapDataset`` chains:
  view sampling, resize/crop with exact intrinsics, buckets, augmentation, per-family targets,
  per-host sharding, workers, checkpointable iterators, mesh placement.
"""
