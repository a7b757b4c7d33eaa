# A tiny fused camera + LiDAR BEV detector with BEVFusion's structure and module names
# (bevcache.fusion.FusedCenterPoint): six camera images -> img_backbone (ResNet, 16 base channels,
# 3 stages) -> img_neck (FPN, stride 8) -> view_transform (bevcache's CPU LSS lift onto the LiDAR
# BEV grid) ─┐ fusion_layer (concat + conv) -> pts_backbone -> pts_neck -> pts_bbox_head.
# points -> hard voxels -> pts_voxel_encoder -> pts_middle_encoder (spconv) ─┘
# The LiDAR trunk, head and grid are the tiny voxel teacher's (tiny_voxel_centerpoint.py), so the
# fused map has the LiDAR map's 128 channels and pts_neck is the LiDAR teacher's [B, 512, 32, 32].
# Also the synthetic data with cameras: images are loaded after the point augmentation, so they are
# never altered; the lift applies the recorded pcd_* augmentation to its frustum instead.
_base_ = ['./synthetic_nus.py', './tiny_voxel_centerpoint.py']

input_modality = dict(use_lidar=True, use_camera=True)
cameras = ['CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_FRONT_LEFT', 'CAM_BACK', 'CAM_BACK_LEFT', 'CAM_BACK_RIGHT']
# nuScenes v2 infos hold image file names; each camera's folder is its data prefix.
data_prefix = dict(pts='samples/LIDAR_TOP', sweeps='sweeps/LIDAR_TOP', img='',
                   CAM_FRONT='samples/CAM_FRONT', CAM_FRONT_RIGHT='samples/CAM_FRONT_RIGHT',
                   CAM_FRONT_LEFT='samples/CAM_FRONT_LEFT', CAM_BACK='samples/CAM_BACK',
                   CAM_BACK_LEFT='samples/CAM_BACK_LEFT', CAM_BACK_RIGHT='samples/CAM_BACK_RIGHT')
# uint8 BGR as read; the data preprocessor converts to RGB, float and normalises.
load_images = dict(type='LoadMultiViewImageFromFiles', to_float32=False, color_type='color', num_views=6,
                   backend_args=None)
camera_bev_channels = 32
img_feat_channels = 32
model = dict(
    type='FusedCenterPoint',
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    img_backbone=dict(
        type='mmdet.ResNet', depth=18, base_channels=16, stem_channels=16, num_stages=3,
        strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(1, 2), frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False, style='pytorch',
        init_cfg=None),  # random init: nothing is downloaded
    img_neck=dict(type='mmdet.FPN', in_channels=[32, 64], out_channels=img_feat_channels, num_outs=2),
    # The LiDAR BEV grid: +-25.6 m in 1.6 m cells (0.2 m voxels x out_size_factor 8) = 32 x 32;
    # one z cell; depth bins 1-37 m by 1 m (the grid's far corner is 36.2 m away).
    view_transform=dict(
        type='LSSViewTransform', in_channels=img_feat_channels, out_channels=camera_bev_channels,
        xbound=[-25.6, 25.6, 1.6], ybound=[-25.6, 25.6, 1.6], zbound=[-5.0, 3.0, 8.0],
        dbound=[1.0, 37.0, 1.0]),
    fusion_layer=dict(type='ConcatConvFuser', in_channels=[camera_bev_channels, 128], out_channels=128))

camera_pack_keys = ['points', 'img', 'gt_bboxes_3d', 'gt_labels_3d']
camera_train_pipeline = [
    {{_base_.load_points}},
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True, with_attr_label=False),
    dict(type='PointsRangeFilter', point_cloud_range={{_base_.point_cloud_range}}),
    dict(type='ObjectRangeFilter', point_cloud_range={{_base_.point_cloud_range}}),
    dict(type='ObjectNameFilter', classes={{_base_.class_names}}),
    load_images,
    dict(type='Pack3DDetInputs', keys=camera_pack_keys, meta_keys={{_base_.pack_meta_keys}}),
]
augmented_camera_train_pipeline = [
    {{_base_.load_points}},
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True, with_attr_label=False),
    dict(type='GlobalRotScaleTrans', rot_range=[-0.3925, 0.3925], scale_ratio_range=[0.95, 1.05],
         translation_std=[0, 0, 0]),
    dict(type='RandomFlip3D', sync_2d=False, flip_ratio_bev_horizontal=0.5, flip_ratio_bev_vertical=0.5),
    dict(type='PointsRangeFilter', point_cloud_range={{_base_.point_cloud_range}}),
    dict(type='ObjectRangeFilter', point_cloud_range={{_base_.point_cloud_range}}),
    dict(type='ObjectNameFilter', classes={{_base_.class_names}}),
    dict(type='PointShuffle'),
    load_images,  # after the augmentation: RandomFlip3D would otherwise try to flip the image list
    dict(type='Pack3DDetInputs', keys=camera_pack_keys, meta_keys={{_base_.pack_meta_keys}}),
]
camera_test_pipeline = [
    {{_base_.load_points}},
    dict(type='PointsRangeFilter', point_cloud_range={{_base_.point_cloud_range}}),
    load_images,
    dict(type='Pack3DDetInputs', keys=['points', 'img'], meta_keys={{_base_.pack_meta_keys}}),
]
# The names tools and bevcache read (`test_pipeline`: what extraction runs) are the camera ones.
train_pipeline = camera_train_pipeline
test_pipeline = camera_test_pipeline
train_dataloader = dict(dataset=dict(pipeline=camera_train_pipeline, modality=input_modality,
                                     data_prefix=data_prefix))
val_dataloader = dict(dataset=dict(pipeline=camera_test_pipeline, modality=input_modality,
                                   data_prefix=data_prefix))
test_dataloader = val_dataloader
