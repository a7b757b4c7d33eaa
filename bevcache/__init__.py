"""bevcache: distil mmdet3d detectors from a teacher run once and cached in a Zarr store."""

__version__ = "0.1.0"
