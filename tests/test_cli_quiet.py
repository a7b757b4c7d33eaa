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
    return subprocess.run([sys.executable, "-m", "bevcache.cli", *args], cwd=REPO, env=env, capture_output=True,
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
