"""Evaluation: host-side (NumPy, float64) metrics for depth, point maps, normals, poses, clouds and
tracks."""

from __future__ import annotations

from geojax.eval import metrics
from geojax.eval.metrics import (
    ate,
    chamfer_distance,
    consistency_error,
    depth_metrics,
    edge_chamfer,
    normal_metrics,
    pointcloud_metrics,
    pointmap_metrics,
    pose_auc,
    pose_errors,
    rpe,
    rra_rta,
    tapvid3d_metrics,
)

__all__ = [
    "metrics",
    "ate",
    "chamfer_distance",
    "consistency_error",
    "depth_metrics",
    "edge_chamfer",
    "normal_metrics",
    "pointcloud_metrics",
    "pointmap_metrics",
    "pose_auc",
    "pose_errors",
    "rpe",
    "rra_rta",
    "tapvid3d_metrics",
]
