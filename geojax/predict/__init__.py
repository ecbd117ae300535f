"""Inference: the ``geojax predict`` command and its Python API.

    from geojax.predict import load_model, run
    model, _ = load_model("checkpoints/my-model")  # official directory or geojax checkpoint
    pred = run(model, ["a.jpg", "b.jpg"])           # NumPy arrays: pred.depth, pred.extrinsics...

Modules: :mod:`~geojax.predict.preprocess` (the official Depth Anything 3 input processing, shared by ViT families),
:mod:`~geojax.predict.inputs` (files, folders, videos, scene and COLMAP folders -> scenes),
:mod:`~geojax.predict.core` (:func:`run`), :mod:`~geojax.predict.export` (files per scene),
:mod:`~geojax.predict.weights` (checkpoints), :mod:`~geojax.predict.cli` (the command).
"""

from geojax.predict.core import Prediction, run, world_points
from geojax.predict.preprocess import processed_size
from geojax.predict.weights import load_model

__all__ = ["Prediction", "load_model", "processed_size", "run", "world_points"]
