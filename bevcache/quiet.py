"""Known third-party noise, gathered: warnings raised inside the libraries bevcache drives (spconv,
torch, mmengine, mmcv, mmdet, mmdet3d, numba, zarr, ...) are counted, not printed, and one line at
the end says how many were hidden and from where. `bevcache -v` prints them all. Warnings raised by
bevcache itself, or by a user's own code (configs, custom modules), are always shown.

Also here: mmdet3d prints a dataset's summary table each time the dataset is built; bevcache builds
the same dataset more than once (identity, probes, then the Runner), so `dataset_summary_hidden`
silences the repeats."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import PurePath

# Loggers of third-party packages that warn through `logging` rather than `warnings`.
THIRD_PARTY_LOGGERS = ("torch.fx._symbolic_trace",)
# Deprecation notices mmengine and mmdet3d log (through mmengine's logger, not `warnings`) on every run.
KNOWN_MMENGINE_MESSAGES = ('"FileClient" will be deprecated', '"HardDiskBackend" is the alias',
                           "is not a meta file, simply parsed as meta information",
                           "No pre-trained weights for")  # a teacher's weights load right after it
# mmdet3d's Det3DDataset summary: three records per build.
SUMMARY_PREFIXES = ("The length of training dataset", "The length of test dataset",
                    "The number of instances per category")

# Top-level packages whose warnings are upstream noise a bevcache user cannot act on.
THIRD_PARTY = ("spconv", "cumm", "torch", "mmengine", "mmcv", "mmdet", "mmdet3d", "numba", "numcodecs", "zarr",
               "nuscenes", "pkg_resources", "setuptools", "shapely", "numpy", "scipy", "s3fs", "botocore",
               "aiobotocore", "fsspec", "pyquaternion", "trimesh", "matplotlib")


def third_party_source(filename: str) -> str | None:
    """The third-party package a warning was raised in (by its file under site-packages), or None."""
    parts = PurePath(filename).parts
    if "projects" in parts and "BEVFusion" in parts:  # mmdetection3d's project, from a user's checkout
        return "mmdet3d"
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            rest = parts[parts.index(marker) + 1:]
            if rest:
                top = rest[0].removesuffix(".py").split("-")[0]
                return top if top in THIRD_PARTY else None
    return None


_ACTIVE: Counter | None = None  # the counts of the gathering in progress (None: nothing is gathered)
_DISCARDED: list = []  # non-empty: the command failed, its error line stays the last line
_UNDO: list = []  # how to take the MMLogger check back off


def discard_note() -> None:
    """A failing command ends with its one `error:` line: no count of hidden warnings after it."""
    _DISCARDED.append(True)


@contextlib.contextmanager
def gather_known_warnings(stream=None) -> Iterator[Counter]:
    """Hide third-party warnings while the block runs; at its end, print one line counting them."""
    counts: Counter = Counter()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        source = third_party_source(filename)
        if source is None:
            original(message, category, filename, lineno, file, line)
        else:
            counts[source] += 1

    class CountFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno >= logging.ERROR:
                return True
            counts[record.name.split(".")[0]] += 1
            return False

    counter = CountFilter()
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    warnings.showwarning = show
    for logger in loggers:
        logger.addFilter(counter)
    global _ACTIVE
    _ACTIVE = counts
    _DISCARDED.clear()
    try:
        yield counts
    finally:
        warnings.showwarning = original
        for logger in loggers:
            logger.removeFilter(counter)
        _ACTIVE = None
        while _UNDO:
            _UNDO.pop()()
        if counts and not _DISCARDED:
            where = ", ".join(f"{name} {n}" for name, n in counts.most_common())
            print(f"note: {sum(counts.values())} known third-party warning(s) hidden ({where}); "
                  "`bevcache -v ...` shows them", file=stream or sys.stderr)


def gather_mmengine_notices() -> None:
    """Also count mmengine's known deprecation notices while warnings are gathered. Called once
    mmengine is imported (a light command never imports it). mmengine makes a new MMLogger per
    Runner, so the check sits on the class, not on one logger."""
    if _ACTIVE is None or _UNDO:
        return
    from mmengine.logging import MMLogger

    original = MMLogger.filter
    counts = _ACTIVE

    def filter(self, record):  # logging.Filterer's method, for every MMLogger instance
        if record.levelno < logging.ERROR and any(m in str(record.msg) for m in KNOWN_MMENGINE_MESSAGES):
            counts["mmengine"] += 1
            return False
        return original(self, record)

    MMLogger.filter = filter
    _UNDO.append(lambda: setattr(MMLogger, "filter", original))


class _SummaryFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith(SUMMARY_PREFIXES) or message == "-" * 30)


@contextlib.contextmanager
def dataset_summary_hidden(hide: bool = True) -> Iterator[None]:
    """Build datasets without mmdet3d's summary table (on mmengine's current logger)."""
    if not hide:
        yield
        return
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    summary = _SummaryFilter()
    logger.addFilter(summary)
    try:
        yield
    finally:
        logger.removeFilter(summary)
