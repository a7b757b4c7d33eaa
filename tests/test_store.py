"""bevcache.store on real local Zarr stores: round trips, crash safety, damage detection, metadata."""

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bevcache.errors import ConfigError, FeatureValueError, StoreError, StoreMismatch
from bevcache.store import LayerSpec, create_store, fingerprint_tokens, open_store, store_exists

LAYERS = [LayerSpec(name="pts_neck", dim=16, pooling="avg"),
          LayerSpec(name="pts_backbone.blocks.1", dim=8, pooling="avgmax")]
TEACHER = {"config_sha256": "c0ffee", "checkpoint_sha256": "abc123"}


def tokens_for(n: int) -> list[str]:
    return [f"tok{i:04d}" for i in range(n)]


def make_store(tmp_path: Path, *, n: int = 50, chunk_rows: int = 16, dtype: str = "float16",
               layers: list[LayerSpec] = LAYERS, name: str = "feat.zarr", **kw):
    meta = {"teacher": TEACHER, "dataset": {"ann_file": "infos_train.pkl"}, "split": "train"}
    return create_store(str(tmp_path / name), num_samples=n, layers=layers, dtype=dtype,
                        tokens=tokens_for(n), sample_idx=list(range(100, 100 + n)), metadata=meta,
                        chunk_rows=chunk_rows, **kw)


def features_for(n: int, layers: list[LayerSpec] = LAYERS, seed: int = 0) -> dict[str, np.ndarray]:
    """Post-ReLU-like vectors: non-negative, some exact zeros."""
    rng = np.random.default_rng(seed)
    return {s.name: np.maximum(rng.normal(0.3, 1.0, (n, s.dim)), 0).astype(np.float32) for s in layers}


def write_all(store, full: dict[str, np.ndarray], blocks=None) -> None:
    for s, e in blocks if blocks is not None else store.blocks():
        store.write_block(s, {k: v[s:e] for k, v in full.items()})


def chunk_file(store, array: str, block: int) -> Path:
    path = Path(store.url) / array / "c" / str(block)
    return path / "0" if array.startswith("features/") or array == "tokens" else path


# ---------------------------------------------------------------------------------------------
# Round trips and blocks


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_in_shuffled_block_order(tmp_path, dtype):
    store = make_store(tmp_path, dtype=dtype)
    full = features_for(50)
    blocks = store.blocks()
    random.Random(1).shuffle(blocks)
    write_all(store, full, blocks)

    again = open_store(store.url)
    for name, want in full.items():
        got = again.read_table(name)
        assert got.dtype == torch.float32 and got.shape == want.shape
        expected = torch.from_numpy(want.astype(dtype).astype(np.float32))
        assert torch.equal(got, expected)  # exact after the store's own cast
        if dtype == "float16":
            assert torch.allclose(got, torch.from_numpy(want), rtol=1e-3, atol=1e-4)
        rows = np.array([49, 0, 17, 17])
        np.testing.assert_array_equal(again.read_rows(name, rows), want.astype(dtype)[rows])
    assert again.read_table("pts_neck", dtype=torch.float16).dtype == torch.float16
    assert again.tokens == tokens_for(50)
    np.testing.assert_array_equal(again.sample_idx, np.arange(100, 150))
    assert again.verify() == []


def test_blocks_cover_rows_with_a_short_tail(tmp_path):
    store = make_store(tmp_path, n=50, chunk_rows=16)
    assert store.blocks() == [(0, 16), (16, 32), (32, 48), (48, 50)]
    full = features_for(50)
    store.write_block(48, {k: v[48:50] for k, v in full.items()})
    assert store.complete_mask()[48:].all() and not store.complete_mask()[:48].any()
    with pytest.raises(StoreError, match=r"expected shape \(2, 16\)"):
        store.write_block(48, {k: v[32:48] for k, v in full.items()})
    small = make_store(tmp_path, n=5, chunk_rows=16, name="small.zarr")
    assert small.blocks() == [(0, 5)]


def test_torch_tensors_are_accepted(tmp_path):
    store = make_store(tmp_path, n=16, chunk_rows=16)
    full = features_for(16)
    store.write_block(0, {k: torch.from_numpy(v).requires_grad_() for k, v in full.items()})
    assert torch.equal(store.read_table("pts_neck"), torch.from_numpy(full["pts_neck"].astype(np.float16)).float())


def test_non_aligned_or_out_of_range_start_is_rejected(tmp_path):
    store = make_store(tmp_path)
    full = features_for(50)
    with pytest.raises(StoreError, match="multiple of chunk_rows=16"):
        store.write_block(5, {k: v[5:21] for k, v in full.items()})
    with pytest.raises(StoreError, match="below num_samples=50"):
        store.write_block(64, {k: v[:16] for k, v in full.items()})
    with pytest.raises(StoreError, match=r"missing \['pts_backbone.blocks.1'\]"):
        store.write_block(0, {"pts_neck": full["pts_neck"][:16]})
    assert not store.complete_mask().any()


def test_nan_is_refused_naming_the_index_and_nothing_is_written(tmp_path):
    store = make_store(tmp_path)
    full = features_for(50)
    block = {k: v[16:32].copy() for k, v in full.items()}
    block["pts_backbone.blocks.1"][4, 3] = np.nan
    with pytest.raises(FeatureValueError, match=r"dataset index 20 \(token 'tok0020'\)") as err:
        store.write_block(16, block)
    assert "pts_backbone.blocks.1" in str(err.value) and "nothing of rows 16-31" in str(err.value)
    assert not store.complete_mask().any()
    assert not chunk_file(store, "features/pts_neck", 1).exists()  # no layer was written either
    assert np.isnan(store.read_rows("pts_neck", np.arange(16, 32))).all()

    block = {k: v[16:32].copy() for k, v in full.items()}
    block["pts_neck"][0, 0] = 1e6  # finite in float32, Inf in float16
    with pytest.raises(FeatureValueError, match="beyond the float16 range at dataset index 16"):
        store.write_block(16, block)
    assert not store.complete_mask().any()


def test_completion_mask_and_pending_blocks_after_partial_writes(tmp_path):
    store = make_store(tmp_path)
    full = features_for(50)
    write_all(store, full, [(0, 16), (32, 48)])
    mask = store.complete_mask()
    assert mask.dtype == bool and mask.shape == (50,)
    np.testing.assert_array_equal(np.flatnonzero(mask), np.r_[0:16, 32:48])
    assert store.pending_blocks() == [(16, 32), (48, 50)]
    with pytest.raises(StoreError, match=r"18 of 50 rows are not written \(rows 16-31, 48-49\)"):
        store.read_table("pts_neck")
    partial = store.read_table("pts_neck", allow_incomplete=True)
    assert torch.isnan(partial[16:32]).all() and not torch.isnan(partial[:16]).any()
    problems = store.verify()
    assert len(problems) == 1 and "rows 16-31, 48-49" in problems[0]


# ---------------------------------------------------------------------------------------------
# Crashes and resuming


def test_reopen_after_crash_and_continue_gives_the_same_table(tmp_path):
    full = features_for(50)
    reference = make_store(tmp_path, name="reference.zarr")
    write_all(reference, full)

    store = make_store(tmp_path)
    write_all(store, full, [(16, 32), (48, 50)])
    url = store.url
    del store  # the "crash": nothing is closed or flushed
    resumed = open_store(url, mode="r+")
    assert resumed.pending_blocks() == [(0, 16), (32, 48)]
    write_all(resumed, full, resumed.pending_blocks())
    assert resumed.pending_blocks() == []
    for name in full:
        assert torch.equal(open_store(url).read_table(name), reference.read_table(name))


def test_torn_completion_chunk_only_loses_its_block(tmp_path):
    store = make_store(tmp_path)
    full = features_for(50)
    write_all(store, full)
    chunk_file(store, "complete", 1).write_bytes(b"\x00\x01")  # a kill while writing that mask chunk
    reopened = open_store(store.url, mode="r+")
    assert reopened.pending_blocks() == [(16, 32)]
    problems = reopened.verify()
    assert len(problems) == 1 and "rows 16-31 have an unreadable completion chunk" in problems[0]
    assert "not written" in problems[0]
    write_all(reopened, full, reopened.pending_blocks())
    assert reopened.verify() == []


def test_rewriting_a_complete_block_and_reset_blocks(tmp_path):
    store = make_store(tmp_path)
    full = features_for(50)
    write_all(store, full)
    other = features_for(50, seed=1)
    store.write_block(16, {k: v[16:32] for k, v in other.items()})
    table = store.read_table("pts_neck").numpy()
    np.testing.assert_array_equal(table[16:32], other["pts_neck"][16:32].astype(np.float16))
    np.testing.assert_array_equal(table[:16], full["pts_neck"][:16].astype(np.float16))
    store.reset_blocks([(32, 48)])
    assert store.pending_blocks() == [(32, 48)]
    with pytest.raises(StoreError, match="not a block"):
        store.reset_blocks([(30, 40)])


KILL_CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import zarr.storage._local as local
    from bevcache.store import open_store

    tear, puts, real_put = int(sys.argv[2]), [0], local._put

    def tearing_put(path, value, start=None, exclusive=False):
        # The tear-th chunk write stops half way, as a kill -9 during write() would leave it.
        if path.name != "zarr.json":
            puts[0] += 1
            if puts[0] == tear:
                path.parent.mkdir(parents=True, exist_ok=True)
                data = bytes(value.as_buffer_like())
                path.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        return real_put(path, value, start, exclusive)

    local._put = tearing_put
    store = open_store(sys.argv[1], mode="r+")
    while True:  # passes after the first rewrite complete blocks, until killed
        for start, stop in store.blocks():
            store.write_block(start, {"pts_neck": expected_rows(start, stop)})
            print(start, flush=True)
""")
def expected_rows(start, stop):
    rows = np.arange(start, stop, dtype=np.float32)[:, None]
    return rows + np.arange(256, dtype=np.float32)[None, :] / 1024


# tear=0: a plain kill -9 at whatever moment the child is at (maybe rewriting a block); 7 / 8: block 3 (rows 150-199) torn
# in its feature chunk / in its completion chunk (each fresh block writes features, then mask).
@pytest.mark.parametrize("tear", [0, 7, 8])
def test_kill_9_while_writing_loses_at_most_the_block_in_flight(tmp_path, tear):
    layers = [LayerSpec(name="pts_neck", dim=256, pooling="avg")]
    store = make_store(tmp_path, n=2000, chunk_rows=50, dtype="float32", layers=layers)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", inspect.getsource(expected_rows) + KILL_CHILD, store.url, str(tear)],
                             stdout=subprocess.PIPE, text=True, env=env)
    reported = []
    if tear == 0:
        reported = [int(child.stdout.readline()) for _ in range(45)]  # into the second pass
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    reported += [int(line) for line in child.stdout.read().split()]
    assert child.returncode == -signal.SIGKILL

    after = open_store(store.url, mode="r+")
    mask = after.complete_mask()
    done = [s for s, e in after.blocks() if mask[s:e].all()]
    assert all(not mask[s:e].any() for s, e in after.blocks() if s not in done)  # whole blocks only
    blocks = [s for s, _ in after.blocks()]
    in_flight = blocks[(blocks.index(reported[-1]) + 1) % len(blocks)] if reported else 0
    assert set(done) ^ set(reported) <= {in_flight}
    if tear:
        assert done == [0, 50, 100] and after.pending_blocks()[0] == (150, 200)
    table = after.read_table("pts_neck", allow_incomplete=True).numpy()
    np.testing.assert_array_equal(table[mask], np.concatenate([expected_rows(s, s + 50) for s in done]))
    assert all("not written" in p for p in after.verify())

    for start, stop in after.pending_blocks():  # resume
        after.write_block(start, {"pts_neck": expected_rows(start, stop)})
    assert after.verify() == []
    np.testing.assert_array_equal(after.read_table("pts_neck").numpy(), expected_rows(0, 2000))


# ---------------------------------------------------------------------------------------------
# Damage


def test_flipped_byte_in_a_chunk_is_reported_with_array_and_rows(tmp_path):
    store = make_store(tmp_path)
    write_all(store, features_for(50))
    path = chunk_file(store, "features/pts_neck", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))

    reopened = open_store(store.url)
    problems = reopened.verify()
    assert len(problems) == 1
    assert "features/pts_neck" in problems[0] and "rows 16-31" in problems[0] and "checksum" in problems[0]
    with pytest.raises(StoreError, match=r"array features/pts_neck of store .* rows 16-31"):
        reopened.read_table("pts_neck")
    with pytest.raises(StoreError, match="features/pts_neck"):
        reopened.read_rows("pts_neck", np.array([20]))
    assert reopened.read_table("pts_backbone.blocks.1").shape == (50, 8)  # other layers unaffected


def test_deleted_chunk_is_reported_as_missing_rows(tmp_path):
    store = make_store(tmp_path)
    write_all(store, features_for(50))
    chunk_file(store, "features/pts_backbone__blocks__1", 2).unlink()
    reopened = open_store(store.url)
    problems = reopened.verify()
    assert len(problems) == 1
    assert "features/pts_backbone__blocks__1" in problems[0] and "rows 32-47" in problems[0]
    assert "no data" in problems[0]
    with pytest.raises(StoreError, match="rows 32-47 are marked complete but hold no data"):
        reopened.read_table("pts_backbone.blocks.1")


def test_damaged_tokens_are_reported(tmp_path):
    store = make_store(tmp_path)
    write_all(store, features_for(50))
    chunk_file(store, "tokens", 0).write_bytes(b"garbage")
    problems = open_store(store.url).verify()
    assert any("tokens" in p and "rows 0-15" in p for p in problems)
    with pytest.raises(StoreError, match="array tokens"):
        _ = open_store(store.url).tokens


def test_changed_tokens_fail_the_recorded_fingerprint(tmp_path):
    import zarr

    store = make_store(tmp_path)
    write_all(store, features_for(50))
    tokens = zarr.open_array(str(Path(store.url) / "tokens"), mode="r+")
    tokens[3, 0] = ord("X")
    problems = open_store(store.url).verify()
    assert len(problems) == 1 and problems[0].startswith("tokens: fingerprint")


def test_open_reads_no_features_and_tokens_keep_unicode(tmp_path):
    names = ["a", "é-ß-東京", ""]
    store = create_store(str(tmp_path / "u.zarr"), num_samples=3, layers=LAYERS[:1], dtype="float32",
                         tokens=names, sample_idx=[0, 1, 2], metadata={})
    store.write_block(0, {"pts_neck": np.ones((3, 16), np.float32)})
    for chunk in (Path(store.url) / "features").rglob("c/*/*"):
        chunk.write_bytes(b"unreadable")
    reopened = open_store(store.url)  # metadata only: damaged feature chunks do not matter yet
    assert reopened.tokens == names and reopened.info()["complete"]
    with pytest.raises(StoreError, match="features/pts_neck"):
        reopened.read_table("pts_neck")


# ---------------------------------------------------------------------------------------------
# Metadata, opening and creating


def test_check_matches_names_each_difference(tmp_path):
    store = make_store(tmp_path)
    fp = fingerprint_tokens(tokens_for(50))
    store.check_matches(dataset=fp, teacher=TEACHER, layers=LAYERS[:1], dtype="float16")

    with pytest.raises(StoreMismatch, match=r"dataset sha256: expected 'deadbeef', found '[0-9a-f]{64}'"):
        store.check_matches(dataset={**fp, "sha256": "deadbeef"})
    with pytest.raises(StoreMismatch) as err:
        store.check_matches(dataset=fingerprint_tokens(tokens_for(51)),
                            teacher={**TEACHER, "checkpoint_sha256": "other"},
                            layers=[LayerSpec(name="pts_neck", dim=32, pooling="max"),
                                    LayerSpec(name="img_neck", dim=8, pooling="avg")],
                            dtype="float32")
    text = str(err.value)
    for part in ["dataset length: expected 51, found 50", "teacher checkpoint_sha256: expected 'other'",
                 "layer 'pts_neck' dim: expected 32, found 16", "pooling: expected 'max', found 'avg'",
                 "layer 'img_neck': expected, not in the store", "dtype: expected 'float32'"]:
        assert part in text


def test_fingerprint_tokens_is_order_sensitive():
    a = fingerprint_tokens(["a", "b"])
    assert a["length"] == 2 and len(a["sha256"]) == 64
    assert a != fingerprint_tokens(["b", "a"]) and a == fingerprint_tokens(["a", "b"])


def test_metadata_round_trip_set_attrs_and_read_only(tmp_path):
    store = make_store(tmp_path)
    attrs = open_store(store.url).attrs
    assert attrs["format_version"] == 1 and attrs["split"] == "train" and attrs["teacher"] == TEACHER
    assert attrs["dataset"] == {"ann_file": "infos_train.pkl", **fingerprint_tokens(tokens_for(50))}
    assert attrs["layers"][1] == {"name": "pts_backbone.blocks.1", "array": "pts_backbone__blocks__1",
                                  "dim": 8, "pooling": "avgmax"}
    assert attrs["finished"] is None and attrs["created"]
    store.set_attrs(finished="2026-01-01T00:00:00+00:00", note={"k": [1, 2]})
    assert open_store(store.url).attrs["finished"] == "2026-01-01T00:00:00+00:00"
    with pytest.raises(ConfigError, match="layout keys"):
        store.set_attrs(num_samples=3)
    with pytest.raises(ConfigError, match="JSON"):
        store.set_attrs(bad=object())
    read_only = open_store(store.url)
    with pytest.raises(StoreError, match="read-only"):
        read_only.write_block(0, {k: v[:16] for k, v in features_for(50).items()})
    with pytest.raises(StoreError, match="read-only"):
        read_only.set_attrs(finished="x")


def test_missing_store_is_a_clear_error_and_not_created(tmp_path):
    url = str(tmp_path / "absent.zarr")
    for mode in ("r", "r+"):
        with pytest.raises(StoreError, match=r"no bevcache store at URL: .*absent.zarr; run `bevcache extract` first"):
            open_store(url, mode=mode)
    assert not Path(url).exists() and not store_exists(url)
    with pytest.raises(ConfigError, match="mode must be one of"):
        open_store(url, mode="w")


def test_wrong_layer_lists_the_layers_present(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(StoreError, match=r"layer 'img_neck' is not in store .*\['pts_neck', 'pts_backbone.blocks.1'\]"):
        store.read_table("img_neck")


def test_create_over_existing_needs_overwrite(tmp_path):
    store = make_store(tmp_path)
    write_all(store, features_for(50))
    assert store_exists(store.url)
    with pytest.raises(StoreError, match="already holds a store: pass overwrite=True"):
        make_store(tmp_path)
    fresh = make_store(tmp_path, overwrite=True)
    assert fresh.pending_blocks() == fresh.blocks()

    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="holds no zarr store: refusing to write there"):
            make_store(tmp_path, name="not-a-store", overwrite=overwrite)
    with pytest.raises(StoreError, match=r"holds no zarr v3 group \(no zarr.json\)"):
        open_store(str(other))
    assert (other / "precious.txt").read_text() == "keep me"


def test_garbled_or_foreign_metadata_is_a_clear_error(tmp_path):
    store = make_store(tmp_path)
    zarr_json = Path(store.url) / "zarr.json"
    good = zarr_json.read_text()
    zarr_json.write_text("{garbled")
    with pytest.raises(StoreError, match=r"metadata of store .* \(zarr.json\) is unreadable"):
        open_store(store.url)
    assert store_exists(store.url)  # so `extract` asks for --overwrite, which may then replace it

    doc = json.loads(good)
    doc["attributes"]["bevcache"]["layers"] = "oops"
    zarr_json.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="bevcache metadata of store .* is garbled"):
        open_store(store.url)

    doc = json.loads(good)
    doc["attributes"] = {}
    zarr_json.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="not a bevcache store"):
        open_store(store.url)
    assert make_store(tmp_path, overwrite=True).pending_blocks() == [(0, 16), (16, 32), (32, 48), (48, 50)]


def test_interrupted_creation_is_recognised_and_can_be_overwritten(tmp_path):
    store = make_store(tmp_path)
    zarr_json = Path(store.url) / "zarr.json"
    doc = json.loads(zarr_json.read_text())
    doc["attributes"]["bevcache"]["layout_ready"] = False
    zarr_json.write_text(json.dumps(doc))
    assert store_exists(store.url)
    with pytest.raises(StoreError, match="creation was interrupted"):
        open_store(store.url, mode="r+")
    assert make_store(tmp_path, overwrite=True).verify()[0].startswith("complete: 50 of 50 rows")


def test_invalid_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="pooling must be one of"):
        LayerSpec(name="pts_neck", dim=4, pooling="mean")
    with pytest.raises(ConfigError, match="dim must be a positive integer"):
        LayerSpec(name="pts_neck", dim=0, pooling="avg")
    with pytest.raises(ConfigError, match="dotted module path"):
        LayerSpec(name="pts/neck", dim=4, pooling="avg")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        make_store(tmp_path, dtype="bfloat16")
    with pytest.raises(ConfigError, match="distinct"):
        make_store(tmp_path, layers=[LayerSpec("a.b", 2, "avg"), LayerSpec("a__b", 2, "avg")])
    with pytest.raises(ConfigError, match="own keys"):
        create_store(str(tmp_path / "x.zarr"), num_samples=2, layers=LAYERS, dtype="float16",
                     tokens=["a", "b"], sample_idx=[0, 1], metadata={"dtype": "float32"})
    with pytest.raises(ConfigError, match="fingerprint of these tokens"):
        create_store(str(tmp_path / "x.zarr"), num_samples=2, layers=LAYERS, dtype="float16",
                     tokens=["a", "b"], sample_idx=[0, 1], metadata={"dataset": {"length": 3}})
    assert not (tmp_path / "x.zarr").exists()


def test_info(tmp_path):
    store = make_store(tmp_path)
    write_all(store, features_for(50), [(0, 16)])
    info = open_store(store.url).info()
    assert {"num_samples", "num_complete", "complete", "layers", "teacher", "dataset", "split", "chunk_rows",
            "bytes_on_disk", "bytes_raw", "compression_ratio", "url"} <= set(info)
    assert info["num_samples"] == 50 and info["num_complete"] == 16 and info["complete"] is False
    assert info["layers"]["pts_backbone.blocks.1"] == {"dim": 8, "dtype": "float16", "pooling": "avgmax"}
    assert info["teacher"] == TEACHER and info["split"] == "train" and info["chunk_rows"] == 16
    assert info["bytes_raw"] == 50 * (16 + 8) * 2 + 50 * (1 + 7 + 8)
    # Metadata documents are counted apart: the ratio compares the data with the chunks holding it.
    json_bytes = sum(p.stat().st_size for p in Path(store.url).rglob("zarr.json"))
    assert info["bytes_metadata"] == json_bytes > 0
    assert info["bytes_chunks"] == info["bytes_on_disk"] - json_bytes > 0
    assert info["compression_ratio"] == info["bytes_raw"] / info["bytes_chunks"]
    assert info["url"] == store.url


# ---------------------------------------------------------------------------------------------
# Property: any shape, chunking and dtype round-trips

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), dim=st.integers(1, 9), chunk_rows=st.integers(1, 12),
       dtype=st.sampled_from(["float16", "float32"]), seed=st.integers(0, 2**16))
def test_round_trip_property(tmp_path_factory, n, dim, chunk_rows, dtype, seed):
    tmp = tmp_path_factory.mktemp("prop")
    layers = [LayerSpec(name="layer", dim=dim, pooling="max")]
    store = make_store(tmp, n=n, chunk_rows=chunk_rows, dtype=dtype, layers=layers)
    full = {"layer": np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32) * 10}
    blocks = store.blocks()
    random.Random(seed).shuffle(blocks)
    write_all(store, full, blocks)
    got = open_store(store.url).read_table("layer").numpy()
    np.testing.assert_array_equal(got, full["layer"].astype(dtype).astype(np.float32))
    assert open_store(store.url).tokens == tokens_for(n)
