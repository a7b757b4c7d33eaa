"""The `bevcache` command: parse, call the library, report. BevcacheError becomes one line + exit 1."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from . import __version__
from .errors import BevcacheError, SettingError, os_error_text


def _friendly(fn):
    """Turn bevcache's own errors into `error: <message>` and a non-zero exit (2 for a bad setting,
    as click does for a bad option; 1 otherwise)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .quiet import discard_note

        try:
            return fn(*args, **kwargs)
        except BevcacheError as exc:
            discard_note()
            click.echo(f"error: {exc}", err=True)
            sys.exit(2 if isinstance(exc, SettingError) else 1)
        except KeyboardInterrupt:
            discard_note()
            click.echo("error: interrupted; run the command again (extract and train: with --resume "
                       "to keep what was finished).", err=True)
            sys.exit(130)
        except OSError as exc:  # disk full, read-only or forbidden paths outside bevcache's own checks
            discard_note()
            click.echo(f"error: {os_error_text(exc)}", err=True)
            sys.exit(1)

    return wrapper


class _KeyValues(click.Option):
    """`--cfg-options a=1 b=2` as in mmdet3d's tools (mmengine's DictAction): the option takes every
    following `key=value` word up to the next option; repeating the option works too."""

    def add_to_parser(self, parser, ctx):
        result = super().add_to_parser(parser, ctx)
        option = next(parser._long_opt[name] for name in self.opts if name in parser._long_opt)
        store_one = option.process

        def process(value, state):
            store_one(value, state)
            while state.rargs and not state.rargs[0].startswith("-") and "=" in state.rargs[0]:
                store_one(state.rargs.pop(0), state)

        option.process = process
        return result


def _with_models(fn):
    """Commands that build models or datasets: bevcache's components registered first (the
    `bevcache` command starts without them so that --help, info and verify stay fast)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import register
        from .quiet import gather_mmengine_notices

        register()
        gather_mmengine_notices()
        result = fn(*args, **kwargs)
        from .runtime import leave_process_group

        leave_process_group()  # after a successful command only: a failing rank just exits
        return result

    return wrapper


def _cfg_options(help_text: str = "key=value overrides of the config (mmengine --cfg-options semantics)."):
    return click.option("--cfg-options", cls=_KeyValues, multiple=True, help=help_text)


LAUNCHER = click.option("--launcher", type=click.Choice(["none", "pytorch", "slurm", "mpi"]), default="none",
                        help="Distributed launcher (mmengine's init_dist; gloo on CPU).")
TRUST = click.option("--trust-checkpoint", is_flag=True,
                     help="Unpickle the checkpoint fully (arbitrary code!) instead of the weights-only loader.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bevcache")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and every third-party warning.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Distil mmdet3d detectors from a teacher that runs once: extract, then train."""
    from .quiet import gather_known_warnings

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s bevcache %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:  # known upstream noise: one summary line at the end instead
        ctx.with_resource(gather_known_warnings())


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--samples", type=click.IntRange(min=1), default=200, show_default=True, help="Training samples.")
@click.option("--val-samples", type=click.IntRange(min=1), default=None, help="Validation samples [default: samples/4].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sweeps", type=click.IntRange(min=0), default=0, show_default=True, help="LiDAR sweeps per sample.")
@click.option("--version", "version", type=click.Choice(["mini", "trainval", "both"]), default="both", show_default=True,
              help="nuScenes table versions to write (v1.0-mini, v1.0-trainval: BEVFusion evaluates on trainval).")
@click.option("--no-gt-database", is_flag=True, help="Skip the ground-truth database ObjectSample reads.")
@click.option("--cameras/--no-cameras", default=False, show_default=True,
              help="Also render the six nuScenes surround cameras (JPEGs, camera infos and tables); bicycles and "
                   "motorcycles then differ only in colour, a cue only cameras see (docs/synth_cameras.md).")
@click.option("--image-size", type=(int, int), default=(384, 216), show_default=True, metavar="W H",
              help="Camera image width and height (nuScenes: 1600 900).")
@click.option("--cue-lidar-trace", type=float, default=0.0, show_default=True, metavar="T",
              help="With --cameras: motorcycles return T more LiDAR intensity than bicycles (relative, in [0, 0.5]), "
                   "a weak LiDAR trace of the camera cue; 0 keeps the two LiDAR-identical.")
@_friendly
@_with_models
def synth(out_dir: str, samples: int, val_samples: int | None, seed: int, sweeps: int, version: str,
          no_gt_database: bool, cameras: bool, image_size: tuple[int, int], cue_lidar_trace: float) -> None:
    """Write a synthetic nuScenes-format data root (points, v2 infos, nuScenes tables, gt database)."""
    from .synth import generate

    summary = generate(out_dir, num_train=samples, num_val=val_samples or max(samples // 4, 2), seed=seed,
                       sweeps=sweeps, progress=True, version="both" if version == "both" else f"v1.0-{version}",
                       gt_database=not no_gt_database, cameras=cameras, image_size=(image_size[0], image_size[1]),
                       cue_lidar_trace=cue_lidar_trace)
    click.echo(json.dumps(summary, indent=2, default=str))


@main.command()
@click.option("--config", "config", required=True, type=click.Path(), help="Teacher config (mmengine).")
@click.option("--checkpoint", type=click.Path(), default=None, help="Teacher weights.")
@click.option("--out", default=None, help="Store path or URL [default: work_dirs/<config>/features.zarr].")
@click.option("--layers", default=None, help="Comma-separated module paths [default: pts_neck].")
@click.option("--pooling", type=click.Choice(["avg", "max", "avgmax"]), default=None)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--num-workers", type=click.IntRange(min=0), default=None)
@click.option("--chunk-rows", type=click.IntRange(min=1), default=None, help="Rows per chunk (= resumable block).")
@click.option("--views", type=click.IntRange(min=0), default=None,
              help="Also cache K augmented views per sample (training pipeline, seeded per view); for replay, "
                   "K >= the student's epochs [default: 0].")
@click.option("--spatial", default=None,
              help="Also keep BEV maps, pooled to a grid: LAYER=N or LAYER=HxW, comma-separated (pts_neck=45).")
@_cfg_options()
@click.option("--resume", is_flag=True, help="Continue an interrupted store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--random-init", is_flag=True, help="Knowingly cache a randomly initialised teacher (no weights).")
@TRUST
@LAUNCHER
@click.option("--device", default=None, help="e.g. cpu, cuda:0 [default: cuda when available].")
@click.option("--data-root", default=None, help="Use this data root instead of the config's.")
@_friendly
@_with_models
def extract(**kwargs) -> None:
    """Run the frozen teacher once and cache pooled layer features in a Zarr store."""
    from .extract import ExtractOptions
    from .extract import extract as run

    kwargs["cfg_options"] = list(kwargs["cfg_options"])
    info = run(ExtractOptions(**kwargs))
    click.echo(f"store {info['url']}: {info['num_complete']}/{info['num_samples']} rows, "
               f"{_size(info.get('bytes_on_disk'))} on disk, layers "
               + ", ".join(f"{k}[{v['dim']}]" for k, v in info["layers"].items())
               + "".join(f", spatial {k}[{v['channels']}x{v['height']}x{v['width']}]" for k, v in (info.get("spatial") or {}).items())
               + (f", {info['views']} augmented views per sample" if info.get("views") else ""))


def _size(n: int | None) -> str:
    if n is None:
        return "? bytes"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return str(n)


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@_friendly
def info(store: str, as_json: bool) -> None:
    """Describe a feature store."""
    from .store import open_store

    data = open_store(store).info()
    if as_json:
        click.echo(json.dumps(data, default=str))
        return
    click.echo(f"store      {data['url']}")
    click.echo(f"rows       {data['num_complete']}/{data['num_samples']} complete")
    for name, layer in data["layers"].items():
        click.echo(f"layer      {name}: dim {layer['dim']}, {layer['dtype']}, {layer['pooling']} pooling")
    for name, sp in (data.get("spatial") or {}).items():
        click.echo(f"spatial    {name}: [{sp['channels']}, {sp['height']}, {sp['width']}] {sp['dtype']} maps, "
                   f"{_size(sp.get('bytes_on_disk'))} on disk")
    if data.get("views"):
        click.echo(f"views      {data['views']} augmented views per sample (+ the un-augmented one)")
    click.echo(f"teacher    {json.dumps(data.get('teacher'), default=str)}")
    click.echo(f"dataset    {json.dumps(data.get('dataset'), default=str)}")
    size = f"size       {_size(data.get('bytes_on_disk'))} on disk"
    if data.get("bytes_chunks") is not None:
        size += (f": {_size(data['bytes_raw'])} of data in {_size(data['bytes_chunks'])} of chunks "
                 f"({data['compression_ratio']:.2f}x), {_size(data['bytes_metadata'])} of metadata")
    click.echo(size)


@main.command()
@click.argument("store")
@click.option("--config", default=None, type=click.Path(), help="Check the store matches this config's dataset too.")
@_cfg_options()
@click.option("--data-root", default=None, help="Use this data root instead of the config's.")
@_friendly
def verify(store: str, config: str | None, cfg_options: tuple[str, ...], data_root: str | None) -> None:
    """Read every chunk (checksums), check completeness, NaN/Inf and (with --config) the dataset."""
    from .errors import StoreMismatch
    from .store import open_store

    handle = open_store(store)
    problems = handle.verify()
    checked = f"{handle.num_samples} rows, every chunk read and checksummed"
    if config:
        from . import register
        from .data import dataset_matches_store

        register()
        try:
            checked += "; " + dataset_matches_store(handle, config, cfg_options, data_root=data_root)
        except StoreMismatch as exc:
            problems.append(str(exc))
    if problems:
        for p in problems:
            click.echo(f"FAIL: {p}", err=True)
        sys.exit(1)
    click.echo(f"OK: {store} ({checked})")


@main.command()
@click.option("--student", required=True, type=click.Path(), help="Student config (mmengine).")
@click.option("--cache", default=None, help="Store from `bevcache extract` [default: the config's distill.cache].")
@click.option("--work-dir", default=None)
@click.option("--resume", "resume", is_flag=False, flag_value="auto", default=None,
              help="Resume from CKPT, or from the latest checkpoint in the work dir when no value is given.")
@_cfg_options("key=value overrides of the student config (mmengine --cfg-options semantics).")
@click.option("--distill", "distill_options", cls=_KeyValues, multiple=True,
              help="key=value overrides of the distiller settings (alpha=0.5 nce_k=4096).")
@LAUNCHER
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA).")
@click.option("--teacher-online", default=None, type=click.Path(), help="Reference: run this teacher every step instead of a cache.")
@click.option("--teacher-checkpoint", default=None, type=click.Path())
@TRUST
@click.option("--plain", is_flag=True, help="Ignore any distill section: the baseline student.")
@click.option("--data-root", default=None, help="Use this data root instead of the config's.")
@click.option("--max-iters", type=int, default=None,
              help="Train N iterations (an iteration loop; epoch schedules squeezed into N iterations; no validation "
                   "unless --val-interval). For a first short run.")
@click.option("--max-epochs", type=int, default=None, help="Train N epochs (schedules rescaled to N epochs).")
@click.option("--val-interval", type=int, default=None, help="Validate every K epochs (or iterations with --max-iters).")
@_friendly
@_with_models
def train(**kwargs) -> None:
    """Train the student with its task loss + alpha * CRD against cached teacher features."""
    from .train import TrainOptions
    from .train import train as run

    kwargs["cfg_options"] = list(kwargs["cfg_options"])
    kwargs["distill_options"] = list(kwargs["distill_options"])
    runner = run(TrainOptions(**kwargs))
    click.echo(f"work dir {runner.work_dir}")


@main.command("export-student")
@click.argument("checkpoint", type=click.Path())
@click.argument("out", type=click.Path())
@TRUST
@_friendly
@_with_models
def export_student(checkpoint: str, out: str, trust_checkpoint: bool) -> None:
    """Save the plain student weights of a bevcache checkpoint (loadable without bevcache)."""
    from .teacher import export_student as run

    click.echo(run(checkpoint, out, trust=trust_checkpoint))


if __name__ == "__main__":
    main()
