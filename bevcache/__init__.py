"""bevcache: distil mmdet3d detectors from a teacher run once and cached in a Zarr store.

Importing the package registers every component in mmdet3d's registries, so a config switches
bevcache on with `custom_imports = dict(imports=['bevcache'])`: the distiller (MODELS:
CRDDistiller), the dataset wrappers (DATASETS: ReplayViewsDataset, TeacherRowsDataset), the hooks (HOOKS:
DistillationHook, StudentExportHook, TrainGuardHook), the metric (METRICS: SafeNuScenesMetric).
It also applies the compatibility shims (bevcache.compat) and allows mmengine's checkpoint types
in torch's weights-only loader (bevcache.teacher), so mmengine's resume works on torch >= 2.6.
"""

__version__ = "0.1.0"


def _register() -> None:
    from . import compat
    from .teacher import register_safe_globals

    compat.patch_spconv_for_cpu()
    compat.patch_numpy_long()
    register_safe_globals()
    from . import distiller, evaluation, guard, hooks, loading, replay  # noqa: F401  (registration)


_register()
