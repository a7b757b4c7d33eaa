"""Write observers: callables run after each durable block, as fn(store, start).

`FeatureStore.write_block` calls every observer once the block's completion mark is written, in
the thread that wrote it. Nothing in bevcache installs one; they exist so that tests (and tools
such as progress meters) can act at exactly that moment without a branch in the write path:
tests/fault_injection.py installs one that SIGKILLs the process after N blocks.
An observer's exception propagates out of write_block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .feature_store import FeatureStore

WriteObserver = Callable[["FeatureStore", int], None]
_observers: list[WriteObserver] = []


def add_write_observer(fn: WriteObserver) -> WriteObserver:
    """Run fn(store, start) after every durable block of every store in this process; returns fn."""
    if not callable(fn):
        raise TypeError(f"a write observer must be callable. Got {fn!r}.")
    _observers.append(fn)
    return fn


def remove_write_observer(fn: WriteObserver) -> None:
    """Stop calling fn (no error if it was not added)."""
    if fn in _observers:
        _observers.remove(fn)


def notify_block_written(store: FeatureStore, start: int) -> None:
    for fn in list(_observers):
        fn(store, start)
