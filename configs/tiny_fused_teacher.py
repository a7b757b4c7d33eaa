# Tiny fused camera + LiDAR teacher (BEVFusion's structure, see _base_/tiny_fused.py): pts_neck is
# [B, 512, 32, 32] like the tiny voxel LiDAR teacher's, so the LiDAR students distil from it
# unchanged; trained with augmentation. `bevcache extract --config configs/tiny_fused_teacher.py`.
_base_ = ['./_base_/tiny_fused.py', './_base_/schedule.py']
custom_imports = dict(imports=['bevcache.evaluation', 'bevcache.fusion'], allow_failed_imports=False)

train_dataloader = dict(dataset=dict(pipeline={{_base_.augmented_camera_train_pipeline}}))

# Defaults for `bevcache extract` (each overridable on the command line).
bevcache = dict(layers=['pts_neck'], pooling='avg', dtype='float16', split='train', batch_size=4,
                chunk_rows=256, views=0)
