# A CenterPoint voxel detector with BEVFusion-L's LiDAR trunk (mmdet3d's centerpoint_voxel0075 zoo
# layout): hard voxelisation -> HardSimpleVFE -> SparseEncoder (spconv) -> SECOND -> SECONDFPN ->
# CenterHead, shrunk for CPU. Same range as the synthetic data (+-25.6 m), voxels of 0.2 m x 0.2 m
# x 0.2 m: a [41, 256, 256] sparse grid (z gets the +1 mmdet3d's SparseEncoder expects), downsampled
# 8x by the encoder to a 32x32 BEV map of 1.6 m cells; SECOND's stride-2 stage and SECONDFPN's 2x
# upsampling need an even BEV size (grid / 8 = 32, a multiple of 16).
voxel_size = [0.2, 0.2, 0.2]
grid = [256, 256, 40]
out_size_factor = 8  # three stride-2 sparse convs
pc_range = [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]
bn = dict(type='BN', eps=1e-3, momentum=0.01)
model = dict(
    type='CenterPoint',
    data_preprocessor=dict(
        type='Det3DDataPreprocessor',
        voxel=True,
        voxel_type='hard',
        voxel_layer=dict(max_num_points=10, point_cloud_range=pc_range, voxel_size=voxel_size,
                         max_voxels=(30000, 40000))),
    pts_voxel_encoder=dict(type='HardSimpleVFE', num_features=4),
    pts_middle_encoder=dict(
        type='SparseEncoder',
        in_channels=4,
        sparse_shape=[grid[2] + 1, grid[1], grid[0]],
        # z: 41 -> 21 -> 11 -> 5 (paddings below) -> 2 after conv_out, so the BEV map has
        # output_channels * 2 channels, as in the zoo config.
        output_channels=64,
        base_channels=8,  # conv_input's width = the first basic blocks' width
        order=('conv', 'norm', 'act'),
        encoder_channels=((8, 8, 16), (16, 16, 32), (32, 32, 64), (64, 64)),
        encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, [0, 1, 1]), (0, 0)),
        block_type='basicblock'),
    pts_backbone=dict(
        type='SECOND', in_channels=128, out_channels=[64, 128], layer_nums=[1, 1],
        layer_strides=[1, 2], norm_cfg=bn, conv_cfg=dict(type='Conv2d', bias=False)),
    pts_neck=dict(
        type='SECONDFPN', in_channels=[64, 128], out_channels=[256, 256], upsample_strides=[1, 2],
        norm_cfg=bn, upsample_cfg=dict(type='deconv', bias=False), use_conv_for_no_stride=True),
    pts_bbox_head=dict(
        type='CenterHead',
        in_channels=512,
        tasks=[
            dict(num_class=1, class_names=['car']),
            dict(num_class=2, class_names=['truck', 'construction_vehicle']),
            dict(num_class=2, class_names=['bus', 'trailer']),
            dict(num_class=1, class_names=['barrier']),
            dict(num_class=2, class_names=['motorcycle', 'bicycle']),
            dict(num_class=2, class_names=['pedestrian', 'traffic_cone']),
        ],
        common_heads=dict(reg=(2, 2), height=(1, 2), dim=(3, 2), rot=(2, 2), vel=(2, 2)),
        share_conv_channel=32,
        bbox_coder=dict(
            type='CenterPointBBoxCoder', post_center_range=[-30, -30, -10.0, 30, 30, 10.0],
            max_num=200, score_threshold=0.05, out_size_factor=out_size_factor,
            voxel_size=voxel_size[:2], code_size=9, pc_range=pc_range[:2]),
        separate_head=dict(type='SeparateHead', init_bias=-2.19, final_kernel=3),
        loss_cls=dict(type='mmdet.GaussianFocalLoss', reduction='mean'),
        loss_bbox=dict(type='mmdet.L1Loss', reduction='mean', loss_weight=0.25),
        norm_bbox=True),
    train_cfg=dict(
        pts=dict(
            grid_size=grid, voxel_size=voxel_size, out_size_factor=out_size_factor,
            dense_reg=1, gaussian_overlap=0.1, max_objs=200, min_radius=2,
            code_weights=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2],
            point_cloud_range=pc_range)),
    test_cfg=dict(
        pts=dict(
            post_center_limit_range=[-30, -30, -10.0, 30, 30, 10.0], max_per_img=200,
            max_pool_nms=False, min_radius=[4, 12, 10, 1, 0.85, 0.175], score_threshold=0.05,
            pc_range=pc_range[:2], out_size_factor=out_size_factor, voxel_size=voxel_size[:2],
            nms_type='rotate', pre_max_size=500, post_max_size=83, nms_thr=0.2)))
