# BEVFusion LiDAR-only teacher from a mmdetection3d checkout (projects/BEVFusion is not in the wheel).
#   export MMDET3D_ROOT=/path/to/mmdetection3d   # enough: bevcache.bevfusion_cpu adds it to sys.path
#   bevcache extract --config configs/bevfusion/teacher_lidar.py --checkpoint bevfusion_lidar.pth \
#       --data-root data/nuscenes
# pts_neck is a list of one [B, 512, 180, 180] map; it pools to a 512-d vector per sample.
# Without MMDET3D_ROOT the checkout is looked for beside this repository (../mmdetection3d).
_base_ = ['{{$MMDET3D_ROOT:../../../mmdetection3d}}/projects/BEVFusion/configs/bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py']
# bevcache.bevfusion_cpu first: it lets the project import and run without CUDA or its compiled ops
# (a no-op with both); see that module. mmdet3d's own tools/train.py and tools/test.py honour it too.
custom_imports = dict(imports=['bevcache.bevfusion_cpu', 'projects.BEVFusion.bevfusion', 'bevcache.evaluation'],
                      allow_failed_imports=False)
# Data: the project config reads data/nuscenes/ with backend_args = None (local files) and scores
# against the v1.0-trainval tables; `--data-root` points datasets, evaluator and db_sampler elsewhere.

bevcache = dict(layers=['pts_neck'], pooling='avg', dtype='float16', split='train', batch_size=4,
                chunk_rows=256)
