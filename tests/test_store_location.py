"""bevcache.store.location (URLs, the writer lock) and bevcache.store.observers (write observers)."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bevcache.errors import FeatureValueError, StoreError
from bevcache.store import add_write_observer, exclusive_writer, open_store, remove_write_observer
from bevcache.store.location import is_remote, local_root

from .test_store import features_for, make_store


def test_urls_are_local_or_remote():
    assert is_remote("s3://bucket/f.zarr") and is_remote("memory://f.zarr")
    assert not is_remote("/data/f.zarr") and not is_remote("file:///data/f.zarr") and not is_remote("f.zarr")
    assert str(local_root("file:///data/f.zarr")) == "/data/f.zarr"


def test_exclusive_writer_refuses_a_second_writer_until_the_first_ends(tmp_path):
    url = str(tmp_path / "sub" / "f.zarr")
    with exclusive_writer(url):
        lock = tmp_path / "sub" / "f.zarr.lock"
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(StoreError, match=rf"another `bevcache extract` is writing .*f.zarr \(pid {os.getpid()} on "):
            with exclusive_writer("file://" + url):
                pass
        assert lock.exists()  # a refused writer leaves the holder's lock alone
    assert not lock.exists()  # a finished writer leaves no lock file beside the store
    with exclusive_writer(url):  # freed on exit
        pass


def test_exclusive_writer_is_freed_when_its_holder_is_killed(tmp_path):
    url = str(tmp_path / "f.zarr")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from bevcache.store import exclusive_writer
        with exclusive_writer({url!r}):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=f"pid {holder.pid} on"):
            with exclusive_writer(url):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with exclusive_writer(url):
        pass


def test_remote_stores_are_not_locked_and_say_so(caplog):
    with caplog.at_level(logging.WARNING, logger="bevcache"), exclusive_writer("s3://bucket/f.zarr"):
        pass
    assert "not locked against a second writer" in caplog.text


def test_write_observers_run_after_each_durable_block(tmp_path):
    store = make_store(tmp_path)
    full = features_for(50)
    seen = []

    def observer(s, start):
        seen.append((start, bool(open_store(s.url).complete_mask()[start])))  # the mark is already durable

    add_write_observer(observer)
    try:
        for s, e in [(16, 32), (0, 16)]:
            store.write_block(s, {k: v[s:e] for k, v in full.items()})
        with pytest.raises(FeatureValueError):  # a refused block is not reported
            store.write_block(32, {k: np.full_like(v[32:48], np.nan) for k, v in full.items()})
    finally:
        remove_write_observer(observer)
    store.write_block(32, {k: v[32:48] for k, v in full.items()})
    assert seen == [(16, True), (0, True)]
    remove_write_observer(observer)  # removing twice is fine
    with pytest.raises(TypeError, match="must be callable"):
        add_write_observer("not a function")
