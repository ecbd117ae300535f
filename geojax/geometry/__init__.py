"""Camera and 3D geometry utilities (OpenCV axes: x right, y down, z forward)."""
