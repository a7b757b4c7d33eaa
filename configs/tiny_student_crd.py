# The tiny student (configs/tiny_student.py) distilled with CRD from the cached tiny teacher, as an
# ordinary mmengine config. Any mmengine entry point trains it, with the same losses:
#   python <site-packages>/mmdet3d/.mim/tools/train.py configs/tiny_student_crd.py
#   Runner.from_cfg(Config.fromfile('configs/tiny_student_crd.py')).train()
#   bevcache train --student configs/tiny_student_crd.py
# The store comes from `bevcache extract --config configs/tiny_teacher.py --checkpoint ... --out <cache>`.
_base_ = ['./tiny_student.py']
# Adds bevcache to the base config's imports (a list given alone would replace them).
custom_imports = dict(imports=_base_.custom_imports.imports + ['bevcache'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='CRDDistiller',
    student={{_base_.model}},
    cache='work_dirs/tiny_teacher/features.zarr',  # num_data, teacher widths and pooling come from here
    layers=dict(pts_neck='pts_neck'),  # student layer -> teacher layer
    alpha=1.0,                         # weight of each loss_crd_<layer>
    feat_dim=128,
    nce_k=16384,                       # clamped below the number of training samples (with a warning)
    nce_t=0.07,
    nce_m=0.5,
    augmentation='auto',               # 'auto': replay the store's views, warp spatial maps, else keep; or 'drop', 'keep', 'replay', 'warp'
)
distill = None  # the older form's section (tiny_student.py): unused, the model section says it all
custom_hooks = [
    dict(type='DistillationHook'),   # checks the data against the store, applies `augmentation`
    dict(type='StudentExportHook'),  # <work_dir>/student_weights.pth, loadable without bevcache
    dict(type='TrainGuardHook'),     # Ctrl-C / SIGTERM: checkpoint at the iteration's end
]
