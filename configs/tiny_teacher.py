# Tiny LiDAR teacher: pts_neck = 512 channels (as BEVFusion-L's SECONDFPN), trained with
# augmentation. `bevcache extract --config configs/tiny_teacher.py` caches its pts_neck.
_base_ = ['./_base_/synthetic_nus.py', './_base_/tiny_pillar_centerpoint.py', './_base_/schedule.py']

point_cloud_range = [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]
train_pipeline = [
    dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=4),
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True, with_attr_label=False),
    dict(type='GlobalRotScaleTrans', rot_range=[-0.3925, 0.3925], scale_ratio_range=[0.95, 1.05],
         translation_std=[0, 0, 0]),
    dict(type='RandomFlip3D', sync_2d=False, flip_ratio_bev_horizontal=0.5,
         flip_ratio_bev_vertical=0.5),
    dict(type='PointsRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectRangeFilter', point_cloud_range=point_cloud_range),
    dict(type='ObjectNameFilter', classes={{_base_.class_names}}),
    dict(type='Pack3DDetInputs', keys=['points', 'gt_bboxes_3d', 'gt_labels_3d']),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

# Defaults for `bevcache extract` (each overridable on the command line).
bevcache = dict(layers=['pts_neck'], pooling='avg', dtype='float16', split='train', batch_size=4,
                chunk_rows=256)
