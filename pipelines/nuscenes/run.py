"""Real nuScenes + the released BEVFusion-L teacher: prepare, checkpoint, extract, train, evaluate.

    export MMDET3D_ROOT=/path/to/mmdetection3d            # a v1.4 checkout (projects/BEVFusion)
    python pipelines/nuscenes/run.py --data-root data/nuscenes --gpus 8
    python pipelines/nuscenes/run.py --dry-run             # the whole chain on synthetic data, CPU, minutes

Each step is a command a user could type (printed with `$`), its output logged to
WORK/logs/<step>.log; a step whose outputs already exist is skipped, so a rerun continues. See
README.md beside this file for the expected time and disk per step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pipelines/common.py
from common import REPO, _shorten  # noqa: E402

STEPS = ("prepare", "checkpoint", "extract", "train", "evaluate")
CHECKPOINT_URL = ("https://download.openmmlab.com/mmdetection3d/v1.1.0_models/bevfusion/"
                  "bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d-2628f933.pth")
CONFIGS = REPO / "configs" / "bevfusion"
METRIC = re.compile(r"NuScenes metric/pred_instances_3d_NuScenes/(mAP|NDS): ([0-9.]+)")
PROGRESS = ("Epoch(train)", "Iter(train)", "Epoch(test)", "bevcache INFO", "bevcache WARNING", "error:",
            "NuScenes metric/pred_instances_3d_NuScenes/mAP", "NuScenes metric/pred_instances_3d_NuScenes/NDS",
            "Create GT Database", "Traceback")

# --dry-run: tiny synthetic data, the reduced grid, a random teacher, a few student iterations.
DRY_TRAIN, DRY_VAL, DRY_ITERS = 4, 2, 3
DRY_STUDENT = """
_base_ = ['{student}']
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={iters}, val_interval=10**9)
param_scheduler = []
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval={iters}, by_epoch=False),
                     logger=dict(type='LoggerHook', interval=1))
log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
train_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                        sampler=dict(_delete_=True, type='InfiniteSampler', shuffle=True))
val_cfg = None
val_dataloader = None
val_evaluator = None
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="data/nuscenes", help="nuScenes root (v1.0-trainval, samples/, sweeps/ ...).")
    p.add_argument("--work-dir", default=None, help="[default: work_dirs/nuscenes, or work_dirs/nuscenes-dry-run]")
    p.add_argument("--checkpoint", default=None, help="Teacher weights [default: download the released BEVFusion-L].")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per step (torchrun when > 1).")
    p.add_argument("--steps", default=",".join(STEPS), help=f"Comma-separated subset of {','.join(STEPS)}.")
    p.add_argument("--eval-teacher", action="store_true", help="Also score the teacher (released: NDS 69.6, mAP 64.9).")
    p.add_argument("--dry-run", action="store_true",
                   help="Synthetic data + gt database, reduced grid, random teacher, a few iterations, on CPU.")
    args = p.parse_args()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        p.error(f"--steps: unknown {unknown}; choose from {list(STEPS)}")
    work = Path(args.work_dir or ("work_dirs/nuscenes-dry-run" if args.dry_run else "work_dirs/nuscenes")).resolve()
    Recipe(args, work).run(steps)


class Recipe:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.dry = args.dry_run
        self.checkout = checkout()
        self.data = (work / "data") if self.dry else Path(args.data_root).resolve()
        self.teacher_cfg = CONFIGS / ("teacher_lidar_small.py" if self.dry else "teacher_lidar.py")
        self.student_cfg = CONFIGS / ("student_lidar_small.py" if self.dry else "student_lidar.py")
        self.weights = Path(args.checkpoint).resolve() if args.checkpoint else \
            work / ("teacher-random.pth" if self.dry else Path(CHECKPOINT_URL).name)
        self.store = work / "features.zarr"
        self.student_dir = work / "student"
        # bevcache finds the checkout from MMDET3D_ROOT alone (bevcache.bevfusion_cpu); the checkout's
        # own tools import `tools.*`, so they also get it on PYTHONPATH (where its source `mmdet3d/`
        # then shadows the installed wheel: same code, without the wheel's .mim files).
        self.env = {**os.environ, "MMDET3D_ROOT": str(self.checkout)}
        self.tools_env = {**self.env, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(self.checkout), os.environ.get("PYTHONPATH")]))}
        self.summary: dict = {"dry_run": self.dry, "data_root": str(self.data), "steps": {}}

    def run(self, steps: list[str]) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        for step in steps:
            print(f"[nuscenes] {step}", flush=True)
            t0 = time.perf_counter()
            result = getattr(self, step)() or {}
            self.summary["steps"][step] = {"seconds": round(time.perf_counter() - t0, 1), **result}
            print(f"[nuscenes] {step} done in {self.summary['steps'][step]['seconds']} s", flush=True)
            (self.work / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        print(f"[nuscenes] summary: {self.work / 'summary.json'}", flush=True)

    # -- steps ---------------------------------------------------------------------------------

    def prepare(self) -> dict:
        """Info pkls and the gt database (ObjectSample's) with mmdet3d's own converter."""
        convert = [sys.executable, "tools/create_data.py", "nuscenes", "--root-path", str(self.data),
                   "--out-dir", str(self.data), "--extra-tag", "nuscenes"]
        if self.dry:
            if not (self.data / "nuscenes_infos_train.pkl").is_file():
                self.sh("synth", [sys.executable, "-m", "bevcache.cli", "synth", str(self.data), "--samples",
                                  str(DRY_TRAIN), "--val-samples", str(DRY_VAL), "--sweeps", "1", "--seed", "0"])
            # synth wrote the infos; (re)build the gt database with the converter the real run uses
            self.sh("create_data", [*convert, "--only-gt-database"], tool=True)
            return {"synthetic": True}
        done = [self.data / f for f in ("nuscenes_infos_train.pkl", "nuscenes_infos_val.pkl", "nuscenes_dbinfos_train.pkl")]
        if all(f.is_file() for f in done):
            return {"skipped": "infos and gt database exist"}
        code = self.sh("create_data", convert, tool=True, check=False)
        if code and all(f.is_file() for f in done):
            # The converter does v1.0-test after trainval; without the test set it stops there.
            print("[nuscenes]   the converter failed after the trainval part (no v1.0-test?); training needs only "
                  "that part, which is complete", flush=True)
        elif code:
            sys.exit(f"create_data.py failed (exit {code}); see {self.work / 'logs' / 'create_data.log'}")
        return {}

    def checkpoint(self) -> dict:
        if self.weights.is_file():
            return {"path": str(self.weights), "skipped": "exists"}
        if self.dry:
            self.sh("random_teacher", [sys.executable, __file__, "--_random-teacher", str(self.teacher_cfg),
                                       str(self.weights)])
            return {"path": str(self.weights), "random": True}
        print(f"$ download {CHECKPOINT_URL}", flush=True)
        tmp = self.weights.with_suffix(".part")
        urllib.request.urlretrieve(CHECKPOINT_URL, tmp)
        # OpenMMLab names a release by the first 8 hex digits of its sha256.
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        expected = CHECKPOINT_URL.rsplit("-", 1)[1].removesuffix(".pth")
        if not digest.startswith(expected):
            sys.exit(f"downloaded checkpoint has sha256 {digest[:8]}..., expected {expected}...; delete {tmp} and retry")
        tmp.replace(self.weights)
        return {"path": str(self.weights), "sha256": digest}

    def extract(self) -> dict:
        self.bevcache("extract", "--config", self.teacher_cfg, "--checkpoint", self.weights, "--data-root", self.data,
                      "--out", self.store, *(["--batch-size", "1", "--num-workers", "0"] if self.dry else []),
                      *(["--resume"] if self.store.exists() else []))
        info = json.loads(subprocess.run([sys.executable, "-m", "bevcache.cli", "info", str(self.store), "--json"],
                                         cwd=REPO, env=self.env, capture_output=True, text=True, check=True).stdout)
        return {"store": str(self.store), "rows": info["num_complete"], "bytes_on_disk": info.get("bytes_on_disk")}

    def train(self) -> dict:
        student = self.student_cfg
        if self.dry:
            student = self.work / "student_dry_run.py"
            student.write_text(DRY_STUDENT.format(student=self.student_cfg, iters=DRY_ITERS))
        resume = ["--resume"] if (self.student_dir / "last_checkpoint").is_file() else []
        self.bevcache("train", "--student", student, "--cache", self.store, "--data-root", self.data,
                      "--work-dir", self.student_dir, *resume)
        return {"weights": str(self.student_dir / "student_weights.pth")}

    def evaluate(self) -> dict:
        """mmdet3d's own tools/test.py on the exported student (and optionally the teacher)."""
        result = {"student": self.test("student", self.student_cfg, self.student_dir / "student_weights.pth")}
        if self.args.eval_teacher:
            result["teacher"] = self.test("teacher", self.teacher_cfg, self.weights)
        return result

    # -- helpers -------------------------------------------------------------------------------

    def test(self, name: str, config: Path, weights: Path) -> dict:
        root = str(self.data).rstrip("/") + "/"
        options = [f"test_dataloader.dataset.data_root={root}", f"test_evaluator.data_root={root}",
                   f"test_evaluator.ann_file={root}nuscenes_infos_val.pkl"]
        if self._table_version() != "v1.0-trainval":  # synthetic data written with mini tables
            options.append(f"test_dataloader.dataset.metainfo.version={self._table_version()}")
        log = self.sh(f"test_{name}", [*self.launch("tools/test.py"), str(config), str(weights),
                                       "--work-dir", str(self.work / f"test_{name}"), "--cfg-options", *options],
                      tool=True, capture=True)
        metrics = {k: float(v) for k, v in METRIC.findall(log)}
        print(f"[nuscenes]   {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        return metrics

    def _table_version(self) -> str:
        return next((v for v in ("v1.0-trainval", "v1.0-mini") if (self.data / v).is_dir()), "v1.0-trainval")

    def launch(self, script: str) -> list[str]:
        """python SCRIPT, or torchrun over --gpus processes (then with --launcher pytorch)."""
        if self.args.gpus > 1:
            return ["torchrun", f"--nproc_per_node={self.args.gpus}", script, "--launcher", "pytorch"]
        return [sys.executable, script]

    def bevcache(self, command: str, *args) -> None:
        argv = [command, *map(str, args)]
        if self.args.gpus > 1:
            cmd = ["torchrun", f"--nproc_per_node={self.args.gpus}", "-m", "bevcache.cli", *argv, "--launcher", "pytorch"]
        else:
            cmd = [sys.executable, "-m", "bevcache.cli", *argv]
        self.sh(command, cmd)

    def sh(self, name: str, cmd: list[str], *, tool: bool = False, check: bool = True, capture: bool = False):
        """Run cmd (a checkout `tool`: from the checkout), logging everything to WORK/logs/NAME.log and
        echoing progress lines."""
        cwd, env = (self.checkout, self.tools_env) if tool else (REPO, self.env)
        print(("$ cd $MMDET3D_ROOT && " if tool else "$ ") + " ".join(map(str, cmd)), flush=True)
        log_file = self.work / "logs" / f"{name}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as fh:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                fh.write(line)
                if any(key in line for key in PROGRESS):
                    print("   " + _shorten(line.rstrip()), flush=True)
            proc.wait()
        if proc.returncode and check:
            tail = log_file.read_text().splitlines()[-30:]
            sys.exit(f"{name} failed (exit {proc.returncode}), last lines of {log_file}:\n" + "\n".join(tail))
        return log_file.read_text() if capture else proc.returncode


def checkout() -> Path:
    root = os.environ.get("MMDET3D_ROOT") or str(REPO.parent / "mmdetection3d")
    if not (Path(root) / "projects" / "BEVFusion").is_dir():
        sys.exit(f"no mmdetection3d checkout at {root}: clone mmdetection3d v1.4.0 and export MMDET3D_ROOT=/path/to/it")
    return Path(root).resolve()


def random_teacher(config: str, out: str) -> None:
    """--dry-run's stand-in for the released weights: a seeded random BEVFusion-L (BN statistics perturbed)."""
    import copy

    import torch
    from mmdet3d.registry import MODELS

    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(load_config(config).model))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    # state_dict() keeps its _metadata (spconv's weight layout version) through torch.save
    torch.save({"state_dict": model.state_dict(), "meta": {"dry_run": "random init, seed 0"}}, out)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--_random-teacher":
        random_teacher(sys.argv[2], sys.argv[3])
    else:
        main()
