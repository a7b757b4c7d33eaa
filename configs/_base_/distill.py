# The older config form's distillation settings, shared by the tiny students: CRD against the cached
# teacher (`bevcache train --student <student config> --cache ...`). Without a cache, `bevcache train`
# trains the student plainly (the baseline). configs/tiny_student_crd.py shows the config form.
distill = dict(
    cache=None,                        # path/URL of the store written by `bevcache extract`
    layers=dict(pts_neck='pts_neck'),  # student layer -> teacher layer
    alpha=1.0,                         # weight of each loss_crd_<layer>
    feat_dim=128,
    nce_k=16384,                       # clamped below the number of training samples
    nce_t=0.07,
    nce_m=0.5,
    pooling=None,                      # None: the pooling the store was made with
    augmentation='auto',               # random train transforms: 'auto' (replay views / warp maps / keep), 'drop', 'keep', 'replay', 'warp'
)
