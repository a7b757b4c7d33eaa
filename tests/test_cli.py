"""The click CLI: help, version, clean errors for bad input."""

import json

import pytest
from click.testing import CliRunner

from bevcache import __version__
from bevcache.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for cmd in ("synth", "extract", "train", "info", "verify", "export-student"):
        assert cmd in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_bad_argument_is_a_clear_usage_error():
    result = run("extract", "--config", "x.py", "--pooling", "median")
    assert result.exit_code == 2
    assert "Invalid value for '--pooling'" in result.output


def test_missing_config_is_one_line(tmp_path):
    result = run("extract", "--config", str(tmp_path / "nope.py"))
    assert result.exit_code == 1
    assert "config file not found" in result.output and "Traceback" not in result.output


def test_bad_cfg_options_syntax(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("model = dict(type='CenterPoint')\n")
    result = run("extract", "--config", str(cfg), "--cfg-options", "train_cfg.max_epochs")
    assert result.exit_code == 1 and "key=value" in result.output


def test_info_on_missing_store(tmp_path):
    result = run("info", str(tmp_path / "none.zarr"))
    assert result.exit_code == 1 and "bevcache extract" in result.output


def test_synth_command_writes_a_data_root(tmp_path):
    result = run("synth", str(tmp_path / "d"), "--samples", "2", "--val-samples", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "nuscenes_infos_train.pkl").is_file()
    assert json.loads(result.output[result.output.index("{"):])


def test_synth_refuses_a_cue_trace_without_cameras(tmp_path):
    result = run("synth", str(tmp_path / "d"), "--samples", "2", "--cue-lidar-trace", "0.1")
    assert result.exit_code == 1 and "--cameras" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d").exists()


def test_cfg_options_follow_mmengine_and_take_dict_literals_whole():
    from bevcache.runtime import parse_cfg_options

    parsed = parse_cfg_options(["alpha=0.5", "a.b=[1,2]", "spatial={'grid': (16, 16), 'weight': 2}", "layers={}"])
    assert parsed == {"alpha": 0.5, "a.b": [1, 2], "spatial": {"grid": (16, 16), "weight": 2}, "layers": {}}



# Each distiller setting with a value outside its range (a new setting must be added here).
BAD_DISTILL_VALUES = {
    "layers": "layers=pts_neck", "alpha": "alpha=-1", "feat_dim": "feat_dim=0", "nce_k": "nce_k=0",
    "nce_t": "nce_t=0", "nce_m": "nce_m=1.5", "z_momentum": "z_momentum=2", "pooling": "pooling=median",
    "augmentation": "augmentation=sometimes", "views": "views=0", "spatial": "spatial={'weight': -1}",
}


def test_every_distill_setting_has_a_bad_value_under_test():
    from bevcache.train import distill_setting_names

    assert set(distill_setting_names()) - {"cache"} == set(BAD_DISTILL_VALUES)


@pytest.mark.parametrize("key", sorted(BAD_DISTILL_VALUES))
def test_a_bad_distill_setting_is_one_line_and_exit_2(data_root, fp32_store, tmp_path, key):
    result = CliRunner().invoke(main, ["train", "--student", "configs/tiny_student.py", "--cache", fp32_store,
                                       "--data-root", str(data_root), "--work-dir", str(tmp_path / "w"),
                                       "--max-iters", "1", "--distill", BAD_DISTILL_VALUES[key]])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and key in lines[0] and "must be" in lines[0], result.output
    assert "Traceback" not in result.output


def test_an_unknown_distill_setting_is_refused_with_exit_2(data_root, fp32_store, tmp_path):
    result = CliRunner().invoke(main, ["train", "--student", "configs/tiny_student.py", "--cache", fp32_store,
                                       "--data-root", str(data_root), "--distill", "nce_kk=3"])
    assert result.exit_code == 2 and "unknown distill settings ['nce_kk']" in result.output


def test_the_command_starts_without_torch_or_mmdet3d(tmp_path):
    """`bevcache --help`, `info` and `verify` (the console script's light start) import neither torch
    nor mmdet3d; a command that builds models registers bevcache's components itself."""
    import subprocess
    import sys

    import numpy as np

    from bevcache.store import LayerSpec, create_store

    store = create_store(str(tmp_path / "f.zarr"), num_samples=2, layers=[LayerSpec("pts_neck", 4, "avg")],
                         dtype="float16", tokens=["a", "b"], sample_idx=[0, 1], metadata={})
    store.write_block(0, {"pts_neck": np.ones((2, 4))})
    code = ("import sys, bevcache_cli\nfrom bevcache.cli import main\n"
            "for args in (['--help'], ['info', sys.argv[1]], ['verify', sys.argv[1]]):\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert not e.code, (args, e.code)\n"
            "print('LOADED', sorted(m for m in ('torch', 'mmdet3d', 'mmengine', 'spconv') if m in sys.modules))\n"
            "import bevcache\nprint('REGISTERED', bevcache._REGISTERED)\n")
    proc = subprocess.run([sys.executable, "-c", code, store.url], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout and "REGISTERED False" in proc.stdout, proc.stdout
    assert "OK:" in proc.stdout and "rows       2/2 complete" in proc.stdout
