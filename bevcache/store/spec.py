"""What a store holds, as plain values: layer specs, dtypes, the token fingerprint, JSON checks."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

FORMAT_VERSION = 2  # the newest this bevcache reads; stores without spatial layers are still written as 1
POOLINGS = ("avg", "max", "avgmax")
DTYPES = ("float16", "float32")
SPATIAL_DTYPE = "float16"  # spatial maps are large: always half precision
# Keys of attrs["bevcache"] that describe the layout; metadata and set_attrs may not change them.
RESERVED = ("format_version", "num_samples", "chunk_rows", "dtype", "layers", "token_width", "layout_ready",
            "views", "spatial")
_LAYER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _LAYER_NAME.match(name) or name.startswith("__"):
        raise ConfigError(f"layer name must be a dotted module path like 'pts_neck' or 'pts_backbone.blocks.1'. Got {name!r}.")


def _positive(value: Any) -> bool:
    return bool(not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1)


@dataclass(frozen=True)
class LayerSpec:
    """One cached layer: its module path in the teacher, pooled width and pooling."""

    name: str  # module path, e.g. "pts_neck" or "pts_backbone.blocks.1"
    dim: int  # width of the pooled vector that is stored
    pooling: str  # "avg" | "max" | "avgmax"

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not _positive(self.dim):
            raise ConfigError(f"layer {self.name!r}: dim must be a positive integer. Got {self.dim!r}.")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"layer {self.name!r}: pooling must be one of {list(POOLINGS)}. Got {self.pooling!r}.")

    @property
    def array_name(self) -> str:
        """Name of this layer's array under features/ ('.' is not used in array names)."""
        return self.name.replace(".", "__")


@dataclass(frozen=True)
class SpatialSpec:
    """One cached spatial layer: the teacher's unpooled [C, h, w] map of each sample, in float16."""

    name: str  # module path, e.g. "pts_neck"
    channels: int  # C
    height: int  # h (BEV grid rows)
    width: int  # w

    def __post_init__(self) -> None:
        _check_name(self.name)
        for key in ("channels", "height", "width"):
            if not _positive(getattr(self, key)):
                raise ConfigError(f"spatial layer {self.name!r}: {key} must be a positive integer. "
                                  f"Got {getattr(self, key)!r}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one sample's map."""
        return int(self.channels), int(self.height), int(self.width)

    @property
    def array_name(self) -> str:
        """Name of this layer's array under spatial/ ('.' is not used in array names)."""
        return self.name.replace(".", "__")

    def to_json(self) -> dict:
        return {"name": self.name, "array": self.array_name, "channels": self.channels, "height": self.height,
                "width": self.width, "dtype": SPATIAL_DTYPE}


def parse_spatial(spatial: Mapping[str, Sequence[int]] | Sequence[SpatialSpec] | None) -> list[SpatialSpec]:
    """SpatialSpecs from {layer: (C, h, w)} or a list of SpatialSpec (None: no spatial layers)."""
    if spatial is None:
        return []
    if isinstance(spatial, Mapping):
        specs = []
        for name, shape in spatial.items():
            if not isinstance(shape, Sequence) or len(shape) != 3:
                raise ConfigError(f"spatial layer {name!r}: shape must be (C, h, w). Got {shape!r}.")
            specs.append(SpatialSpec(name, *shape))
    else:
        specs = list(spatial)
        if not all(isinstance(s, SpatialSpec) for s in specs):
            raise ConfigError(f"spatial must be a dict {{layer: (C, h, w)}} or a list of SpatialSpec. Got {spatial!r}.")
    arrays = [s.array_name for s in specs]
    if len(set(arrays)) != len(arrays):
        raise ConfigError(f"spatial layer names must be distinct (after '.' -> '__'). Got {[s.name for s in specs]}.")
    return specs


def fingerprint_tokens(tokens: list[str]) -> dict:
    """{"length": n, "sha256": hex digest of the ordered tokens joined by newlines}."""
    joined = "\n".join(str(t) for t in tokens).encode("utf-8")
    return {"length": len(tokens), "sha256": hashlib.sha256(joined).hexdigest()}


def parse_dtype(dtype: Any) -> str:
    """'float16' or 'float32' from any numpy-style dtype spelling."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}. Got {dtype!r}.")
    return name


def check_json(value: Any, what: str) -> Any:
    """value as it will read back from zarr.json, or a ConfigError naming `what`."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be JSON-serialisable (str/int/float/bool/None/list/dict): {exc}.") from None


def decode_tokens(table: np.ndarray) -> list[str]:
    """Tokens from the zero-padded uint8 [N, L] table."""
    return [bytes(row).rstrip(b"\x00").decode("utf-8", errors="replace") for row in table]
