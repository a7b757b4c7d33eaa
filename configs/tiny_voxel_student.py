# Tiny voxel LiDAR student: the teacher's sparse encoder, half its SECOND/SECONDFPN widths
# (pts_neck 256 channels), same grid and head.
_base_ = ['./_base_/synthetic_nus.py', './_base_/tiny_voxel_centerpoint.py', './_base_/schedule.py',
          './_base_/distill.py']

model = dict(
    pts_backbone=dict(out_channels=[32, 64]),
    pts_neck=dict(in_channels=[32, 64], out_channels=[128, 128]),
    pts_bbox_head=dict(in_channels=256))
