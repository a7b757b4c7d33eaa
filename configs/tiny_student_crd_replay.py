# configs/tiny_student_crd.py with the teacher's augmentation, distilled against cached augmented
# views replayed exactly (a store from `bevcache extract --views K`). Nothing else is needed:
# DistillationHook wraps the base train dataset in ReplayViewsDataset, which shows each sample as
# one of its K views per epoch, under any entry point (tools/train.py, Runner.from_cfg, bevcache train).
_base_ = ['./tiny_student_crd.py']

train_dataloader = dict(dataset=dict(pipeline={{_base_.augmented_train_pipeline}}))
model = dict(augmentation='replay')
