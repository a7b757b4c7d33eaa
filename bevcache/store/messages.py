"""How the store words its problems: every message names the store, the array and the rows."""

from __future__ import annotations

import numpy as np

MAX_LISTED = 8  # rows/ranges named in one message before "... and N more"
RESET_AND_RESUME = ("reset these blocks (FeatureStore.reset_blocks) and run `bevcache extract --resume` "
                    "to rewrite them")
RECREATE = "re-create the store with `bevcache extract --overwrite`"


def why(exc: BaseException) -> str:
    """'Type: message', at most 200 characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 200 else text[:197] + "..."


def chunk_reason(exc: BaseException) -> str:
    if "checksum" in str(exc).lower():
        return "CRC32C checksum mismatch: the chunk's bytes changed after it was written"
    return why(exc)


def rows_text(rows: np.ndarray) -> str:
    """'3-7, 12, 20-25' from sorted row numbers, at most MAX_LISTED ranges."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate([[rows[0]], rows[breaks + 1]])
    ends = np.concatenate([rows[breaks], [rows[-1]]])
    parts = [f"{s}" if s == e else f"{s}-{e}" for s, e in zip(starts[:MAX_LISTED], ends[:MAX_LISTED], strict=True)]
    more = len(starts) - MAX_LISTED
    return ", ".join(parts) + (f" and {more} more ranges" if more > 0 else "")


def damage_text(url: str, path: str, bad: list[tuple[int, int, str]], *, consequence: str = RESET_AND_RESUME) -> str:
    """One message for unreadable [start, stop) row ranges of an array (adjacent ranges merged)."""
    merged: list[tuple[int, int, str]] = []
    for s, e, reason in sorted(bad):
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e, merged[-1][2])
        else:
            merged.append((s, e, reason))
    bad = merged
    ranges = ", ".join(f"{s}-{e - 1}" if e - s > 1 else f"{s}" for s, e, _ in bad[:MAX_LISTED])
    more = f" and {len(bad) - MAX_LISTED} more ranges" if len(bad) > MAX_LISTED else ""
    return (f"array {path} of store {url} is damaged: rows {ranges}{more} cannot be read "
            f"({bad[0][2]}); {consequence}.")


def incomplete_text(url: str, missing: np.ndarray, num_samples: int) -> str:
    return (f"store {url} is incomplete: {missing.size} of {num_samples} rows are not written "
            f"(rows {rows_text(missing)}); run `bevcache extract --resume` to finish it.")
