"""Spatial layers of bevcache.store (spatial/<layer>, spatial_views/<layer>): sharded float16 maps,
one inner chunk per sample; the same guarantees as pooled features (checksums, mask after data,
kill -9 + resume identical, damage named by row)."""

import json
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from bevcache.errors import FeatureValueError, StoreError, StoreMismatch
from bevcache.store import SpatialSpec, create_store, open_store

from .test_store import LAYERS, features_for, tokens_for

REPO = Path(__file__).resolve().parents[1]
GRID = (8, 6, 5)  # C, h, w
SPATIAL = {"pts_neck": GRID, "pts_backbone.blocks.1": (3, 4, 4)}


def make_spatial_store(tmp_path: Path, *, n: int = 10, chunk_rows: int = 4, views: int = 0,
                       name: str = "spatial.zarr", url: str | None = None, **kw):
    return create_store(url or str(tmp_path / name), num_samples=n, layers=LAYERS[:1], dtype="float32",
                        tokens=tokens_for(n), sample_idx=list(range(n)), metadata={"split": "train"},
                        chunk_rows=chunk_rows, views=views, spatial=SPATIAL, **kw)


def smooth_maps(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Smooth, post-ReLU-like maps [n, *shape] (low-frequency waves, exact zeros), float32."""
    rng = np.random.default_rng(seed)
    *lead, h, w = shape
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    freq = rng.uniform(0.5, 3, (n, *lead, 2, 1, 1))
    phase = rng.uniform(0, 6.3, (n, *lead, 1, 1))
    maps = np.sin(freq[..., 0, :, :] * 6.3 * y + phase) * np.cos(freq[..., 1, :, :] * 6.3 * x)
    return np.maximum(maps + rng.normal(0, 0.05, maps.shape), 0).astype(np.float32)


def block_args(store, start: int, stop: int, seed: int = 0) -> dict:
    """write_block keywords for rows [start, stop): deterministic per row, so any block order agrees."""
    n, k = store.num_samples, store.num_views
    args = {"features": {k_: v[start:stop] for k_, v in features_for(n, LAYERS[:1], seed).items()},
            "spatial": {name: smooth_maps(n, shape, seed)[start:stop] for name, shape in SPATIAL.items()}}
    if k:
        rng = np.random.default_rng(seed)
        args["views"] = {"pts_neck": rng.random((n, k, 16), np.float32)[start:stop]}
        args["digests"] = np.arange(n * k, dtype=np.int64).reshape(n, k)[start:stop]
        args["spatial_views"] = {name: smooth_maps(n, (k, *shape), seed + 1)[start:stop] for name, shape in SPATIAL.items()}
    return args


def write_blocks(store, blocks=None, seed: int = 0) -> None:
    for s, e in blocks if blocks is not None else store.blocks():
        args = block_args(store, s, e, seed)
        store.write_block(s, args.pop("features"), **args)


def shard_file(store, layer_array: str, block: int, kind: str = "spatial") -> Path:
    return Path(store.url) / kind / layer_array / "c" / str(block) / "0" / "0" / "0"


# ---------------------------------------------------------------------------------------------
# Layout and round trips


def test_spatial_round_trip_layout_and_metadata(tmp_path):
    store = make_spatial_store(tmp_path)
    blocks = store.blocks()
    random.Random(0).shuffle(blocks)
    write_blocks(store, blocks)
    again = open_store(store.url)
    want = smooth_maps(10, GRID).astype(np.float16)
    rows = np.array([9, 0, 4, 4, 7])
    got = again.read_spatial("pts_neck", rows)
    assert got.dtype == np.float16 and got.shape == (5, *GRID)
    np.testing.assert_array_equal(got, want[rows])
    np.testing.assert_array_equal(again.read_spatial("pts_backbone__blocks__1", [3]),
                                  smooth_maps(10, (3, 4, 4))[[3]].astype(np.float16))
    assert again.verify() == []

    attrs = again.attrs
    assert attrs["format_version"] == 2  # a bevcache without spatial support refuses to resume it
    assert attrs["spatial"][0] == {"name": "pts_neck", "array": "pts_neck", "channels": 8, "height": 6, "width": 5,
                                   "dtype": "float16"}
    assert again.spatial["pts_backbone.blocks.1"] == SpatialSpec("pts_backbone.blocks.1", 3, 4, 4)
    meta = json.loads((Path(store.url) / "spatial" / "pts_neck" / "zarr.json").read_text())
    assert meta["shape"] == [10, *GRID] and meta["data_type"] == "float16"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, *GRID]  # one shard per block
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [1, *GRID]  # one inner chunk per sample
    assert [c["name"] for c in sharding["configuration"]["codecs"]] == ["bytes", "blosc", "crc32c"]
    assert [c["name"] for c in sharding["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    assert sorted(p.name for p in (Path(store.url) / "spatial" / "pts_neck" / "c").iterdir()) == ["0", "1", "2"]

    info = again.info()
    assert info["spatial"]["pts_neck"]["channels"] == 8 and info["spatial"]["pts_neck"]["dtype"] == "float16"
    assert 0 < info["spatial"]["pts_neck"]["bytes_on_disk"] < info["bytes_on_disk"]
    assert info["spatial"]["pts_neck"]["bytes_raw"] == 10 * 8 * 6 * 5 * 2
    assert info["bytes_raw"] == 10 * (16 * 4 + (8 * 6 * 5 + 3 * 4 * 4) * 2) + 10 * (1 + 7 + 8)


def test_a_store_without_spatial_layers_is_unchanged(tmp_path):
    store = create_store(str(tmp_path / "plain.zarr"), num_samples=4, layers=LAYERS[:1], dtype="float16",
                         tokens=tokens_for(4), sample_idx=[0, 1, 2, 3], metadata={})
    assert store.attrs["format_version"] == 1 and "spatial" not in store.attrs and store.spatial == {}
    assert not (Path(store.url) / "spatial").exists() and store.info()["spatial"] == {}
    with pytest.raises(StoreError, match=r"spatial layer 'pts_neck' is not in store .*spatial layers present: \[\]"):
        store.read_spatial("pts_neck", [0])
    with pytest.raises(StoreError, match=r"spatial must have exactly the layers \[\]; missing \[\], unexpected \['x'\]"):
        store.write_block(0, features_for(4, LAYERS[:1]), spatial={"x": np.zeros((4, 1, 1, 1))})


def test_read_spatial_touches_only_each_rows_inner_chunk(tmp_path, monkeypatch):
    store = make_spatial_store(tmp_path)
    write_blocks(store)
    reader = open_store(store.url)
    reader.read_spatial("pts_neck", [0])  # arrays opened (their zarr.json read) before counting
    reads = []
    real_get = zarr.storage.LocalStore.get

    async def recording_get(self, key, prototype=None, byte_range=None):
        value = await real_get(self, key, prototype, byte_range)
        reads.append((key, byte_range, 0 if value is None else len(value)))
        return value

    monkeypatch.setattr(zarr.storage.LocalStore, "get", recording_get)
    reader.read_spatial("pts_neck", [5])
    shard_reads = [r for r in reads if r[0].startswith("spatial/pts_neck/c/")]
    assert {r[0] for r in shard_reads} == {"spatial/pts_neck/c/1/0/0/0"}
    assert all(r[1] is not None for r in shard_reads)  # byte ranges: the shard index, then one inner chunk
    assert sum(r[2] for r in shard_reads) < shard_file(store, "pts_neck", 1).stat().st_size / 2
    assert {r[0] for r in reads} - {r[0] for r in shard_reads} <= {"complete/c/1"}  # and its mask chunk


def _read_in_child(store, rows: list[int]) -> list:
    return store.read_spatial("pts_neck", rows).tolist()


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_read_spatial_in_loader_workers(tmp_path, start):
    store = make_spatial_store(tmp_path)
    write_blocks(store)
    reader = open_store(store.url)
    reader.read_spatial("pts_neck", [0])  # the parent has used zarr's event loop before forking
    with multiprocessing.get_context(start).Pool(1) as pool:  # spawn: the store is pickled as its URL
        got = pool.starmap(_read_in_child, [(reader, [1, 8]), (reader, [9])])
    np.testing.assert_array_equal(np.array(got[0], np.float16), smooth_maps(10, GRID).astype(np.float16)[[1, 8]])
    assert pickle.loads(pickle.dumps(store)).__repr__() == repr(store)  # mode r+ kept


def test_views_are_read_by_view_number(tmp_path):
    store = make_spatial_store(tmp_path, views=2)
    write_blocks(store)
    plain = smooth_maps(10, GRID).astype(np.float16)
    views = smooth_maps(10, (2, *GRID), 1).astype(np.float16)
    got = open_store(store.url).read_spatial("pts_neck", [3, 3, 3, 9], views=[0, 1, 2, 2])
    np.testing.assert_array_equal(got, np.stack([plain[3], views[3, 0], views[3, 1], views[9, 1]]))
    meta = json.loads((Path(store.url) / "spatial_views" / "pts_neck" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 1, *GRID]  # a shard per block and view
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [1, 1, *GRID]  # one (sample, view) per inner chunk
    assert store.verify() == [] and store.info()["spatial"]["pts_neck"]["bytes_raw"] == 10 * 3 * 8 * 6 * 5 * 2
    with pytest.raises(StoreError, match=r"views must give one view in \[0, 2\]"):
        store.read_spatial("pts_neck", [1], views=[3])
    args = block_args(store, 0, 4)
    del args["spatial_views"]
    with pytest.raises(StoreError, match=r"spatial_views must have exactly the layers"):
        store.write_block(0, args.pop("features"), **args)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_bad_spatial_values_are_refused_before_anything_is_written(tmp_path):
    store = make_spatial_store(tmp_path)
    args = block_args(store, 4, 8)
    args["spatial"]["pts_neck"][2, 1, 0, 0] = np.inf
    with pytest.raises(FeatureValueError, match=r"'pts_neck' has NaN/Inf at dataset index 6 \(token 'tok0006'\)"):
        store.write_block(4, args["features"], spatial=args["spatial"])
    args = block_args(store, 4, 8)
    args["spatial"]["pts_backbone.blocks.1"][0, 0, 0, 0] = 1e6  # Inf once cast to float16
    with pytest.raises(FeatureValueError, match="beyond the float16 range at dataset index 4"):
        store.write_block(4, args["features"], spatial=args["spatial"])
    args = block_args(store, 4, 8)
    with pytest.raises(StoreError, match=r"expected shape \(4, 8, 6, 5\) \(the block's rows x the map's C x h x w\)"):
        store.write_block(4, args["features"], spatial={**args["spatial"], "pts_neck": np.zeros((4, 8, 5, 6))})
    with pytest.raises(StoreError, match=r"spatial must have exactly the layers .* missing \['pts_neck'\]"):
        store.write_block(4, args["features"], spatial={"pts_backbone.blocks.1": args["spatial"]["pts_backbone.blocks.1"]})
    with pytest.raises(StoreError, match="spatial must have exactly the layers"):
        store.write_block(4, args["features"])
    assert not store.complete_mask().any() and not (Path(store.url) / "spatial" / "pts_neck" / "c").exists()


def test_read_spatial_refuses_unwritten_rows_and_bad_arguments(tmp_path):
    store = make_spatial_store(tmp_path)
    write_blocks(store, [(0, 4), (8, 10)])
    with pytest.raises(StoreError, match=r"2 of 10 rows are not written \(rows 5-6\); run `bevcache extract --resume`"):
        store.read_spatial("pts_neck", [0, 5, 6, 9])
    with pytest.raises(StoreError, match=r"rows must lie in \[0, 10\)"):
        store.read_spatial("pts_neck", [10])
    with pytest.raises(StoreError, match="spatial layer 'img_neck' is not in store"):
        store.read_spatial("img_neck", [0])
    assert store.read_spatial("pts_neck", []).shape == (0, *GRID)
    problems = store.verify()
    assert len(problems) == 1 and "rows 4-7" in problems[0] and "not written" in problems[0]


def test_check_matches_compares_spatial_layers(tmp_path):
    store = make_spatial_store(tmp_path)
    store.check_matches(spatial=SPATIAL)
    store.check_matches(spatial=[SpatialSpec("pts_neck", *GRID), SpatialSpec("pts_backbone.blocks.1", 3, 4, 4)])
    with pytest.raises(StoreMismatch) as err:
        store.check_matches(spatial={"pts_neck": (8, 6, 6), "img_neck": (1, 2, 2)})
    text = str(err.value)
    for part in ["spatial layer 'pts_neck' (C, h, w): expected (8, 6, 6), found (8, 6, 5)",
                 "spatial layer 'img_neck': expected, not in the store",
                 "spatial layer 'pts_backbone.blocks.1': in the store, not expected"]:
        assert part in text


def test_invalid_spatial_arguments_are_config_errors(tmp_path):
    from bevcache.errors import ConfigError

    for bad, message in [({"pts_neck": (8, 6)}, r"shape must be \(C, h, w\)"), ({"pts_neck": (8, 0, 5)}, "height must be"),
                         ({"a/b": (1, 1, 1)}, "dotted module path"), ({"a.b": (1, 1, 1), "a__b": (1, 1, 1)}, "distinct"),
                         ([("pts_neck", 1, 1, 1)], "list of SpatialSpec")]:
        with pytest.raises(ConfigError, match=message):
            create_store(str(tmp_path / "x.zarr"), num_samples=2, layers=[], dtype="float16", tokens=["a", "b"],
                         sample_idx=[0, 1], metadata={}, spatial=bad)
    with pytest.raises(ConfigError, match="non-empty unless spatial layers are given"):
        create_store(str(tmp_path / "x.zarr"), num_samples=2, layers=[], dtype="float16", tokens=["a", "b"],
                     sample_idx=[0, 1], metadata={})
    assert not (tmp_path / "x.zarr").exists()
    only = create_store(str(tmp_path / "only.zarr"), num_samples=2, layers=[], dtype="float16", tokens=["a", "b"],
                        sample_idx=[0, 1], metadata={}, spatial={"pts_neck": (1, 2, 2)})
    only.write_block(0, {}, spatial={"pts_neck": np.ones((2, 1, 2, 2))})
    assert only.verify() == [] and only.read_spatial("pts_neck", [1]).sum() == 4


# ---------------------------------------------------------------------------------------------
# Damage


def test_a_flipped_byte_names_the_one_row_it_hit(tmp_path):
    store = make_spatial_store(tmp_path)
    write_blocks(store)
    path = shard_file(store, "pts_neck", 1)
    data = bytearray(path.read_bytes())
    data[5] ^= 0x10  # inner chunks lie in row order from the shard's start: this is row 4's
    path.write_bytes(bytes(data))
    reader = open_store(store.url)
    problems = reader.verify()
    assert len(problems) == 1, problems
    assert "array spatial/pts_neck" in problems[0] and "rows 4 cannot be read" in problems[0]
    assert "checksum" in problems[0]
    np.testing.assert_array_equal(reader.read_spatial("pts_neck", [5, 7]), smooth_maps(10, GRID).astype(np.float16)[[5, 7]])
    with pytest.raises(StoreError, match=r"array spatial/pts_neck of store .* rows 4 cannot be read"):
        reader.read_spatial("pts_neck", [6, 4])


def test_a_damaged_shard_index_or_a_deleted_shard_names_the_block(tmp_path):
    store = make_spatial_store(tmp_path)
    write_blocks(store)
    path = shard_file(store, "pts_neck", 1)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0x01  # the index (offsets and lengths + its CRC32C) is at the shard's end
    path.write_bytes(bytes(data))
    shard_file(store, "pts_backbone__blocks__1", 2).unlink()
    problems = open_store(store.url).verify()
    assert len(problems) == 2, problems
    assert "spatial/pts_neck" in problems[0] and "rows 4-7 cannot be read" in problems[0]
    assert "spatial/pts_backbone__blocks__1: rows 8-9 are marked complete but hold no data" in problems[1]
    with pytest.raises(StoreError, match="rows 8 are marked complete but hold no data"):
        open_store(store.url).read_spatial("pts_backbone.blocks.1", [8])

    # The way back: reset the blocks, rewrite them (a damaged shard is replaced, not merged into).
    writer = open_store(store.url, mode="r+")
    writer.reset_blocks([(4, 8), (8, 10)])
    write_blocks(writer, writer.pending_blocks())
    assert writer.verify() == []


def test_rewriting_a_complete_spatial_block_replaces_it(tmp_path):
    store = make_spatial_store(tmp_path)
    write_blocks(store)
    write_blocks(store, [(4, 8)], seed=3)
    got = store.read_spatial("pts_neck", np.arange(10))
    np.testing.assert_array_equal(got[4:8], smooth_maps(10, GRID, 3).astype(np.float16)[4:8])
    np.testing.assert_array_equal(got[:4], smooth_maps(10, GRID).astype(np.float16)[:4])



def test_large_maps_get_shards_bounded_in_bytes_that_never_span_blocks():
    from bevcache.store.layout import SHARD_BYTES, Layout, shard_rows

    assert shard_rows(256, 512 * 32 * 32 * 2) == 16  # 1 MiB maps: 16 per 16 MiB shard
    assert shard_rows(100, 1 << 20) == 10 and shard_rows(7, 1 << 20) == 7  # a divisor of the block
    assert shard_rows(4, SHARD_BYTES * 2) == 1 and shard_rows(4, 480) == 4  # a huge map alone; tiny: block-wide
    layout = Layout(num_samples=600, chunk_rows=256, dtype="float16", layers={}, views=20, token_width=8,
                    spatial={"pts_neck": SpatialSpec("pts_neck", 512, 32, 32)})
    assert layout.expected("spatial_views/pts_neck")[3] == (16, 1, 512, 32, 32)
    assert layout.expected("spatial/pts_neck")[3] == (16, 512, 32, 32)

def test_a_store_with_block_wide_view_shards_is_still_read_and_resumed(tmp_path):
    """Stores written before a shard per block and view: one shard per block, (chunk_rows, K, C, h, w)."""
    from bevcache.store.layout import codecs

    store = make_spatial_store(tmp_path, views=2)
    for name, shape in SPATIAL.items():
        path = f"spatial_views/{store.spatial[name].array_name}"
        old = store.arrays.group[path]
        store.arrays.group.create_array(path, shape=old.shape, chunks=(1, 1, *shape), shards=(4, 2, *shape),
                                        dtype=old.dtype, fill_value=np.nan, attributes=dict(old.attrs),
                                        overwrite=True, **codecs())
    write_blocks(store, store.blocks()[:2])
    again = open_store(store.url, mode="r+")
    write_blocks(again, again.pending_blocks())  # resumed into the old layout
    views = smooth_maps(10, (2, *GRID), 1).astype(np.float16)
    np.testing.assert_array_equal(open_store(store.url).read_spatial("pts_neck", [2, 9], views=[1, 2]),
                                  np.stack([views[2, 0], views[9, 1]]))
    assert again.verify() == []
    meta = json.loads((Path(store.url) / "spatial_views" / "pts_neck" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 2, *GRID]

# ---------------------------------------------------------------------------------------------
# kill -9 and resume (the child dies through a write observer, tests/fault_injection.py)

KILL_CHILD = textwrap.dedent("""
    import os, signal, sys
    import zarr.storage._local as local
    from bevcache.store import open_store
    from tests.fault_injection import kill_after_blocks
    from tests.test_store_spatial import write_blocks

    url, mode = sys.argv[1], sys.argv[2]
    if mode == "observer":
        kill_after_blocks(2)  # SIGKILL right after the second durable block
    else:  # "tear": the first shard write of the second block stops half way, then SIGKILL
        real_put, seen = local._put, []

        def tearing_put(path, value, start=None, exclusive=False):
            if {"spatial", "spatial_views"} & set(path.parts) and "c" in path.parts:
                seen.append(path)
                if len(seen) == 1 + %(per_block)d:  # a block writes per layer one spatial shard + one per view
                    data = bytes(value.as_buffer_like())
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data[: len(data) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_put(path, value, start, exclusive)

        local._put = tearing_put
    write_blocks(open_store(url, mode="r+"))
""") % {"per_block": (1 + 2) * len(SPATIAL)}  # the stores below have 2 views


def run_kill_child(url: str, mode: str, cwd: Path) -> None:
    """Run KILL_CHILD on the store at url (local or s3://) and check that it died by SIGKILL."""
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, url, mode], env=env, cwd=cwd,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


@pytest.mark.parametrize("mode", ["observer", "tear"])
def test_kill_9_while_writing_spatial_blocks_then_resume_is_identical(tmp_path, mode):
    reference = make_spatial_store(tmp_path, name="reference.zarr", views=2)
    write_blocks(reference)
    store = make_spatial_store(tmp_path, views=2)
    run_kill_child(store.url, mode, tmp_path)

    after = open_store(store.url, mode="r+")
    assert after.pending_blocks() == ([(8, 10)] if mode == "observer" else [(4, 8), (8, 10)])
    if mode == "tear":
        torn = shard_file(after, "pts_neck", 1)
        assert 0 < torn.stat().st_size < shard_file(after, "pts_neck", 0).stat().st_size
    assert all("not written" in p for p in after.verify())
    write_blocks(after, after.pending_blocks())  # resume: a torn shard is replaced, not merged into
    assert after.verify() == []
    for name in SPATIAL:
        for views in (None, [1] * 10, [2] * 10):
            np.testing.assert_array_equal(after.read_spatial(name, np.arange(10), views),
                                          reference.read_spatial(name, np.arange(10), views))
    assert np.array_equal(after.read_table("pts_neck", views=True), reference.read_table("pts_neck", views=True))
