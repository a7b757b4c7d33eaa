"""The click CLI: help, version, clean errors for bad input."""

import json

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


def test_cfg_options_follow_mmengine_and_take_dict_literals_whole():
    from bevcache.runtime import parse_cfg_options

    parsed = parse_cfg_options(["alpha=0.5", "a.b=[1,2]", "spatial={'grid': (16, 16), 'weight': 2}", "layers={}"])
    assert parsed == {"alpha": 0.5, "a.b": [1, 2], "spatial": {"grid": (16, 16), "weight": 2}, "layers": {}}

