# Tiny camera-only student: BEVFusion's camera branch alone (six images -> ResNet -> FPN -> LSS lift
# onto the LiDAR grid) with the voxel student's SECOND/SECONDFPN widths (pts_neck 256 channels) and
# CenterHead. No points are loaded or voxelised. Distil it from a cached (fused) teacher's pts_neck.
_base_ = ['./_base_/tiny_fused.py', './_base_/schedule.py', './_base_/distill.py']
custom_imports = dict(imports=['bevcache.evaluation', 'bevcache.fusion'], allow_failed_imports=False)

camera_bev_channels = 64
model = dict(
    data_preprocessor=dict(voxel=False),
    pts_voxel_encoder=None,
    pts_middle_encoder=None,
    fusion_layer=None,
    view_transform=dict(out_channels=camera_bev_channels),
    pts_backbone=dict(in_channels=camera_bev_channels, out_channels=[32, 64]),
    pts_neck=dict(in_channels=[32, 64], out_channels=[128, 128]),
    pts_bbox_head=dict(in_channels=256))

train_pipeline = [
    dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True, with_attr_label=False),
    dict(type='ObjectRangeFilter', point_cloud_range={{_base_.point_cloud_range}}),
    dict(type='ObjectNameFilter', classes={{_base_.class_names}}),
    {{_base_.load_images}},
    dict(type='Pack3DDetInputs', keys=['img', 'gt_bboxes_3d', 'gt_labels_3d'],
         meta_keys={{_base_.pack_meta_keys}}),
]
test_pipeline = [
    {{_base_.load_images}},
    dict(type='Pack3DDetInputs', keys=['img'], meta_keys={{_base_.pack_meta_keys}}),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
