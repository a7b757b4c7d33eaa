# Tiny voxel LiDAR student: the teacher's sparse encoder, half its SECOND/SECONDFPN widths
# (pts_neck 256 channels), same grid and head.
_base_ = ['./_base_/synthetic_nus.py', './_base_/tiny_voxel_centerpoint.py', './_base_/schedule.py']

model = dict(
    pts_backbone=dict(out_channels=[32, 64]),
    pts_neck=dict(in_channels=[32, 64], out_channels=[128, 128]),
    pts_bbox_head=dict(in_channels=256))

# CRD against the cached teacher (`bevcache train --student configs/tiny_voxel_student.py --cache ...`).
# Without a cache, `bevcache train` trains this student plainly (the baseline).
distill = dict(
    cache=None,                        # path/URL of the store written by `bevcache extract`
    layers=dict(pts_neck='pts_neck'),  # student layer -> teacher layer
    alpha=1.0,                         # weight of each loss_crd_<layer>
    feat_dim=128,
    nce_k=16384,                       # clamped below the number of training samples
    nce_t=0.07,
    nce_m=0.5,
    pooling=None,                      # None: the pooling the store was made with
    augmentation='drop',               # random train transforms: 'drop' them, or 'keep' (mismatch)
)
