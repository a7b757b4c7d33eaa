# BEVFusion camera + LiDAR teacher from a mmdetection3d checkout (projects/BEVFusion is not in the wheel).
#   export MMDET3D_ROOT=/path/to/mmdetection3d   # enough: bevcache.bevfusion_cpu adds it to sys.path
#   bevcache extract --config configs/bevfusion/teacher_lidar_cam.py --checkpoint bevfusion_lidar_cam.pth \
#       --data-root data/nuscenes
# Camera and LiDAR BEV maps are fused (ConvFuser) before pts_backbone, so pts_neck (a list of one
# [B, 512, 180, 180] map, 512-d pooled, as the LiDAR-only teacher) carries camera information and a
# LiDAR-only student (student_lidar.py) distils from this store unchanged.
# Without a GPU, bevcache.bevfusion_cpu runs the camera lift's bev_pool in plain torch.
_base_ = ['{{$MMDET3D_ROOT:../../../mmdetection3d}}/projects/BEVFusion/configs/bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py']
# bevcache.bevfusion_cpu first (see teacher_lidar.py); the project's own list follows.
custom_imports = dict(imports=['bevcache.bevfusion_cpu', 'projects.BEVFusion.bevfusion', 'bevcache.evaluation'],
                      allow_failed_imports=False)

# The Swin-T init_cfg is a download of ImageNet weights: never followed (no network, and they would be
# overwritten anyway). Teacher weights come from --checkpoint; --random-init is explicit.
model = dict(img_backbone=dict(init_cfg=None))

bevcache = dict(layers=['pts_neck'], pooling='avg', dtype='float16', split='train', batch_size=4,
                chunk_rows=256)
