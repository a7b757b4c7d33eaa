"""The teacher feature store: one pooled vector per sample and layer in a Zarr v3 group.

Row i holds base-dataset index i. Layout under `url` (a local path or any fsspec URL, e.g. s3://):

    zarr.json          group attrs["bevcache"]: format_version, num_samples, chunk_rows, dtype,
                       layers, dataset fingerprint, teacher, split, created, finished, ...
    features/<layer>   float16|float32 [N, dim], chunks (chunk_rows, dim), fill value NaN
    views/<layer>      (only with K > 0 augmented views) [N, K, dim]: view v of row i at [i, v-1]
    view_digests       (only with views) int64 [N, K]: digest of each view's augmented input
    complete           uint8 [N], chunks (chunk_rows,): 1 where a row's features are durable
    tokens             uint8 [N, L]: each sample token as UTF-8, zero padded
    sample_idx         int64 [N]

Every array is encoded bytes -> Blosc(zstd, 5, bitshuffle) -> CRC32C, so a damaged chunk fails
its checksum and is reported as a StoreError naming the array and rows, never read as data.
A feature chunk that was never written (or was deleted) reads as NaN, which write_block refuses
to store, so it cannot pass for features either.

Writing happens in chunk-aligned row blocks (`blocks()`). `write_block` writes every layer's
chunk of the block and only then the block's `complete` chunk, so a kill -9 at any moment loses
at most the block being written: a torn feature chunk is not yet marked complete, and a torn
`complete` chunk fails its checksum and counts as "not written". Rewriting a complete block first
clears its mark.

Several processes may call `write_block` at once for disjoint blocks: blocks are whole chunks and
`complete` is chunked the same way, so no two writers ever touch the same object. Group
attributes are different: zarr rewrites zarr.json whole, so only the creator (one process)
may call `create_store` and `set_attrs`.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from .errors import ConfigError, FeatureValueError, StoreError, StoreMismatch

FORMAT_VERSION = 1
POOLINGS = ("avg", "max", "avgmax")
DTYPES = ("float16", "float32")
# Keys of attrs["bevcache"] that describe the layout; metadata and set_attrs may not change them.
RESERVED = ("format_version", "num_samples", "chunk_rows", "dtype", "layers", "token_width", "layout_ready", "views")
_LAYER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_MAX_LISTED = 8  # rows/ranges named in one message before "... and N more"


@dataclass(frozen=True)
class LayerSpec:
    """One cached layer: its module path in the teacher, pooled width and pooling."""

    name: str  # module path, e.g. "pts_neck" or "pts_backbone.blocks.1"
    dim: int  # width of the pooled vector that is stored
    pooling: str  # "avg" | "max" | "avgmax"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _LAYER_NAME.match(self.name) or self.name.startswith("__"):
            raise ConfigError(
                f"layer name must be a dotted module path like 'pts_neck' or 'pts_backbone.blocks.1'. Got {self.name!r}."
            )
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
            raise ConfigError(f"layer {self.name!r}: dim must be a positive integer. Got {self.dim!r}.")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"layer {self.name!r}: pooling must be one of {list(POOLINGS)}. Got {self.pooling!r}.")

    @property
    def array_name(self) -> str:
        """Name of this layer's array under features/ ('.' is not used in array names)."""
        return self.name.replace(".", "__")


def fingerprint_tokens(tokens: list[str]) -> dict:
    """{"length": n, "sha256": hex digest of the ordered tokens joined by newlines}."""
    joined = "\n".join(str(t) for t in tokens).encode("utf-8")
    return {"length": len(tokens), "sha256": hashlib.sha256(joined).hexdigest()}


# ---------------------------------------------------------------------------------------------
# Locations


def _codecs() -> dict[str, Any]:
    # zarr's default v3 encoding has no checksum; CRC32C goes last so it covers the compressed bytes.
    return dict(
        serializer=BytesCodec(),
        compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()],
        filters=None,
    )


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _local_root(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _make_store(url: str, *, read_only: bool, storage_options: dict | None) -> zarr.abc.store.Store:
    if _is_remote(url):
        # Other processes (torchrun ranks, a resumed run) write while this one reads: a cached
        # listing would hide their chunks (s3fs then reads them as missing, i.e. not written).
        options = {"use_listings_cache": False, **(storage_options or {})}
        return FsspecStore.from_url(url, storage_options=options, read_only=read_only)
    return LocalStore(_local_root(url), read_only=read_only)


def _holds_anything(url: str, storage_options: dict | None) -> bool:
    if not _is_remote(url):
        root = _local_root(url)
        return root.exists() and (not root.is_dir() or any(root.iterdir()))
    store = _make_store(url, read_only=True, storage_options=storage_options)
    return not sync(store.is_empty(""))


def _has_group_doc(url: str, storage_options: dict | None) -> bool:
    """Whether url has a root zarr.json (readable or not)."""
    if not _is_remote(url):
        return (_local_root(url) / "zarr.json").is_file()
    store = _make_store(url, read_only=True, storage_options=storage_options)
    return bool(sync(store.exists("zarr.json")))


def _open_group(url: str, *, mode: str, storage_options: dict | None) -> zarr.Group:
    """The zarr group at url, or a StoreError saying what is there instead."""
    try:
        holds = _holds_anything(url, storage_options)
        has_doc = holds and _has_group_doc(url, storage_options)
    except Exception as exc:  # remote: endpoint down, no such bucket, bad credentials, ...
        if not _is_remote(url):
            raise
        raise StoreError(f"cannot reach store {url} ({_why(exc)}): check the endpoint (e.g. AWS_ENDPOINT_URL) "
                         "and the credentials (AWS_* environment or ~/.aws).") from None
    if not holds:
        raise StoreError(f"no bevcache store at URL: {url}; run `bevcache extract` first.")
    if not has_doc:
        raise StoreError(
            f"{url} holds no zarr v3 group (no zarr.json), so it is no bevcache store: point to the "
            "store `bevcache extract` wrote, or run it with another --out."
        )
    store = _make_store(url, read_only=mode == "r", storage_options=storage_options)
    try:
        return zarr.open_group(store=store, mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise StoreError(
            f"{url} holds no zarr v3 group, so it is no bevcache store: run `bevcache extract` "
            "with another --out, or remove what is there."
        ) from None
    except Exception as exc:  # zarr raises JSONDecodeError, ValueError, KeyError, AssertionError ...
        raise StoreError(
            f"the metadata of store {url} (zarr.json) is unreadable ({_why(exc)}): the store is "
            "damaged; re-create it with `bevcache extract --overwrite`."
        ) from None


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 200 else text[:197] + "..."


def _chunk_reason(exc: BaseException) -> str:
    if "checksum" in str(exc).lower():
        return "CRC32C checksum mismatch: the chunk's bytes changed after it was written"
    return _why(exc)


def _rows_text(rows: np.ndarray) -> str:
    """'3-7, 12, 20-25' from sorted row numbers, at most _MAX_LISTED ranges."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate([[rows[0]], rows[breaks + 1]])
    ends = np.concatenate([rows[breaks], [rows[-1]]])
    parts = [f"{s}" if s == e else f"{s}-{e}" for s, e in zip(starts[:_MAX_LISTED], ends[:_MAX_LISTED], strict=True)]
    more = len(starts) - _MAX_LISTED
    return ", ".join(parts) + (f" and {more} more ranges" if more > 0 else "")


def _decode_tokens(table: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\x00").decode("utf-8", errors="replace") for row in table]


def _check_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be JSON-serialisable (str/int/float/bool/None/list/dict): {exc}.") from None


def store_exists(url: str, *, storage_options: dict | None = None) -> bool:
    """True if a zarr store is at url (a bevcache one, or a damaged one): creating needs overwrite."""
    return _has_group_doc(url, storage_options)


# ---------------------------------------------------------------------------------------------
# Creating and opening


def create_store(
    url: str,
    *,
    num_samples: int,
    layers: list[LayerSpec],
    dtype: str,
    tokens: list[str],
    sample_idx: list[int],
    metadata: dict,
    chunk_rows: int = 256,
    overwrite: bool = False,
    storage_options: dict | None = None,
    views: int = 0,
) -> FeatureStore:
    """Create an empty store for num_samples rows of the given layers (and `views` augmented
    views per row and layer); returns it opened r+."""
    dtype = _parse_dtype(dtype)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer. Got {num_samples!r}.")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be a positive integer. Got {chunk_rows!r}.")
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 0:
        raise ConfigError(f"views must be a non-negative integer. Got {views!r}.")
    num_samples, chunk_rows, views = int(num_samples), int(chunk_rows), int(views)
    layers = list(layers)
    if not layers or not all(isinstance(s, LayerSpec) for s in layers):
        raise ConfigError(f"layers must be a non-empty list of LayerSpec. Got {layers!r}.")
    arrays = [s.array_name for s in layers]
    if len(set(arrays)) != len(arrays):
        raise ConfigError(f"layer names must be distinct (after '.' -> '__'). Got {[s.name for s in layers]}.")
    tokens = [str(t) for t in tokens]
    if len(tokens) != num_samples or len(sample_idx) != num_samples:
        raise ConfigError(
            f"tokens and sample_idx must have num_samples={num_samples} entries. "
            f"Got {len(tokens)} tokens and {len(sample_idx)} sample_idx."
        )
    if any("\x00" in t for t in tokens):
        raise ConfigError("sample tokens must not contain NUL characters (they pad the tokens array).")
    metadata = _check_json(dict(metadata), "metadata")
    clash = sorted(set(metadata) & set(RESERVED))
    if clash:
        raise ConfigError(f"metadata may not set the store's own keys {clash}: they come from the arguments.")
    fingerprint = fingerprint_tokens(tokens)
    dataset = dict(metadata.get("dataset") or {})
    for key, value in fingerprint.items():
        if key in dataset and dataset[key] != value:
            raise ConfigError(
                f"metadata['dataset'][{key!r}] = {dataset[key]!r} but the tokens passed give {value!r}: "
                "pass the fingerprint of these tokens (fingerprint_tokens(tokens))."
            )
    dataset.update(fingerprint)

    if _holds_anything(url, storage_options):
        if not store_exists(url, storage_options=storage_options):
            raise StoreError(f"{url} is not empty and holds no zarr store: refusing to write there; choose another URL.")
        if not overwrite:
            raise StoreError(
                f"{url} already holds a store: pass overwrite=True (`bevcache extract --overwrite`) to "
                "replace it, or open_store(url, mode='r+') (`--resume`) to continue it."
            )

    token_bytes = [t.encode("utf-8") for t in tokens]
    width = max(1, max(len(b) for b in token_bytes))
    meta = {
        **metadata,
        "format_version": FORMAT_VERSION,
        "num_samples": num_samples,
        "chunk_rows": chunk_rows,
        "dtype": dtype,
        "layers": [{"name": s.name, "array": s.array_name, "dim": int(s.dim), "pooling": s.pooling} for s in layers],
        "token_width": width,
        "views": views,
        "dataset": dataset,
        "created": metadata.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": metadata.get("finished"),
        "layout_ready": False,  # set once every array exists, so an interrupted create is recognised
    }
    store = _make_store(url, read_only=False, storage_options=storage_options)
    group = zarr.open_group(store=store, mode="w" if overwrite else "w-", zarr_format=3, attributes={"bevcache": meta})
    for spec in layers:
        group.create_array(f"features/{spec.array_name}", shape=(num_samples, int(spec.dim)),
                           chunks=(chunk_rows, int(spec.dim)), dtype=dtype, fill_value=np.nan,
                           attributes={"layer": spec.name, "pooling": spec.pooling}, **_codecs())
        if views:
            group.create_array(f"views/{spec.array_name}", shape=(num_samples, views, int(spec.dim)),
                               chunks=(chunk_rows, views, int(spec.dim)), dtype=dtype, fill_value=np.nan,
                               attributes={"layer": spec.name, "pooling": spec.pooling}, **_codecs())
    if views:
        group.create_array("view_digests", shape=(num_samples, views), chunks=(chunk_rows, views), dtype="int64",
                           fill_value=0, **_codecs())
    group.create_array("complete", shape=(num_samples,), chunks=(chunk_rows,), dtype="uint8", fill_value=0, **_codecs())
    tok = group.create_array("tokens", shape=(num_samples, width), chunks=(chunk_rows, width), dtype="uint8",
                             fill_value=0, **_codecs())
    table = np.zeros((num_samples, width), dtype=np.uint8)
    for i, b in enumerate(token_bytes):
        table[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    tok[:] = table
    idx = group.create_array("sample_idx", shape=(num_samples,), chunks=(chunk_rows,), dtype="int64",
                             fill_value=0, **_codecs())
    idx[:] = np.asarray(sample_idx, dtype=np.int64)
    meta["layout_ready"] = True
    group.attrs["bevcache"] = meta
    return FeatureStore(url, group=group, mode="r+")


def _parse_dtype(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}. Got {dtype!r}.")
    return name


def open_store(url: str, *, mode: str = "r", storage_options: dict | None = None) -> FeatureStore:
    """Open an existing store ("r" read-only, "r+" to write blocks); reads metadata only."""
    if mode not in ("r", "r+"):
        raise ConfigError(f"mode must be one of ['r', 'r+']. Got {mode!r}.")
    group = _open_group(url, mode=mode, storage_options=storage_options)
    return FeatureStore(url, group=group, mode=mode)


# ---------------------------------------------------------------------------------------------
# The store


class FeatureStore:
    """An opened store. Arrays, tokens and sample_idx are read on first use, never at open."""

    def __init__(self, url: str, *, group: zarr.Group, mode: str) -> None:
        self.url = str(url)
        self._group = group
        self._mode = mode
        meta = group.attrs.get("bevcache")
        if not isinstance(meta, dict):
            raise StoreError(
                f"{url} is a zarr group but not a bevcache store (no 'bevcache' attributes): "
                "choose another URL or create the store with `bevcache extract`."
            )
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"store {url} has format_version {version!r}; this bevcache reads up to {FORMAT_VERSION}: "
                "upgrade bevcache or re-create the store."
            )
        try:
            self.num_samples = int(meta["num_samples"])
            self.chunk_rows = int(meta["chunk_rows"])
            self.dtype = _parse_dtype(meta["dtype"])
            self.layers = {d["name"]: LayerSpec(name=d["name"], dim=int(d["dim"]), pooling=d["pooling"])
                           for d in meta["layers"]}
            self._token_width = int(meta["token_width"])
            self.num_views = int(meta.get("views", 0))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise StoreError(
                f"the bevcache metadata of store {url} is garbled ({_why(exc)}): re-create it with "
                "`bevcache extract --overwrite`."
            ) from None
        if not meta.get("layout_ready", False):
            raise StoreError(
                f"store {url} was never finished being created (its creation was interrupted): "
                "re-create it with `bevcache extract --overwrite`."
            )
        self._meta = meta
        self._arrays: dict[str, zarr.Array] = {}

    def __repr__(self) -> str:
        return (f"FeatureStore({self.url!r}, mode={self._mode!r}, num_samples={self.num_samples}, "
                f"layers={list(self.layers)}, dtype={self.dtype!r})")

    # -- metadata ----------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        """A copy of the bevcache metadata (teacher, dataset, split, created, finished, ...)."""
        return copy.deepcopy(self._meta)

    @cached_property
    def tokens(self) -> list[str]:
        return _decode_tokens(self._read_whole("tokens"))

    @cached_property
    def sample_idx(self) -> np.ndarray:
        return self._read_whole("sample_idx")

    def set_attrs(self, **kv: Any) -> None:
        """Merge kv into the bevcache metadata (e.g. finished=...). Creator process only."""
        self._check_writable()
        clash = sorted(set(kv) & set(RESERVED))
        if clash:
            raise ConfigError(f"set_attrs may not change the store's layout keys {clash}.")
        kv = _check_json(kv, "set_attrs values")
        meta = {**self._meta, **kv}
        try:
            self._group.attrs["bevcache"] = meta
        except Exception as exc:
            raise StoreError(f"could not write the metadata of store {self.url} ({_why(exc)}).") from exc
        self._meta = meta

    # -- blocks and completeness -------------------------------------------------------------

    def blocks(self) -> list[tuple[int, int]]:
        """Chunk-aligned [start, stop) row blocks covering all rows."""
        n, c = self.num_samples, self.chunk_rows
        return [(s, min(s + c, n)) for s in range(0, n, c)]

    def complete_mask(self) -> np.ndarray:
        """bool [num_samples]: rows whose features are durable. Damaged mask chunks count as not."""
        return self._read_mask()[0]

    def pending_blocks(self) -> list[tuple[int, int]]:
        """Blocks with at least one row not complete, in row order."""
        mask = self.complete_mask()
        return [(s, e) for s, e in self.blocks() if not mask[s:e].all()]

    def write_block(self, start: int, features: dict[str, np.ndarray], *,
                    views: dict[str, np.ndarray] | None = None, digests: np.ndarray | None = None) -> None:
        """Write rows [start, start+n) of every layer (and, in a store with views, every layer's
        [n, K, dim] views and the [n, K] input digests), then mark them complete."""
        self._check_writable()
        start = int(start)
        if not 0 <= start < self.num_samples or start % self.chunk_rows:
            raise StoreError(
                f"write_block(start={start}) on store {self.url}: a block must start at a multiple of "
                f"chunk_rows={self.chunk_rows} below num_samples={self.num_samples} (see FeatureStore.blocks())."
            )
        stop = min(start + self.chunk_rows, self.num_samples)
        missing = [n for n in self.layers if n not in features]
        extra = [n for n in features if n not in self.layers]
        if missing or extra:
            raise StoreError(
                f"write_block rows {start}-{stop - 1} of store {self.url}: features must have exactly "
                f"the layers {list(self.layers)}; missing {missing}, unexpected {extra}."
            )
        if bool(self.num_views) != (views is not None) or (views is not None) != (digests is not None):
            raise StoreError(
                f"write_block rows {start}-{stop - 1} of store {self.url}: the store has {self.num_views} "
                "augmented views per row; pass views= and digests= exactly when it has some."
            )
        out: dict[str, np.ndarray] = {}
        for name, spec in self.layers.items():
            out[self._feature_path(name)] = self._checked(name, start, features[name], (stop - start, spec.dim))
            if views is not None:
                if name not in views:
                    raise StoreError(f"write_block rows {start}-{stop - 1} of store {self.url}: views lack layer {name!r}.")
                out[self._view_path(name)] = self._checked(name, start, views[name],
                                                           (stop - start, self.num_views, spec.dim))
        if digests is not None:
            digests = np.asarray(digests, dtype=np.int64)
            if digests.shape != (stop - start, self.num_views):
                raise StoreError(f"write_block rows {start}-{stop - 1} of store {self.url}: digests must have "
                                 f"shape ({stop - start}, {self.num_views}). Got {digests.shape}.")
            out["view_digests"] = digests
        # All checked: only now touch the store. Clear an existing mark first so a crash while
        # rewriting a complete block cannot leave old marks over half-new features.
        mask_arr = self._array("complete")
        try:
            if self._read_rows_or_none(mask_arr, start, stop) is not False:
                mask_arr[start:stop] = 0
            for path, value in out.items():
                self._array(path)[start:stop] = value
            mask_arr[start:stop] = 1
        except Exception as exc:
            full = any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in (exc, exc.__cause__, exc.__context__))
            raise StoreError(
                f"writing rows {start}-{stop - 1} of store {self.url} failed ({_why(exc)}): "
                + ("the disk is full: free space there, then run the same `bevcache extract` with --resume "
                   "(finished rows are kept)." if full else
                   "those rows stay marked not written; run `bevcache extract --resume` again.")
            ) from exc

    def _checked(self, layer: str, start: int, value: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A block of one layer as an array of the store dtype, refused if mis-shaped or not finite."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        value = np.asarray(value)
        if value.shape != shape:
            raise StoreError(
                f"write_block rows {start}-{start + shape[0] - 1}, layer {layer!r} of store {self.url}: expected "
                f"shape {shape} (the block's rows x {'views x ' if len(shape) == 3 else ''}the layer's dim). "
                f"Got {value.shape}."
            )
        self._check_finite(layer, start, value, "NaN/Inf")
        with np.errstate(over="ignore"):  # overflow to Inf is reported just below, by row
            cast = value.astype(self.dtype)
        self._check_finite(layer, start, cast, f"values beyond the {self.dtype} range")
        return cast

    def reset_blocks(self, blocks: list[tuple[int, int]]) -> None:
        """Mark whole blocks not written, so pending_blocks() (and --resume) redoes them."""
        self._check_writable()
        valid = dict(self.blocks())
        for start, stop in blocks:
            if valid.get(start) != stop:
                raise StoreError(f"({start}, {stop}) is not a block of store {self.url}; blocks are FeatureStore.blocks().")
            self._array("complete")[start:stop] = 0

    # -- reading -----------------------------------------------------------------------------

    def read_table(self, layer: str, *, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32, allow_incomplete: bool = False,
                   views: bool = False) -> torch.Tensor:
        """The whole [num_samples, dim] table of a layer (views=True: its [num_samples, K, dim]
        augmented views), read in one bulk call.

        Raises StoreError if any row is not written yet (allow_incomplete=True returns them as NaN)
        or a chunk is damaged or missing.
        """
        path = self._view_path(layer) if views else self._feature_path(layer)
        mask, _ = self._read_mask()
        if not allow_incomplete and not mask.all():
            rows = np.flatnonzero(~mask)
            raise StoreError(
                f"store {self.url} is incomplete: {rows.size} of {self.num_samples} rows are not written "
                f"(rows {_rows_text(rows)}); run `bevcache extract --resume` to finish it."
            )
        table, bad = self._read_array(path)
        bad = [b for b in bad if mask[b[0]:b[1]].any()]  # damage in unwritten rows is redone anyway
        if bad:
            raise StoreError(self._damage_text(path, bad))
        # A missing chunk reads as NaN (the fill value) in every column; write_block never stores NaN.
        lost = np.flatnonzero(np.isnan(table.reshape(len(table), -1)[:, 0]) & mask)
        if lost.size:
            raise StoreError(
                f"array {path} of store {self.url}: rows {_rows_text(lost)} are marked complete but hold "
                "no data (chunk files missing); run `bevcache verify`, then reset those blocks and resume."
            )
        return torch.from_numpy(table).to(device=device, dtype=dtype)

    def read_digests(self) -> np.ndarray:
        """int64 [num_samples, K]: the digest of each view's augmented input (see bevcache.replay)."""
        self._require_views()
        return self._read_whole("view_digests")

    def read_rows(self, layer: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a layer straight from the store (unwritten rows read as NaN)."""
        path = self._feature_path(layer)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise StoreError(f"rows must lie in [0, {self.num_samples}) for store {self.url}. Got {rows.min()}..{rows.max()}.")
        try:
            return self._array(path).oindex[rows]
        except Exception as exc:
            raise StoreError(f"reading rows of array {path} of store {self.url} failed ({_why(exc)}); "
                             "run `bevcache verify` to locate the damage.") from exc

    # -- checking ----------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Read every chunk of every array; return the problems found (empty if none)."""
        problems: list[str] = []
        mask, bad_mask = self._read_mask()
        missing = np.flatnonzero(~mask)
        if missing.size:
            # A torn completion chunk is what a kill during its write leaves: not damage, just not written.
            torn = "".join(f"; rows {s}-{e - 1} have an unreadable completion chunk (an interrupted write)"
                           for s, e, _ in bad_mask[:_MAX_LISTED])
            problems.append(
                f"complete: {missing.size} of {self.num_samples} rows are not written (rows "
                f"{_rows_text(missing)}){torn}; run `bevcache extract --resume` to finish the store."
            )
        layer_paths = [self._feature_path(n) for n in self.layers]
        layer_paths += [self._view_path(n) for n in self.layers] if self.num_views else []
        for path in layer_paths:
            try:
                table, bad = self._read_array(path)
            except StoreError as exc:
                problems.append(str(exc))
                continue
            bad = [b for b in bad if mask[b[0]:b[1]].any()]  # unwritten blocks get rewritten anyway
            if bad:
                problems.append(self._damage_text(path, bad))
            done = mask.copy()
            for s, e, _ in bad:
                done[s:e] = False
            table = table.reshape(len(table), -1)
            finite = np.isfinite(table).all(axis=1)
            empty = np.isnan(table).all(axis=1)
            lost = np.flatnonzero(done & empty)
            if lost.size:
                problems.append(
                    f"{path}: rows {_rows_text(lost)} are marked complete but hold no data (chunk files "
                    "missing); reset their blocks (FeatureStore.reset_blocks) and run `bevcache extract --resume`."
                )
            odd = np.flatnonzero(done & ~finite & ~empty)
            if odd.size:
                problems.append(f"{path}: rows {_rows_text(odd)} contain NaN/Inf; reset their blocks and re-extract.")
        for path in ("tokens", "sample_idx") + (("view_digests",) if self.num_views else ()):
            try:
                data, bad = self._read_array(path)
            except StoreError as exc:
                problems.append(str(exc))
                continue
            if bad:
                problems.append(self._damage_text(path, bad, consequence="re-create the store with `bevcache extract --overwrite`"))
            elif path == "tokens":
                found = fingerprint_tokens(_decode_tokens(data))
                recorded = {k: self._meta.get("dataset", {}).get(k) for k in found}
                if found != recorded:
                    problems.append(
                        f"tokens: fingerprint {found} differs from the one recorded at creation {recorded}; "
                        "re-create the store with `bevcache extract --overwrite`."
                    )
        return problems

    def info(self) -> dict:
        """Summary for humans and the CLI: completeness, layers, provenance and sizes."""
        mask = self.complete_mask()
        itemsize = np.dtype(self.dtype).itemsize
        n = self.num_samples
        per_row = (1 + self.num_views) * sum(s.dim for s in self.layers.values()) * itemsize + 8 * self.num_views
        bytes_raw = n * per_row + n * (1 + self._token_width + 8)
        on_disk = self._bytes_on_disk()
        return {
            "url": self.url,
            "num_samples": n,
            "num_complete": int(mask.sum()),
            "complete": bool(mask.all()),
            "layers": {s.name: {"dim": s.dim, "dtype": self.dtype, "pooling": s.pooling} for s in self.layers.values()},
            "dtype": self.dtype,
            "views": self.num_views,
            "augmentation": {k: v for k, v in (self._meta.get("augmentation") or {}).items() if k != "pipeline"} or None,
            "chunk_rows": self.chunk_rows,
            "teacher": self._meta.get("teacher"),
            "dataset": self._meta.get("dataset"),
            "split": self._meta.get("split"),
            "created": self._meta.get("created"),
            "finished": self._meta.get("finished"),
            "format_version": self._meta.get("format_version"),
            "bytes_on_disk": on_disk,
            "bytes_raw": bytes_raw,
            "compression_ratio": (bytes_raw / on_disk) if on_disk else None,
        }

    def check_matches(self, *, dataset: dict | None = None, teacher: dict | None = None,
                      layers: list[LayerSpec] | None = None, dtype: str | None = None,
                      views: int | None = None, augmentation: dict | None = None) -> None:
        """Raise StoreMismatch listing every way this store differs from what the caller expects.

        Only keys given in dataset/teacher are compared; stored layers beyond `layers` are fine.
        """
        diffs: list[str] = []
        for section, expected in (("dataset", dataset), ("teacher", teacher), ("augmentation", augmentation)):
            if expected is None:
                continue
            found = self._meta.get(section) or {}
            for key, want in _check_json(dict(expected), section).items():
                have = found.get(key, "<absent>")
                if have != want:
                    diffs.append(f"{section} {key}: expected {want!r}, found {have!r}")
        for spec in layers or []:
            have = self.layers.get(spec.name)
            if have is None:
                diffs.append(f"layer {spec.name!r}: expected, not in the store (it has {list(self.layers)})")
                continue
            if have.dim != spec.dim:
                diffs.append(f"layer {spec.name!r} dim: expected {spec.dim}, found {have.dim}")
            if have.pooling != spec.pooling:
                diffs.append(f"layer {spec.name!r} pooling: expected {spec.pooling!r}, found {have.pooling!r}")
        if dtype is not None and _parse_dtype(dtype) != self.dtype:
            diffs.append(f"dtype: expected {_parse_dtype(dtype)!r}, found {self.dtype!r}")
        if views is not None and int(views) != self.num_views:
            diffs.append(f"augmented views per sample: expected {int(views)}, found {self.num_views}")
        if diffs:
            raise StoreMismatch(
                f"store {self.url} was made for something else:\n  - " + "\n  - ".join(diffs)
                + "\nre-extract with `bevcache extract --overwrite`, or point to the matching store."
            )

    # -- internals ---------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._mode != "r+":
            raise StoreError(f"store {self.url} was opened read-only: open it with open_store(url, mode='r+') to write.")

    def _feature_path(self, layer: str) -> str:
        spec = self.layers.get(layer) or next((s for s in self.layers.values() if s.array_name == layer), None)
        if spec is None:
            raise StoreError(f"layer {layer!r} is not in store {self.url}; layers present: {list(self.layers)}.")
        return f"features/{spec.array_name}"

    def _require_views(self) -> None:
        if not self.num_views:
            raise StoreError(f"store {self.url} has no augmented views (it was extracted without --views); "
                             "re-extract with `bevcache extract --views K` to replay augmentation.")

    def _view_path(self, layer: str) -> str:
        self._require_views()
        return "views/" + self._feature_path(layer).split("/", 1)[1]

    def _expected(self, path: str) -> tuple[tuple[int, ...], str]:
        n = self.num_samples
        if path == "complete":
            return (n,), "uint8"
        if path == "tokens":
            return (n, self._token_width), "uint8"
        if path == "sample_idx":
            return (n,), "int64"
        if path == "view_digests":
            return (n, self.num_views), "int64"
        kind, name = path.split("/", 1)
        dim = next(s.dim for s in self.layers.values() if s.array_name == name)
        return ((n, self.num_views, dim) if kind == "views" else (n, dim)), self.dtype

    def _array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            try:
                arr = self._group[path]
            except KeyError:
                raise StoreError(f"array {path} is missing from store {self.url}: re-create it with "
                                 "`bevcache extract --overwrite`.") from None
            except Exception as exc:
                raise StoreError(f"the metadata of array {path} in store {self.url} is unreadable ({_why(exc)}): "
                                 "re-create the store with `bevcache extract --overwrite`.") from None
            shape, dtype = self._expected(path)
            if not isinstance(arr, zarr.Array) or arr.shape != shape or arr.dtype != np.dtype(dtype) \
                    or arr.chunks[0] != self.chunk_rows:
                raise StoreError(
                    f"array {path} of store {self.url} does not match the store's metadata (expected shape "
                    f"{shape} {dtype}, chunks of {self.chunk_rows} rows; found {getattr(arr, 'shape', arr)} "
                    f"{getattr(arr, 'dtype', '')}, chunks {getattr(arr, 'chunks', '')}): re-create the store."
                )
            self._arrays[path] = arr
        return self._arrays[path]

    def _read_array(self, path: str) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
        """Whole array in one call; if that fails, chunk by chunk to find the bad [start, stop) blocks."""
        arr = self._array(path)
        try:
            return arr[...], []
        except Exception:
            pass
        out = np.empty(arr.shape, dtype=arr.dtype)
        bad = []
        for s, e in self.blocks():
            try:
                out[s:e] = arr[s:e]
            except Exception as exc:
                out[s:e] = arr.fill_value
                bad.append((s, e, _chunk_reason(exc)))
        return out, bad

    def _read_whole(self, path: str) -> np.ndarray:
        data, bad = self._read_array(path)
        if bad:
            raise StoreError(self._damage_text(path, bad, consequence="re-create the store with `bevcache extract --overwrite`"))
        return data

    def _read_mask(self) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
        data, bad = self._read_array("complete")
        return data == 1, bad

    def _read_rows_or_none(self, arr: zarr.Array, start: int, stop: int) -> bool | None:
        """Whether any of the rows is set; None if unreadable (then it is cleared anyway)."""
        try:
            return bool(arr[start:stop].any())
        except Exception:
            return None

    def _damage_text(self, path: str, bad: list[tuple[int, int, str]], *,
                     consequence: str = "reset these blocks (FeatureStore.reset_blocks) and run "
                                        "`bevcache extract --resume` to rewrite them") -> str:
        ranges = ", ".join(f"{s}-{e - 1}" for s, e, _ in bad[:_MAX_LISTED])
        more = f" and {len(bad) - _MAX_LISTED} more blocks" if len(bad) > _MAX_LISTED else ""
        return (f"array {path} of store {self.url} is damaged: rows {ranges}{more} cannot be read "
                f"({bad[0][2]}); {consequence}.")

    def _check_finite(self, layer: str, start: int, value: np.ndarray, what: str) -> None:
        if value.dtype.kind != "f":
            if value.dtype.kind in "iub":
                return
            raise StoreError(f"layer {layer!r}: features must be a float array. Got dtype {value.dtype}.")
        bad = np.flatnonzero(~np.isfinite(value.reshape(value.shape[0], -1)).all(axis=1))
        if bad.size == 0:
            return
        named = []
        for r in bad[:_MAX_LISTED]:
            row = start + int(r)
            named.append(f"{row} (token {self._token_or_unknown(row)})")
        more = f" and {bad.size - _MAX_LISTED} more" if bad.size > _MAX_LISTED else ""
        raise FeatureValueError(
            f"layer {layer!r} has {what} at dataset index {', '.join(named)}{more}; nothing of rows "
            f"{start}-{start + value.shape[0] - 1} was written to {self.url}. Check the teacher checkpoint and inputs."
        )

    def _token_or_unknown(self, row: int) -> str:
        try:
            return repr(self.tokens[row])
        except StoreError:
            return "unknown"

    def _bytes_on_disk(self) -> int | None:
        if not _is_remote(self.url):
            total = 0
            for root, _, files in os.walk(_local_root(self.url)):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
            return total
        try:
            return int(sync(self._group.store.getsize_prefix("")))
        except Exception:
            return None
