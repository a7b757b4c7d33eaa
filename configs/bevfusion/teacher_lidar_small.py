# teacher_lidar.py on a reduced grid, for CPU tests and benchmarks (not for real training): the
# same network and voxel size (0.075 m), a smaller square of the scene. BEVFUSION_VOXELS voxels per
# side (default 384: +-14.4 m, a 48 x 48 BEV map, ~1.2 s per predict on 2 CPU threads; 720:
# +-27 m, 90 x 90; the full model is 1440). It must be a multiple of 16 (the sparse encoder
# downsamples 8x, the backbone 2x more, and SECONDFPN upsamples back: 360 breaks it).
#   BEVFUSION_VOXELS=720 bevcache extract --config configs/bevfusion/teacher_lidar_small.py ...
_base_ = ['teacher_lidar.py']

voxels_per_side = int('{{$BEVFUSION_VOXELS:384}}')  # a string: mmengine parses the file before substituting
assert voxels_per_side % 16 == 0, f'BEVFUSION_VOXELS must be a multiple of 16. Got {voxels_per_side}.'
half_width = round(voxels_per_side * 0.075 / 2, 4)
point_cloud_range = [-half_width, -half_width, -5.0, half_width, half_width, 3.0]
grid_size = [voxels_per_side, voxels_per_side, 41]
bev_corner = [-half_width, -half_width]
# Every key that carries the grid (mmdetection3d's config repeats it; see its own comment).
model = dict(
    data_preprocessor=dict(voxelize_cfg=dict(point_cloud_range=point_cloud_range)),
    pts_middle_encoder=dict(sparse_shape=grid_size),
    bbox_head=dict(
        train_cfg=dict(point_cloud_range=point_cloud_range, grid_size=grid_size),
        test_cfg=dict(grid_size=grid_size, pc_range=bev_corner),
        bbox_coder=dict(pc_range=bev_corner,
                        post_center_range=[-half_width - 7.2, -half_width - 7.2, -10.0,
                                           half_width + 7.2, half_width + 7.2, 10.0])))
# Pipelines hold the range too (each data loader keeps its own copy of them).
train_pipeline = [dict(step, point_cloud_range=point_cloud_range) if 'point_cloud_range' in step else step
                  for step in _base_.train_pipeline]
test_pipeline = [dict(step, point_cloud_range=point_cloud_range) if 'point_cloud_range' in step else step
                 for step in _base_.test_pipeline]
train_dataloader = dict(dataset=dict(dataset=dict(pipeline=train_pipeline)))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
