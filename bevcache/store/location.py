"""Where a store lives: local paths and fsspec URLs (s3://...), opening its group, the writer lock.

A remote URL is anything with '://' except file://. Remote listings are never cached: other
processes (torchrun ranks, a resumed run) write while this one reads, and a cached listing would
hide their chunks. The lock is a local advisory file; remote stores have none.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from ..errors import StoreError
from .messages import why

log = logging.getLogger("bevcache")


def is_remote(url: str) -> bool:
    """Whether url is served by fsspec (s3://, gs://, memory://, ...) rather than the local disk."""
    return "://" in url and not url.startswith("file://")


def local_root(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def make_store(url: str, *, read_only: bool, storage_options: dict | None) -> Store:
    """The zarr Store object for url (nothing is read or written yet)."""
    if is_remote(url):
        options = {"use_listings_cache": False, **(storage_options or {})}
        return FsspecStore.from_url(url, storage_options=options, read_only=read_only)
    return LocalStore(local_root(url), read_only=read_only)


def holds_anything(url: str, storage_options: dict | None) -> bool:
    """Whether anything (a store or not) is at url."""
    if not is_remote(url):
        root = local_root(url)
        return root.exists() and (not root.is_dir() or any(root.iterdir()))
    store = make_store(url, read_only=True, storage_options=storage_options)
    return not sync(store.is_empty(""))


def has_group_doc(url: str, storage_options: dict | None) -> bool:
    """Whether url has a root zarr.json (readable or not)."""
    if not is_remote(url):
        return (local_root(url) / "zarr.json").is_file()
    store = make_store(url, read_only=True, storage_options=storage_options)
    return bool(sync(store.exists("zarr.json")))


def store_exists(url: str, *, storage_options: dict | None = None) -> bool:
    """True if a zarr store is at url (a bevcache one, or a damaged one): creating needs overwrite."""
    return has_group_doc(url, storage_options)


def open_group(url: str, *, mode: str, storage_options: dict | None) -> zarr.Group:
    """The zarr group at url, or a StoreError saying what is there instead."""
    try:
        holds = holds_anything(url, storage_options)
        has_doc = holds and has_group_doc(url, storage_options)
    except Exception as exc:  # remote: endpoint down, no such bucket, bad credentials, ...
        if not is_remote(url):
            raise
        raise StoreError(f"cannot reach store {url} ({why(exc)}): check the endpoint (e.g. AWS_ENDPOINT_URL) "
                         "and the credentials (AWS_* environment or ~/.aws).") from None
    if not holds:
        raise StoreError(f"no bevcache store at URL: {url}; run `bevcache extract` first.")
    if not has_doc:
        raise StoreError(
            f"{url} holds no zarr v3 group (no zarr.json), so it is no bevcache store: point to the "
            "store `bevcache extract` wrote, or run it with another --out."
        )
    store = make_store(url, read_only=mode == "r", storage_options=storage_options)
    try:
        return zarr.open_group(store=store, mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise StoreError(
            f"{url} holds no zarr v3 group, so it is no bevcache store: run `bevcache extract` "
            "with another --out, or remove what is there."
        ) from None
    except Exception as exc:  # zarr raises JSONDecodeError, ValueError, KeyError, AssertionError ...
        raise StoreError(
            f"the metadata of store {url} (zarr.json) is unreadable ({why(exc)}): the store is "
            "damaged; re-create it with `bevcache extract --overwrite`."
        ) from None


def bytes_on_disk(url: str, group: zarr.Group) -> int | None:
    """Total size of every object of the store (None if the remote store cannot say)."""
    if not is_remote(url):
        total = 0
        for root, _, files in os.walk(local_root(url)):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total
    try:
        return int(sync(group.store.getsize_prefix("")))
    except Exception:
        return None


def metadata_bytes(url: str, group: zarr.Group) -> int | None:
    """Size of the store's metadata documents (zarr.json files), which dominate a small store."""
    if not is_remote(url):
        total = 0
        for root, _, files in os.walk(local_root(url)):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f == "zarr.json")
        return total
    return None  # one listing per array on an object store: not worth it for a size figure


def array_bytes_on_disk(url: str, group: zarr.Group, path: str) -> int | None:
    """Size of one array's objects (metadata and chunks/shards)."""
    if not is_remote(url):
        total = 0
        for root, _, files in os.walk(local_root(url) / path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total
    try:
        return int(sync(group.store.getsize_prefix(path)))
    except Exception:
        return None


@contextlib.contextmanager
def exclusive_writer(url: str) -> Iterator[None]:
    """Refuse a second writer job on the same local store: an advisory lock file beside it
    (`<store>.lock`), removed when the writer finishes, freed by the OS on a crash. Remote stores: no
    lock, a warning says so."""
    if is_remote(url):
        log.warning("%s is a remote store: it is not locked against a second writer; run one "
                    "`bevcache extract` per store at a time", url)
        yield  # no portable lock on object stores; one writer job per store is the user's contract
        return
    path = Path(str(local_root(url)).rstrip("/") + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder unlinks the file when it finishes: a lock taken on an unlinked file is no lock.
            if not path.exists() or os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino:
                raise BlockingIOError
        except BlockingIOError:
            fh.seek(0)
            raise StoreError(f"another `bevcache extract` is writing {url} ({fh.read().strip() or 'unknown pid'}); "
                             "wait for it to finish, or stop it and run with --resume.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        try:
            yield
        finally:
            # Removed while still held (a finished store leaves no lock file beside it); a kill -9
            # leaves it, unlocked, and the next writer takes it over.
            with contextlib.suppress(OSError):
                path.unlink()
            fcntl.flock(fh, fcntl.LOCK_UN)
