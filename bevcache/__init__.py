"""bevcache: distil mmdet3d detectors from a teacher run once and cached in a Zarr store.

Importing the package registers every component in mmdet3d's registries, so a config switches
bevcache on with `custom_imports = dict(imports=['bevcache'])`: the distiller (MODELS:
CRDDistiller), the dataset wrappers (DATASETS: ReplayViewsDataset, TeacherRowsDataset), the hooks (HOOKS:
DistillationHook, StudentExportHook, TrainGuardHook), the metric (METRICS: SafeNuScenesMetric), the
camera branch and tiny fused detector (MODELS: LSSViewTransform, ConcatConvFuser, FusedCenterPoint).
It also applies the compatibility shims (bevcache.compat) and allows mmengine's checkpoint types
in torch's weights-only loader (bevcache.teacher), so mmengine's resume works on torch >= 2.6.

The `bevcache` command (entry point `bevcache_cli`) imports the package without registering:
`--help`, `info` and `verify` never import torch or mmdet3d; the commands that build models call
`register()` first.
"""

import sys

__version__ = "0.1.0"
_REGISTERED = False


def register() -> None:
    """Register bevcache's components and apply the shims (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from . import compat
    from .teacher import register_safe_globals

    compat.patch_spconv_for_cpu()
    compat.patch_numpy_long()
    register_safe_globals()
    from . import distiller, evaluation, fusion, guard, hooks, loading, replay  # noqa: F401  (registration)

    _REGISTERED = True


# `bevcache_cli` imported (the console script) or run as `python -m bevcache_cli` (then `__main__`).
if not any(getattr(sys.modules.get(name), "LIGHT_START", False) for name in ("bevcache_cli", "__main__")):
    register()
