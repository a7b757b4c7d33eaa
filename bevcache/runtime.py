"""Process set-up shared by every command: registries, the spconv shim, configs, devices."""

from __future__ import annotations

import ast
import os
import tempfile
from pathlib import Path

import torch

from .errors import ConfigError

_READY = False


def setup_runtime() -> None:
    """Register mmdet3d and bevcache modules and apply the CPU shim (idempotent)."""
    global _READY
    if _READY:
        return
    from mmdet3d.utils import register_all_modules
    from mmengine.registry import init_default_scope

    from . import compat

    register_all_modules(init_default_scope=False)
    init_default_scope("mmdet3d")
    compat.patch_spconv_for_cpu()
    # registers CRDDistiller, SafeNuScenesMetric, ReplayViewsDataset and ReplayEpochHook
    from . import distiller, evaluation, replay  # noqa: F401

    _READY = True


def parse_cfg_options(options: tuple[str, ...] | list[str] | None) -> dict:
    """Parse `key=value` overrides the way mmengine's DictAction does, with a clear error."""
    from mmengine.config import DictAction

    result: dict = {}
    for item in options or ():
        if "=" not in item:
            raise ConfigError(f"--cfg-options expects key=value pairs (e.g. train_cfg.max_epochs=2). Got {item!r}.")
        key, value = item.split("=", 1)
        if not key:
            raise ConfigError(f"--cfg-options: empty key in {item!r}.")
        # Dict literals (e.g. layers={'pts_neck': 'pts_neck'}) are Python; the rest as mmengine parses.
        result[key] = ast.literal_eval(value) if value.lstrip().startswith("{") else DictAction._parse_iterable(value)
    return result


def load_config(path: str | os.PathLike, cfg_options: tuple[str, ...] | list[str] | None = None):
    """Load an mmengine config file (with overrides), or raise ConfigError saying what is wrong."""
    from mmengine.config import Config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:  # syntax errors, missing _base_ files, bad imports
        raise ConfigError(f"cannot load config {path}: {type(exc).__name__}: {exc}") from None
    overrides = parse_cfg_options(cfg_options)
    if overrides:
        cfg.merge_from_dict(overrides)
    if "model" not in cfg:
        raise ConfigError(f"config {path} has no `model` section; pass an mmdet3d detector config.")
    return cfg


def check_writable_location(path: str | os.PathLike, option: str) -> None:
    """Refuse a local output path that cannot be created or written (before any heavy work).

    The nearest existing ancestor must be a directory in which a file can really be created: this
    also holds as root, for whom permission bits do not stop writes but a file, /proc or a
    read-only mount do. Remote URLs (s3://...) are not checked here.
    """
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        _check_remote_location(text, option)
        return
    target = Path(text.removeprefix("file://")).absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option} {text} cannot be created: {probe} is a file, not a directory; "
                          f"choose another {option}.")
    try:
        fd, name = tempfile.mkstemp(prefix=".bevcache-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{option} {text} is not writable: cannot create a file in {probe} ({exc.strerror}); choose a writable "
                          f"{option} or fix the permissions.") from None


def _check_remote_location(url: str, option: str) -> None:
    """The bucket (first path part) of an fsspec URL must be reachable with the environment's settings."""
    import fsspec

    try:
        fs, root = fsspec.url_to_fs(url, use_listings_cache=False)
        bucket = root.split("/")[0]
        found = fs.exists(bucket)
    except ImportError as exc:
        raise ConfigError(f"{option} {url} needs an fsspec backend that is not installed ({exc}); for s3:// "
                          "install bevcache[s3] (s3fs).") from None
    except Exception as exc:  # botocore/aiohttp errors: endpoint down, bad credentials, ...
        text = f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"{option} {url} is unreachable ({text[:200]}); check the endpoint (AWS_ENDPOINT_URL) "
                          "and credentials (AWS_* environment or ~/.aws).") from None
    if not found:
        raise ConfigError(f"{option} {url}: bucket {bucket!r} does not exist or these credentials cannot see it; "
                          "create it, or fix the endpoint/credentials (AWS_* environment or ~/.aws).")


def resolve_device(device: str | None = None) -> torch.device:
    """`device` if given, else this rank's CUDA device when there is one, else CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(launcher: str) -> None:
    """Join the torchrun process group: NCCL on GPUs, gloo on CPU.

    mmengine's `init_dist` always calls `torch.cuda.set_device`, which a CPU-only torch lacks,
    so on CPU the gloo group is made here and the Runner, seeing it, does not make another.
    """
    import torch.distributed as dist

    if launcher == "none" or dist.is_initialized():
        return
    if launcher != "pytorch":
        raise ConfigError(f"launcher must be one of ['none', 'pytorch']. Got {launcher!r}.")
    # A collective (barrier, all_reduce) waits at most this long for a stuck peer, then fails. A
    # peer that dies is noticed sooner: torchrun then stops the other ranks.
    from datetime import timedelta

    seconds = int(os.environ.get("BEVCACHE_DIST_TIMEOUT_S", 1800))
    if torch.cuda.is_available():
        from mmengine.dist import init_dist

        init_dist(launcher, backend="nccl", timeout=seconds)  # mmengine takes seconds
    else:
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=seconds))
