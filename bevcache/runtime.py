"""Process set-up shared by every command: registries, configs and overrides, devices, process groups."""

from __future__ import annotations

import ast
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ConfigError

_READY = False


def setup_runtime() -> None:
    """Register mmdet3d's modules and make it the default scope (idempotent); bevcache's own
    components and shims are registered by importing the package."""
    global _READY
    if _READY:
        return
    from mmdet3d.utils import register_all_modules
    from mmengine.registry import init_default_scope

    register_all_modules(init_default_scope=False)
    init_default_scope("mmdet3d")
    _READY = True


def parse_cfg_options(options: Sequence[str] | dict | None) -> dict:
    """Parse `key=value` overrides with mmengine's own `--cfg-options` semantics (DictAction)."""
    import argparse

    from mmengine.config import DictAction

    if isinstance(options, dict):
        return dict(options)
    items = [str(o) for o in options or ()]
    if not items:
        return {}
    bad = [o for o in items if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"--cfg-options expects key=value pairs (e.g. train_cfg.max_epochs=2). Got {bad[0]!r}.")
    # Beyond DictAction: a dict literal (e.g. spatial={'grid': (16, 16), 'weight': 2}) is Python, taken
    # whole (DictAction would split it at its commas).
    literal = {}
    for item in [i for i in items if i.split("=", 1)[1].lstrip().startswith("{")]:
        key, value = item.split("=", 1)
        try:
            literal[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--cfg-options {key}: {value!r} is not a Python dict literal.") from None
        items.remove(item)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    parsed = dict(parser.parse_args(["--cfg-options", *items]).cfg_options) if items else {}
    return {**parsed, **literal}


def load_config(path: str | os.PathLike, cfg_options: Sequence[str] | dict | None = None):
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


LAUNCHERS = ("none", "pytorch", "slurm", "mpi")


def _cpu_rank_env(launcher: str) -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from a slurm or MPI job's environment, for gloo on CPU.

    mmengine's slurm and mpi paths cannot run on a CPU-only torch: both call
    `torch.cuda.set_device` (slurm with `proc_id % torch.cuda.device_count()`, a division by zero
    without GPUs), and the slurm path asks `scontrol` for the first host. On CPU we read the same
    variables mmengine reads and hand them to torch's env:// rendezvous.
    """
    if launcher == "slurm":
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local = int(os.environ.get("SLURM_LOCALID", rank))
        nodes = os.environ.get("SLURM_NODELIST", "127.0.0.1")
        if "MASTER_ADDR" not in os.environ:
            import shutil
            import subprocess

            if shutil.which("scontrol"):
                nodes = subprocess.getoutput(f"scontrol show hostname {nodes} | head -n1")
            elif "[" in nodes or "," in nodes:
                raise ConfigError(f"SLURM_NODELIST={nodes!r} needs `scontrol` to find the first host; set MASTER_ADDR.")
            os.environ["MASTER_ADDR"] = nodes
    else:  # OpenMPI's variables, as mmengine's _init_dist_mpi reads them
        rank, world = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
        local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", rank))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))


def leave_process_group() -> None:
    """Destroy the process group before the interpreter's teardown, as torch asks of every
    distributed program: left to exit, gloo's threads can abort the finished process (rc -6,
    "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(launcher: str, cfg=None) -> None:
    """Join the job's process group with mmengine's `init_dist` (NCCL on GPUs); gloo on CPU.

    The collective timeout is mmengine's own setting, `env_cfg.dist_cfg.timeout` (seconds;
    default 1800): a collective waits that long for a stuck peer, then fails. A peer that dies is
    noticed sooner (torchrun/slurm stop the other ranks).
    """
    import torch.distributed as dist

    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher must be one of {list(LAUNCHERS)}. Got {launcher!r}.")
    if launcher == "none" or dist.is_initialized():
        return
    dist_cfg = dict(((cfg or {}).get("env_cfg") or {}).get("dist_cfg") or {})
    seconds = int(dist_cfg.pop("timeout", 1800))
    try:
        if torch.cuda.is_available():
            from mmengine.dist import init_dist

            dist_cfg.setdefault("backend", "nccl")
            init_dist(launcher, timeout=seconds, **dist_cfg)  # mmengine takes seconds
            return
        if launcher != "pytorch":
            _cpu_rank_env(launcher)
        from datetime import timedelta

        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=seconds))
    except KeyError as exc:
        raise ConfigError(f"--launcher {launcher}: the environment lacks {exc}; start the command with "
                          f"{'torchrun' if launcher == 'pytorch' else 'srun' if launcher == 'slurm' else 'mpirun'}.") from None
