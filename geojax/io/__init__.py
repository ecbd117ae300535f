"""Files in and out: Orbax model checkpoints, pictures, TensorBoard events, point clouds
(PLY/GLB) and offscreen point-cloud renders."""
