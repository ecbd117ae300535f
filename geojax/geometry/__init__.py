"""Camera and 3D geometry utilities (OpenCV axes: x right, y down, z forward)."""

from geojax.geometry.alignment import (
    align_depth, apply_sim3, lstsq_scale, lstsq_scale_shift, median_scale, ransac_scale_shift,
    ransac_umeyama, recover_focal_shift, umeyama, weighted_l1_scale)
from geojax.geometry.camera import (
    c2w_to_w2c, camera_center, compose_poses, decode_pose, encode_pose, fov_from_intrinsics,
    intrinsics_from_fov, invert_pose, make_intrinsics, make_pose, normalize_extrinsics,
    relative_pose, rigid_inverse, scale_intrinsics, to_3x4, to_homogeneous, w2c_to_c2w)
from geojax.geometry.edges import canny
from geojax.geometry.normals import depth_edges, moge_normals, normals_from_depth
from geojax.geometry.ray_pose import pose_from_rays, ql_decomposition, weighted_homography
from geojax.geometry.rotation import (
    axis_angle_to_mat, axis_angle_to_quat, geodesic_distance, geodesic_distance_deg,
    mat_to_axis_angle, mat_to_quat, quat_to_axis_angle, quat_to_mat, rotation_angle, skew,
    svd_orthogonalize)
from geojax.geometry.unproject import (
    camera_rays, camera_to_world, cameras_to_ray_map, depth_to_camera_points,
    depth_to_world_points, pixel_grid, points_from_depth_and_rays, project, world_to_camera)
