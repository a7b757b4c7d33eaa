"""Checking an opened store: verify (read and checksum everything), info, and what differs from
what a caller expects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StoreError
from .location import array_bytes_on_disk, bytes_on_disk, metadata_bytes
from .messages import MAX_LISTED, RECREATE, damage_text, rows_text
from .spec import (
    SPATIAL_DTYPE,
    LayerSpec,
    check_json,
    decode_tokens,
    fingerprint_tokens,
    parse_dtype,
    parse_spatial,
)

if TYPE_CHECKING:
    from .feature_store import FeatureStore


def verify(store: FeatureStore) -> list[str]:
    """Read every chunk of every array; return the problems found (empty if none), naming rows."""
    problems: list[str] = []
    mask, bad_mask = store.read_mask()
    missing = np.flatnonzero(~mask)
    if missing.size:
        # A torn completion chunk is what a kill during its write leaves: not damage, just not written.
        torn = "".join(f"; rows {s}-{e - 1} have an unreadable completion chunk (an interrupted write)"
                       for s, e, _ in bad_mask[:MAX_LISTED])
        problems.append(
            f"complete: {missing.size} of {store.num_samples} rows are not written (rows "
            f"{rows_text(missing)}){torn}; run `bevcache extract --resume` to finish the store."
        )
    for path in store.layout.row_arrays():
        try:
            empty, finite, bad = _row_flags(store, path)
        except StoreError as exc:
            problems.append(str(exc))
            continue
        bad = [b for b in bad if mask[b[0]:b[1]].any()]  # unwritten blocks get rewritten anyway
        if bad:
            problems.append(damage_text(store.url, path, bad))
        done = mask.copy()
        for s, e, _ in bad:
            done[s:e] = False
        lost = np.flatnonzero(done & empty)
        if lost.size:
            problems.append(
                f"{path}: rows {rows_text(lost)} are marked complete but hold no data (chunk files "
                "missing); reset their blocks (FeatureStore.reset_blocks) and run `bevcache extract --resume`."
            )
        odd = np.flatnonzero(done & ~finite & ~empty)
        if odd.size:
            problems.append(f"{path}: rows {rows_text(odd)} contain NaN/Inf; reset their blocks and re-extract.")
    for path in ("tokens", "sample_idx") + (("view_digests",) if store.num_views else ()):
        try:
            data, bad = store.arrays.read(path)
        except StoreError as exc:
            problems.append(str(exc))
            continue
        if bad:
            problems.append(damage_text(store.url, path, bad, consequence=RECREATE))
        elif path == "tokens":
            found = fingerprint_tokens(decode_tokens(data))
            recorded = {k: store.attrs.get("dataset", {}).get(k) for k in found}
            if found != recorded:
                problems.append(f"tokens: fingerprint {found} differs from the one recorded at creation {recorded}; "
                                f"{RECREATE}.")
    return problems


def _row_flags(store: FeatureStore, path: str) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, str]]]:
    """Per row: all NaN (never written / chunk missing), all finite; and the unreadable row ranges.
    Spatial arrays are read in bounded row groups (a whole one may not fit in memory)."""
    n = store.num_samples
    empty, finite, bad = np.zeros(n, bool), np.zeros(n, bool), []
    parts = store.arrays.scan(path) if path.startswith("spatial") else [(0, *store.arrays.read(path))]
    for start, data, unreadable in parts:
        flat = data.reshape(len(data), -1)
        empty[start:start + len(flat)] = np.isnan(flat).all(axis=1)
        finite[start:start + len(flat)] = np.isfinite(flat).all(axis=1)
        bad += unreadable
    return empty, finite, bad


def info(store: FeatureStore) -> dict:
    """Summary for humans and the CLI: completeness, layers, spatial layers, provenance and sizes."""
    mask = store.complete_mask()
    meta = store.attrs
    n, k = store.num_samples, store.num_views
    itemsize = np.dtype(store.dtype).itemsize
    per_row = (1 + k) * sum(s.dim for s in store.layers.values()) * itemsize + 8 * k
    spatial = {}
    for spec in store.spatial.values():
        raw = n * (1 + k) * int(np.prod(spec.shape)) * np.dtype(SPATIAL_DTYPE).itemsize
        disk = [array_bytes_on_disk(store.url, store.arrays.group, f"{kind}/{spec.array_name}")
                for kind in ("spatial", "spatial_views")[: 1 + bool(k)]]
        spatial[spec.name] = {"channels": spec.channels, "height": spec.height, "width": spec.width,
                              "dtype": SPATIAL_DTYPE, "bytes_raw": raw,
                              "bytes_on_disk": None if None in disk else sum(d for d in disk if d is not None)}
        per_row += raw // n
    bytes_raw = n * per_row + n * (1 + store.layout.token_width + 8)
    on_disk = bytes_on_disk(store.url, store.arrays.group)
    metadata = metadata_bytes(store.url, store.arrays.group)
    # Compression compares like with like: the arrays' data against the chunks holding it (the
    # metadata documents, a few KiB per array, would make a small store look "0.45x compressed").
    chunks = on_disk - metadata if on_disk is not None and metadata is not None else None
    return {
        "url": store.url,
        "num_samples": n,
        "num_complete": int(mask.sum()),
        "complete": bool(mask.all()),
        "layers": {s.name: {"dim": s.dim, "dtype": store.dtype, "pooling": s.pooling} for s in store.layers.values()},
        "spatial": spatial,
        "dtype": store.dtype,
        "views": k,
        "augmentation": {key: value for key, value in (meta.get("augmentation") or {}).items() if key != "pipeline"} or None,
        "chunk_rows": store.chunk_rows,
        "teacher": meta.get("teacher"),
        "dataset": meta.get("dataset"),
        "split": meta.get("split"),
        "created": meta.get("created"),
        "finished": meta.get("finished"),
        "format_version": meta.get("format_version"),
        "bytes_on_disk": on_disk,
        "bytes_raw": bytes_raw,
        "bytes_metadata": metadata,
        "bytes_chunks": chunks,
        "compression_ratio": (bytes_raw / chunks) if chunks else None,
    }


def differences(store: FeatureStore, *, dataset: dict | None, teacher: dict | None, layers: list[LayerSpec] | None,
                dtype: str | None, views: int | None, augmentation: dict | None, spatial: Any) -> list[str]:
    """Each way the store differs from the expectations given (None: not compared)."""
    diffs: list[str] = []
    meta = store.attrs
    for section, expected in (("dataset", dataset), ("teacher", teacher), ("augmentation", augmentation)):
        if expected is None:
            continue
        found = meta.get(section) or {}
        for key, want in check_json(dict(expected), section).items():
            have = found.get(key, "<absent>")
            if have != want:
                diffs.append(f"{section} {key}: expected {want!r}, found {have!r}")
    for spec in layers or []:
        have = store.layers.get(spec.name)
        if have is None:
            diffs.append(f"layer {spec.name!r}: expected, not in the store (it has {list(store.layers)})")
            continue
        if have.dim != spec.dim:
            diffs.append(f"layer {spec.name!r} dim: expected {spec.dim}, found {have.dim}")
        if have.pooling != spec.pooling:
            diffs.append(f"layer {spec.name!r} pooling: expected {spec.pooling!r}, found {have.pooling!r}")
    if dtype is not None and parse_dtype(dtype) != store.dtype:
        diffs.append(f"dtype: expected {parse_dtype(dtype)!r}, found {store.dtype!r}")
    if views is not None and int(views) != store.num_views:
        diffs.append(f"augmented views per sample: expected {int(views)}, found {store.num_views}")
    if spatial is not None:
        wanted = {s.name: s for s in parse_spatial(spatial)}
        for name, sspec in wanted.items():
            have = store.spatial.get(name)
            if have is None:
                diffs.append(f"spatial layer {name!r}: expected, not in the store (it has {list(store.spatial)})")
            elif have.shape != sspec.shape:
                diffs.append(f"spatial layer {name!r} (C, h, w): expected {sspec.shape}, found {have.shape}")
        for name in store.spatial:
            if name not in wanted:
                diffs.append(f"spatial layer {name!r}: in the store, not expected")
    return diffs
