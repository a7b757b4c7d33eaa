#!/usr/bin/env bash
# Idempotent set-up of .venv with the pinned stack (versions live only in requirements/constraints.txt).
# Order and traps follow the verified recipe: torch first (never a CUDA pull), build tools and
# opencv-headless before the mmcv source build, mmcv/mmdet3d with --no-deps, the rest constrained.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_BASE=${PYTHON:-python3}
VENV=${BEVCACHE_VENV:-.venv}
CONSTRAINTS=requirements/constraints.txt
WHEEL_ROOT=${BEVCACHE_WHEEL_CACHE:-$HOME/.cache/bevcache/wheels}
STAMP="$VENV/.bevcache-setup"
WANT_STAMP=$(cat "$CONSTRAINTS" "$0" pyproject.toml | sha256sum | cut -c1-16)

STEP="start"
TOTAL=7
step() { STEP="$2"; echo "[setup $1/$TOTAL] $2" >&2; }
trap 'echo "[setup] FAILED at step: $STEP (see the pip output above; rerun make setup after fixing)" >&2' ERR

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] && "$VENV/bin/python" -c "import bevcache, mmdet3d, mmcv.ops, spconv, zarr" 2>/dev/null; then
  echo "[setup] $VENV is up to date (delete $STAMP to force a re-check)" >&2
  exit 0
fi
T0=$(date +%s)

step 1 "virtual environment in $VENV"
if [[ ! -x "$VENV/bin/python" ]]; then
  # A user's own torch (e.g. a CUDA build) in the base interpreter is reused, not replaced.
  if "$PY_BASE" -c "import torch" 2>/dev/null; then
    echo "  reusing the base interpreter's torch $("$PY_BASE" -c 'import torch; print(torch.__version__)')" >&2
    "$PY_BASE" -m venv --system-site-packages "$VENV"
  else
    "$PY_BASE" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

step 2 "torch"
if ! "$PY" -c "import torch" 2>/dev/null; then
  # Exactly this spec takes the CPU wheel on local disk; anything looser pulls a CUDA build.
  "${PIP[@]}" install "$(grep '^torch==' "$CONSTRAINTS")"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)")
TORCH_SPEC="torch==${TORCH_VERSION}"
echo "  torch $TORCH_VERSION" >&2
# Effective constraints: the pinned file with torch replaced by whatever torch this venv has.
EFFECTIVE="$VENV/constraints-effective.txt"
grep -v '^torch==' "$CONSTRAINTS" > "$EFFECTIVE"
echo "$TORCH_SPEC" >> "$EFFECTIVE"
PIPC=("${PIP[@]}" install -c "$EFFECTIVE")

step 3 "build tools (numpy, setuptools<81 for pkg_resources, ninja, opencv-headless before mmcv)"
"${PIPC[@]}" "$TORCH_SPEC" numpy setuptools wheel ninja opencv-python-headless

step 4 "mmcv 2.1.0 with ops (cached wheel, else a ~12 min source build)"
TAG=$("$PY" -c "import sys, torch; print(f'torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}')")
WHEEL_DIR="$WHEEL_ROOT/$TAG"
mkdir -p "$WHEEL_DIR"
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  if ! ls "$WHEEL_DIR"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    echo "  building mmcv from source into $WHEEL_DIR (MAX_JOBS=${MAX_JOBS:-$(nproc)})" >&2
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip --disable-pip-version-check wheel \
      --no-deps --no-build-isolation --no-cache-dir -w "$WHEEL_DIR" mmcv==2.1.0
  else
    echo "  using cached $(ls "$WHEEL_DIR"/mmcv-2.1.0-*.whl)" >&2
  fi
  "${PIP[@]}" install --no-deps "$WHEEL_DIR"/mmcv-2.1.0-*.whl
fi

step 5 "OpenMMLab packages (--no-deps: their declared deps pull open3d/tensorboard/opencv-python)"
"${PIPC[@]}" --no-deps mmengine mmdet mmdet3d lyft_dataset_sdk nuscenes-devkit

# crc32c: zarr's CRC32C codec imports it; google-crc32c: numcodecs' checksums prefer it and warn
# ("crc32c usage is deprecated") on every command when only crc32c is there.
step 6 "runtime dependencies (explicit list; the real imports of mmdet/mmdet3d/nuscenes-devkit; s3fs, moto for S3 stores)"
"${PIPC[@]}" "$TORCH_SPEC" numpy spconv zarr numcodecs click \
  pycocotools scipy six terminaltables cachetools descartes fire parameterized scikit-learn \
  pandas numba networkx trimesh plyfile scikit-image pyquaternion shapely \
  addict yapf termcolor rich matplotlib pillow pyyaml tqdm fsspec crc32c google-crc32c \
  pytest pytest-timeout pytest-xdist ruff mypy hypothesis \
  s3fs "moto[server]"

step 7 "bevcache (editable)"
"${PIPC[@]}" --no-deps -e .
"$PY" -c "import bevcache, mmdet3d, mmcv.ops, spconv, zarr; from mmdet3d.utils import register_all_modules; register_all_modules()"
# The resolver must not have replaced torch behind our back.
[[ "$("$PY" -c 'import torch; print(torch.__version__)')" == "$TORCH_VERSION" ]] || { echo "[setup] torch changed during set-up" >&2; exit 1; }

echo "$WANT_STAMP" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - T0 )) s" >&2
