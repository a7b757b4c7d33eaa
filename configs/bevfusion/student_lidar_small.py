# student_lidar.py on teacher_lidar_small.py's reduced grid (CPU tests and benchmarks): the same
# half-width network (its weights load into student_lidar.py unchanged), BEVFUSION_VOXELS per side.
#   bevcache train --student configs/bevfusion/student_lidar_small.py --cache features.zarr
_base_ = ['teacher_lidar_small.py']

# as student_lidar.py
model = dict(
    pts_backbone=dict(out_channels=[64, 128]),
    pts_neck=dict(in_channels=[64, 128], out_channels=[128, 128]),
    bbox_head=dict(in_channels=256))
load_from = None
distill = dict(
    cache='work_dirs/teacher_lidar_small/features.zarr',
    layers=dict(pts_neck='pts_neck'),
    alpha=1.0,
    feat_dim=128,
    nce_k=16384,
    nce_t=0.07,
    nce_m=0.5,
    pooling=None,
    augmentation='auto',  # the documented default (README): never train without augmentation
)
