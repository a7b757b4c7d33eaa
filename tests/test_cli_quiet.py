"""A clean run says nothing on stderr: no library warnings (e.g. numcodecs' "crc32c usage is
deprecated ... install google_crc32c") reach the user of `bevcache --help` or `bevcache info`."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bevcache.store import LayerSpec, create_store

REPO = Path(__file__).resolve().parents[1]


def quiet_run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-m", "bevcache_cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_help_and_info_write_nothing_to_stderr(tmp_path):
    store = create_store(str(tmp_path / "f.zarr"), num_samples=3, layers=[LayerSpec("pts_neck", 4, "avg")],
                         dtype="float16", tokens=["a", "b", "c"], sample_idx=[0, 1, 2], metadata={},
                         spatial={"pts_neck": (4, 3, 3)})
    store.write_block(0, {"pts_neck": np.ones((3, 4))}, spatial={"pts_neck": np.ones((3, 4, 3, 3))})
    for args in (["--help"], ["info", store.url]):
        result = quiet_run(*args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", f"bevcache {' '.join(args)} wrote to stderr:\n{result.stderr}"
        assert result.stdout


def test_numcodecs_imports_its_checksums_silently():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, "-W", "default", "-c", "import numcodecs.checksum32, zarr.codecs"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr  # google-crc32c is installed (setup step 6)


def test_a_clean_extract_is_quiet_and_tidy(data_root, tmp_path):
    """No third-party warning by default (one line counts them; -v shows them), the dataset summary
    once, and no lock file left beside the finished store."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    args = ["extract", "--config", "configs/tiny_voxel_teacher.py", "--random-init", "--data-root", str(data_root),
            "--num-workers", "0"]
    quiet = subprocess.run([sys.executable, "-m", "bevcache_cli", *args, "--out", str(tmp_path / "q.zarr")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    out = quiet.stdout + quiet.stderr
    foreign = [line for line in out.splitlines() if "warn" in line.lower() and "bevcache" not in line
               and not line.startswith("note:")]
    assert not foreign, foreign
    assert out.count("The number of instances per category") == 1
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "known third-party warning" in note[0]
    assert not list(tmp_path.glob("*.lock"))
    loud = subprocess.run([sys.executable, "-m", "bevcache_cli", "-v", *args, "--out", str(tmp_path / "v.zarr")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0 and "note:" not in loud.stderr
    assert sum("warn" in line.lower() for line in (loud.stdout + loud.stderr).splitlines()) > len(foreign)
