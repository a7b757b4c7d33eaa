# BEVFusion LiDAR-only teacher from a mmdetection3d checkout (projects/BEVFusion is not in the wheel).
#   export MMDET3D_ROOT=/path/to/mmdetection3d   # and put it on PYTHONPATH for the custom import
#   bevcache extract --config configs/bevfusion/teacher_lidar.py --checkpoint bevfusion_lidar.pth
# pts_neck is a list of one [B, 512, 180, 180] map; it pools to a 512-d vector per sample.
_base_ = ['{{$MMDET3D_ROOT:../mmdetection3d}}/projects/BEVFusion/configs/bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py']
custom_imports = dict(imports=['projects.BEVFusion.bevfusion', 'bevcache.evaluation'], allow_failed_imports=False)
# Note: the project config reads data through backend_args=petrel (OpenMMLab's cluster); set
# backend_args = None in that file for local data, as mmdetection3d's docs advise.

bevcache = dict(layers=['pts_neck'], pooling='avg', dtype='float16', split='train', batch_size=4,
                chunk_rows=256)
