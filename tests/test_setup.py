"""Set-up is idempotent and versions are pinned in exactly one place."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            assert name.lower() not in pins, f"{name} pinned twice"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_direct_dependency_is_pinned():
    pins = _pins()
    for pkg in ["torch", "numpy", "mmengine", "mmcv", "mmdet", "mmdet3d", "spconv", "zarr", "numcodecs",
                "click", "nuscenes-devkit", "pytest"]:
        assert pkg in pins, f"{pkg} missing from {CONSTRAINTS}"
    assert pins["numpy"].startswith("1."), "nuscenes-devkit needs numpy<2"
    assert pins["mmcv"] == "2.1.0"


def test_pyproject_ranges_admit_the_pins():
    text = (REPO / "pyproject.toml").read_text()
    pins = _pins()
    for name, op, version in re.findall(r'"([a-z0-9_-]+)\s*(==|>=)\s*([0-9.]+)', text):
        if name in pins and op == "==":
            assert pins[name] == version, f"pyproject pins {name}=={version}, constraints {pins[name]}"


@pytest.mark.skipif(not (REPO / ".venv" / ".bevcache-setup").exists(), reason="set-up has not run in this checkout")
def test_setup_is_idempotent_and_fast_when_done():
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr
