# The tiny student trained with the teacher's augmentation, distilled against cached augmented
# views replayed exactly (`bevcache extract --views K`, then `bevcache train --cache ...`).
_base_ = ['./tiny_student.py']

train_dataloader = dict(dataset=dict(pipeline={{_base_.augmented_train_pipeline}}))
distill = dict(augmentation='replay')  # the store's K views; distill.views=K with --teacher-online
