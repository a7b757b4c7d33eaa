# Half-width BEVFusion LiDAR student (pts_neck 256 channels vs the teacher's 512), distilled with
# CRD from the cached teacher store:
#   bevcache train --student configs/bevfusion/student_lidar.py --cache work_dirs/teacher_lidar/features.zarr
_base_ = ['{{$MMDET3D_ROOT:../../../mmdetection3d}}/projects/BEVFusion/configs/bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py']
custom_imports = dict(imports=['bevcache.bevfusion_cpu', 'projects.BEVFusion.bevfusion', 'bevcache.evaluation'],
                      allow_failed_imports=False)
# (data and checkout: see teacher_lidar.py)

model = dict(
    pts_backbone=dict(out_channels=[64, 128]),
    pts_neck=dict(in_channels=[64, 128], out_channels=[128, 128]),
    bbox_head=dict(in_channels=256))
load_from = None  # the project's converted init checkpoint has the teacher's width

distill = dict(
    cache='work_dirs/teacher_lidar/features.zarr',
    layers=dict(pts_neck='pts_neck'),
    alpha=1.0,
    feat_dim=128,
    nce_k=16384,
    nce_t=0.07,
    nce_m=0.5,
    pooling=None,
    # the documented default: replay the store's views, warp spatial maps, else keep the augmentation
    augmentation='auto',
)
