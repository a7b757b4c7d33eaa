"""A store on S3 (moto's server on 127.0.0.1): extract (kill -9 + resume), info, verify and train
against s3://bucket/features.zarr, configured only by the standard AWS environment; the secret
never shows in output, logs, checkpoints or the store. Spatial layers (sharded maps) on S3 keep
the same guarantees."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bevcache.store import open_store

from .conftest import REPO, bevcache_cmd
from .fault_injection import killed_cmd
from .test_reliability import ITER_STUDENT, STUDENT, _extract_args, neck_store  # noqa: F401
from .test_store_spatial import SPATIAL, make_spatial_store, run_kill_child, write_blocks

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

SECRET = "bevcache-test-secret-7f3a9c"
KEY_ID = "bevcache-test-key-id"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port, the AWS_* environment pointing at it, one bucket."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="bucket")
    yield client
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run(*args: str, env_extra: dict | None = None, timeout: int = 300, kill_after_blocks: int | None = None
        ) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    cmd = killed_cmd(kill_after_blocks, *args) if kill_after_blocks else bevcache_cmd(*args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text


def test_extract_info_verify_and_train_on_s3(s3, data_root, teacher_ckpt, neck_store, tmp_path):  # noqa: F811
    url = "s3://bucket/features.zarr"
    args = _extract_args(data_root, teacher_ckpt, url)
    killed = run(*args, kill_after_blocks=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "not locked against a second writer" in killed.stderr  # remote stores have no lock file
    partial = open_store(url)
    assert partial.complete_mask().sum() == 4 and len(partial.verify()) == 1

    resumed = run("-v", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "12/12 rows" in resumed.stdout
    remote, local = open_store(url), open_store(neck_store)
    assert remote.verify() == [] and remote.tokens == local.tokens
    assert torch.equal(remote.read_table("pts_neck"), local.read_table("pts_neck"))

    info = run("info", url, "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["url"] == url and data["complete"] and data["bytes_on_disk"] > 0
    verify = run("verify", url)
    assert verify.returncode == 0 and verify.stdout.startswith("OK"), verify.stderr

    config = tmp_path / "iter_student.py"
    config.write_text(ITER_STUDENT.format(student=STUDENT))
    work = tmp_path / "work"
    trained = run("-v", "train", "--student", str(config), "--cache", url, "--data-root", str(data_root),
                  "--work-dir", str(work), "--cfg-options", "train_cfg.max_iters=2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "loss_crd_pts_neck" in trained.stdout + trained.stderr

    # The secret is nowhere: command output, the store's metadata, the work dir (logs, configs, checkpoints).
    no_secret(killed.stdout, killed.stderr, resumed.stdout, resumed.stderr, info.stdout, verify.stdout,
              trained.stdout, trained.stderr)
    no_secret(json.dumps(remote.attrs), s3.get_object(Bucket="bucket", Key="features.zarr/zarr.json")["Body"].read().decode())
    for path in Path(work).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_missing_bucket_is_one_line_before_any_work(s3, data_root, teacher_ckpt):  # noqa: F811
    result = run(*_extract_args(data_root, teacher_ckpt, "s3://no-such-bucket/features.zarr"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "bucket 'no-such-bucket' does not exist" in lines[0], result.stderr[-3000:]
    assert "extracting" not in result.stderr
    no_secret(result.stdout, result.stderr)


def test_an_unreachable_endpoint_is_one_line(s3, data_root, teacher_ckpt):  # noqa: F811
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    result = run("info", "s3://bucket/features.zarr", env_extra={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{dead}",
                                                                   "AWS_MAX_ATTEMPTS": "1"}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1, result.stderr
    no_secret(result.stdout, result.stderr)


def test_spatial_layers_on_s3_survive_kill_9_and_name_damaged_rows(s3, tmp_path):
    reference = make_spatial_store(tmp_path, views=2)
    write_blocks(reference)
    url = "s3://bucket/spatial.zarr"
    make_spatial_store(tmp_path, views=2, url=url)
    run_kill_child(url, "observer", tmp_path)  # SIGKILLed by a write observer after 2 of 3 blocks
    store = open_store(url, mode="r+")
    assert store.pending_blocks() == [(8, 10)] and all("not written" in p for p in store.verify())
    write_blocks(store, store.pending_blocks())
    reader = open_store(url)
    assert reader.verify() == []
    for name in SPATIAL:
        for views in (None, [1] * 10, [2] * 10):
            np.testing.assert_array_equal(reader.read_spatial(name, np.arange(10), views),
                                          reference.read_spatial(name, np.arange(10), views))
    assert reader.info()["spatial"]["pts_neck"]["bytes_on_disk"] > 0

    key = "spatial.zarr/spatial/pts_neck/c/1/0/0/0"
    shard = bytearray(s3.get_object(Bucket="bucket", Key=key)["Body"].read())
    shard[5] ^= 0x10  # inside row 4's inner chunk
    s3.put_object(Bucket="bucket", Key=key, Body=bytes(shard))
    damaged = open_store(url)
    problems = damaged.verify()
    assert len(problems) == 1 and "spatial/pts_neck" in problems[0] and "rows 4 cannot be read" in problems[0]
    np.testing.assert_array_equal(damaged.read_spatial("pts_neck", [5]), reference.read_spatial("pts_neck", [5]))


def test_the_s3_stack_is_pinned_and_declared():
    from .test_setup import _pins

    pins = _pins()
    for name in ("s3fs", "moto", "aiobotocore", "botocore", "boto3", "fsspec"):
        assert name in pins, name
    assert pins["s3fs"] == pins["fsspec"]  # s3fs releases pin their fsspec exactly
    text = (REPO / "pyproject.toml").read_text()
    assert 's3 = ["s3fs"]' in text and '"moto[server]"' in text
    assert '"moto[server]"' in (REPO / "scripts" / "setup.sh").read_text()
