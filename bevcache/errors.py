"""Named failures. Each message says what was expected, what was found and what to do;
the CLI prints them as one line and exits non-zero."""


class BevcacheError(Exception):
    """Base class: an error the user can act on (never a bug inside bevcache)."""


class ConfigError(BevcacheError):
    """A config, option or argument is missing or invalid."""


class SettingError(ConfigError, ValueError):
    """A setting's value is outside its allowed range (a usage error: the CLI exits with 2, as click
    does). Also a ValueError, which is what a loss module given a bad argument raises."""


class LayerError(BevcacheError):
    """A requested layer does not exist or produced no output."""


class StoreError(BevcacheError):
    """A feature store is missing, unreadable, corrupt or incomplete."""


class StoreMismatch(StoreError):
    """A store exists but belongs to another dataset, teacher or layer set."""


class FeatureValueError(BevcacheError):
    """A teacher produced NaN/Inf; the sample index is named so nothing garbage is cached."""


class TrainingInterrupted(BevcacheError):
    """Training stopped on SIGINT/SIGTERM; the message names the checkpoint to resume from."""


class BEVFusionOpUnavailable(RuntimeError):
    """A compiled BEVFusion op was called where it cannot run (no CUDA or not compiled)."""


def os_error_text(exc: OSError) -> str:
    """One line for an OSError the user can act on (disk full, read-only or forbidden path, ...)."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    what = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{what}{where}: free space (or raise the quota) on that disk, then rerun the command with "
                "--resume (it says when a store must be re-created with --overwrite instead).")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{what}{where}: choose a writable location (--out / --work-dir) or fix its permissions."
    return f"{what}{where}: check that path, then rerun the command."


class CheckpointError(ConfigError):
    """A checkpoint is missing, unreadable, unsafe to unpickle, or does not fit its model."""


class WarpError(ConfigError):
    """A sample's recorded augmentation cannot be turned into one BEV warp."""
