# teacher_lidar_cam.py at CPU scale, for tests and benchmarks (not for real training): the LiDAR
# branch on teacher_lidar_small.py's reduced grid (BEVFUSION_VOXELS per side, default 384: +-14.4 m,
# a 48 x 48 BEV map), images 128 x 352 (half of 256 x 704), a 16 x 44 camera feature map, depth
# bins 1-21 m (40 instead of 118; the grid's corners are 20.4 m away) and a camera BEV grid that
# lands on the LiDAR BEV cells, so ConvFuser's two inputs agree.
#   BEVFUSION_VOXELS=720 bevcache extract --config configs/bevfusion/teacher_lidar_cam_small.py ...
# Image scale: ImageAug3D's resize_lim is relative to the stored image. The project's 0.48 test resize
# of 1600 x 900 nuScenes images, halved, is 0.24 of 1600 = 1.0 of `bevcache synth --cameras`' 384 x 216
# images (the 128 x 352 crop then keeps the same field of view as the full model's). BEVFUSION_IMAGE_WIDTH
# (default 384) is the stored images' width; 1600 for real nuScenes images.
_base_ = ['teacher_lidar_cam.py']

voxels_per_side = int('{{$BEVFUSION_VOXELS:384}}')  # a string: mmengine parses the file before substituting
assert voxels_per_side % 16 == 0, f'BEVFUSION_VOXELS must be a multiple of 16. Got {voxels_per_side}.'
half_width = round(voxels_per_side * 0.075 / 2, 4)
point_cloud_range = [-half_width, -half_width, -5.0, half_width, half_width, 3.0]
grid_size = [voxels_per_side, voxels_per_side, 41]
bev_corner = [-half_width, -half_width]
# Camera BEV: 0.3 m cells, downsampled 2x = 0.6 m = the LiDAR BEV's 0.075 m x 8. DepthLSSTransform counts
# its cells with int((max - min) / step), which truncates: check the count here, not as a shape error later.
camera_cells = (2 * half_width) / 0.3
assert int(camera_cells) == voxels_per_side // 4, f'camera BEV {camera_cells} cells / 2 vs LiDAR {voxels_per_side // 8}'
image_size = [128, 352]
image_scale = 1600 / int('{{$BEVFUSION_IMAGE_WIDTH:384}}') / 2  # resize_lim factor: half of the full model's
model = dict(
    data_preprocessor=dict(voxelize_cfg=dict(point_cloud_range=point_cloud_range)),
    pts_middle_encoder=dict(sparse_shape=grid_size),
    view_transform=dict(
        image_size=image_size,
        feature_size=[image_size[0] // 8, image_size[1] // 8],  # GeneralizedLSSFPN's stride-8 output
        xbound=[-half_width, half_width, 0.3],
        ybound=[-half_width, half_width, 0.3],
        dbound=[1.0, 21.0, 0.5]),
    bbox_head=dict(
        train_cfg=dict(point_cloud_range=point_cloud_range, grid_size=grid_size),
        test_cfg=dict(grid_size=grid_size, pc_range=bev_corner),
        bbox_coder=dict(pc_range=bev_corner,
                        post_center_range=[-half_width - 7.2, -half_width - 7.2, -10.0,
                                           half_width + 7.2, half_width + 7.2, 10.0])))


def _small(step):  # mmengine configs allow plain functions; the range and image size of one pipeline step
    if 'point_cloud_range' in step:
        step = dict(step, point_cloud_range=point_cloud_range)
    if step['type'] == 'ImageAug3D':
        step = dict(step, final_dim=image_size, resize_lim=[round(r * image_scale, 4) for r in step['resize_lim']])
    return step


train_pipeline = [_small(step) for step in _base_.train_pipeline]
test_pipeline = [_small(step) for step in _base_.test_pipeline]
train_dataloader = dict(dataset=dict(dataset=dict(pipeline=train_pipeline)))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
