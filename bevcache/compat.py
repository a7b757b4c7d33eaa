"""The one place that patches a third-party library, applied when bevcache is imported (`__init__`).

- spconv 2.3.8's sparse-conv backward calls `torch.cuda.current_stream()` unconditionally, which
  fails on a CPU-only torch ("Torch not compiled with CUDA enabled") although the CPU kernels never
  use the stream. On CPU-only builds we make `get_current_stream` return 0; with CUDA it is a no-op.
- mmdet3d 1.4.0's DataBaseSampler (ObjectSample, in most mmdet3d LiDAR train pipelines) makes its
  labels with `dtype=np.long`, an alias numpy removed in 1.24 and brought back in 2.0 (C long):
  on numpy 1.24-1.26 every ObjectSample call fails ("module 'numpy' has no attribute 'long'").
"""

from __future__ import annotations

import importlib

import torch

_SPCONV_MODULES = ("spconv.pytorch.cppcore", "spconv.pytorch.ops", "spconv.pytorch.utils", "spconv.pytorch.hash")


def _no_stream() -> int:
    return 0


def patch_spconv_for_cpu() -> bool:
    """Apply the CPU stream shim to spconv if needed; returns True when patched."""
    if torch.cuda.is_available():
        return False
    patched = False
    for name in _SPCONV_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # spconv absent: pillar models need no sparse conv
            return False
        if hasattr(module, "get_current_stream"):
            module.get_current_stream = _no_stream  # type: ignore[attr-defined]
            patched = True
    return patched


def patch_numpy_long() -> bool:
    """Give numpy < 2 the `np.long` mmdet3d 1.4.0 uses: `np.int_`, the C long there, which is what
    numpy 2's `np.long` is. A no-op where numpy has it; returns True when patched."""
    import numpy as np

    if "long" in vars(np):  # numpy 2 (or older than 1.24); vars(): 1.24-1.26 raise from __getattr__
        return False
    np.long = np.int_  # type: ignore[attr-defined]
    return True
