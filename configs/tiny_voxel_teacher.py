# Tiny voxel (sparse-conv) LiDAR teacher with BEVFusion-L's trunk: pts_neck = 512 channels, trained
# with augmentation. `bevcache extract --config configs/tiny_voxel_teacher.py` caches its pts_neck.
_base_ = ['./_base_/synthetic_nus.py', './_base_/tiny_voxel_centerpoint.py', './_base_/schedule.py']

train_dataloader = dict(dataset=dict(pipeline={{_base_.augmented_train_pipeline}}))

# Defaults for `bevcache extract` (each overridable on the command line).
bevcache = dict(layers=['pts_neck'], pooling='avg', dtype='float16', split='train', batch_size=4,
                chunk_rows=256, views=0)  # views=K: K augmented views per sample for replay
