# configs/tiny_student_crd.py with the teacher's augmentation, distilled against cached augmented
# views replayed exactly (a store from `bevcache extract --views K`): the base train dataset is
# wrapped in ReplayViewsDataset, which shows each sample as one of its K views per epoch.
_base_ = ['./tiny_student_crd.py']

train_dataloader = dict(dataset=dict(
    _delete_=True,
    type='ReplayViewsDataset',
    dataset=dict(
        type={{_base_.dataset_type}}, data_root={{_base_.data_root}}, ann_file='nuscenes_infos_train.pkl',
        pipeline={{_base_.augmented_train_pipeline}}, metainfo={{_base_.metainfo}},
        modality={{_base_.input_modality}}, data_prefix={{_base_.data_prefix}}, test_mode=False,
        box_type_3d='LiDAR', filter_empty_gt=False,  # every view must exist, as when the teacher saw it
        backend_args=None)))
model = dict(augmentation='replay')
