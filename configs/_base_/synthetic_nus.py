# Data: the synthetic nuScenes-format set written by `bevcache synth data/synthetic-nus` (same
# layout and info format as real nuScenes; point `data_root` at a real nuScenes root to use it).
custom_imports = dict(imports=['bevcache.evaluation'], allow_failed_imports=False)
default_scope = 'mmdet3d'

data_root = 'data/synthetic-nus/'
point_cloud_range = [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]
class_names = [
    'car', 'truck', 'construction_vehicle', 'bus', 'trailer', 'barrier',
    'motorcycle', 'bicycle', 'pedestrian', 'traffic_cone'
]
metainfo = dict(classes=class_names, version='v1.0-mini')
input_modality = dict(use_lidar=True, use_camera=False)
backend_args = None
dataset_type = 'NuScenesDataset'
data_prefix = dict(pts='samples/LIDAR_TOP', sweeps='sweeps/LIDAR_TOP', img='')

load_points = dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=4,
                   backend_args=backend_args)
pack_keys = ['points', 'gt_bboxes_3d', 'gt_labels_3d']
# Pack3DDetInputs' default meta keys plus 'token' (and BEVFusion's 'lidar_aug_matrix'): a distilled
# student looks its teacher row up by 'sample_idx' and checks it against the stored 'token'.
pack_meta_keys = (
    'img_path', 'ori_shape', 'img_shape', 'lidar2img', 'depth2img', 'cam2img', 'pad_shape', 'scale_factor',
    'flip', 'pcd_horizontal_flip', 'pcd_vertical_flip', 'box_mode_3d', 'box_type_3d', 'img_norm_cfg',
    'num_pts_feats', 'pcd_trans', 'sample_idx', 'pcd_scale_factor', 'pcd_rotation', 'pcd_rotation_angle',
    'lidar_path', 'transformation_3d_flow', 'trans_mat', 'affine_aug', 'sweep_img_metas', 'ori_cam2img',
    'cam2global', 'crop_offset', 'img_crop_offset', 'resize_img_shape', 'lidar2cam', 'ori_lidar2img',
    'num_ref_frames', 'num_views', 'ego2global', 'axis_align_matrix', 'token', 'lidar_aug_matrix')
# Deterministic by default: cached teacher features describe the un-augmented sample.
train_pipeline = [
    load_points,
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True, with_attr_label=False),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectNameFilter', classes=class_names),
    dict(type='Pack3DDetInputs', keys=pack_keys, meta_keys=pack_meta_keys),
]
# The teachers' augmented training pipeline (random rotation/scale, flips, point order). A student
# that replays cached augmented views (distill.augmentation='replay') must use exactly this one.
augmented_train_pipeline = [
    load_points,
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True, with_attr_label=False),
    dict(type='GlobalRotScaleTrans', rot_range=[-0.3925, 0.3925], scale_ratio_range=[0.95, 1.05],
         translation_std=[0, 0, 0]),
    dict(type='RandomFlip3D', sync_2d=False, flip_ratio_bev_horizontal=0.5,
         flip_ratio_bev_vertical=0.5),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectNameFilter', classes=class_names),
    dict(type='PointShuffle'),
    dict(type='Pack3DDetInputs', keys=pack_keys, meta_keys=pack_meta_keys),
]
test_pipeline = [
    load_points,
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='Pack3DDetInputs', keys=['points']),
]

train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type=dataset_type, data_root=data_root, ann_file='nuscenes_infos_train.pkl',
        pipeline=train_pipeline, metainfo=metainfo, modality=input_modality,
        data_prefix=data_prefix, test_mode=False, box_type_3d='LiDAR',
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type, data_root=data_root, ann_file='nuscenes_infos_val.pkl',
        pipeline=test_pipeline, metainfo=metainfo, modality=input_modality,
        data_prefix=data_prefix, test_mode=True, box_type_3d='LiDAR',
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(type='SafeNuScenesMetric', data_root=data_root,
                     ann_file=data_root + 'nuscenes_infos_val.pkl', metric='bbox',
                     backend_args=backend_args)
test_evaluator = val_evaluator
