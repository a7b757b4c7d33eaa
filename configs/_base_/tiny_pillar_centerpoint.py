# A CenterPoint-style pillar detector built only from mmdet3d's registered modules, with the
# module names of BEVFusion's LiDAR branch (pts_voxel_encoder, pts_middle_encoder, pts_backbone,
# pts_neck, pts_bbox_head). Small enough for CPU: 51.2 m square at 0.4 m pillars (128x128 grid).
voxel_size = [0.4, 0.4, 8.0]
grid = [128, 128, 1]
out_size_factor = 2  # neck output = 64x64 cells of 0.8 m
pc_range = [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]
bn = dict(type='BN', eps=1e-3, momentum=0.01)
model = dict(
    type='CenterPoint',
    data_preprocessor=dict(
        type='Det3DDataPreprocessor',
        voxel=True,
        voxel_layer=dict(max_num_points=20, point_cloud_range=pc_range, voxel_size=voxel_size,
                         max_voxels=(16000, 16000))),
    pts_voxel_encoder=dict(
        type='PillarFeatureNet', in_channels=4, feat_channels=[32], with_distance=False,
        voxel_size=voxel_size, point_cloud_range=pc_range,
        norm_cfg=dict(type='BN1d', eps=1e-3, momentum=0.01), legacy=False),
    pts_middle_encoder=dict(type='PointPillarsScatter', in_channels=32, output_shape=grid[:2]),
    pts_backbone=dict(
        type='SECOND', in_channels=32, out_channels=[64, 128, 256], layer_nums=[1, 2, 2],
        layer_strides=[2, 2, 2], norm_cfg=bn, conv_cfg=dict(type='Conv2d', bias=False)),
    pts_neck=dict(
        type='SECONDFPN', in_channels=[64, 128, 256], out_channels=[128, 128, 256],
        upsample_strides=[1, 2, 4], norm_cfg=bn, upsample_cfg=dict(type='deconv', bias=False),
        use_conv_for_no_stride=True),
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
