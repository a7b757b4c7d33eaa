# configs/tiny_student_crd_replay.py plus spatial BEV maps: pooled CRD and a spatial loss on pts_neck
# against the cached teacher's maps of the same replayed views (a store from
# `bevcache extract --views K --spatial pts_neck`). DistillationHook adds the wrappers the distiller
# reads through: ReplayViewsDataset around the base dataset, TeacherRowsDataset (maps read in the
# loader workers) around the whole.
_base_ = ['./tiny_student_crd_replay.py']

model = dict(spatial=dict(layers=dict(pts_neck='pts_neck')))  # student layer -> teacher layer, grid from the store
