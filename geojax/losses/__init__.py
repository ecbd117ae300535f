"""Training objectives."""

from __future__ import annotations

from geojax.losses.da3 import (
    DA3LossConfig, camera_loss, compose_points, da3_loss, default_ray_hw, depth_loss, depth_target,
    gradient_loss, normalize_scene, point_loss, pose_condition_mask, predicted_pose_enc, ray_loss,
    teacher_labels)

__all__ = [
    "DA3LossConfig", "camera_loss", "compose_points", "da3_loss", "default_ray_hw", "depth_loss",
    "depth_target", "gradient_loss", "normalize_scene", "point_loss", "pose_condition_mask",
    "predicted_pose_enc", "ray_loss", "teacher_labels"]
