"""The experiment matrix: teachers, student variants, seeds, and the pieces they are run in.

One LiDAR student (configs/tiny_student_replay.py: the tiny pillar student, pts_neck 256, with the
teachers' augmented pipeline) is distilled from three teachers, all trained on the same synthetic
data root with cameras (bicycle and motorcycle differ only in colour there):
  T1 configs/tiny_teacher.py        tiny pillar LiDAR teacher, pts_neck 512 (2x the student): the control
  T2 configs/tiny_voxel_teacher.py  privileged by capacity and resolution: 0.2 m 3D voxels through a
                                    sparse-conv encoder (BEVFusion-L's trunk) vs the student's 0.4 m
                                    pillars; it is also exactly T3's LiDAR branch, so T3 - T2 on the
                                    cue classes is what the cameras add
  T3 configs/tiny_fused_teacher.py  fused camera + LiDAR teacher: sees the colour cue
Per teacher: pooled CRD cached, spatial cached (both augmentation='auto': the store has K views, so
both replay them), and the online counterpart of the better cached one (3 seeds each). The plain
augmented student does not depend on a teacher: its runs are shared by the three.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STUDENT_CFG = "configs/tiny_student_replay.py"  # tiny_student + the teachers' augmented pipeline
CLASSES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
           "pedestrian", "traffic_cone")
CUE = ("bicycle", "motorcycle")  # LiDAR-identical in a --cameras root: only the paint differs


@dataclass(frozen=True)
class Teacher:
    key: str
    config: str
    label: str
    channels: int = 512  # pts_neck channels (online spatial distillation needs them)


TEACHERS = {
    "T1": Teacher("T1", "configs/tiny_teacher.py", "T1 pillar LiDAR teacher (control)"),
    "T2": Teacher("T2", "configs/tiny_voxel_teacher.py", "T2 voxel LiDAR teacher (capacity, 0.2 m voxels)"),
    "T3": Teacher("T3", "configs/tiny_fused_teacher.py", "T3 fused camera + LiDAR teacher"),
}
KIND_LABELS = {"plain": "plain augmented", "pooled": "pooled CRD cached (auto)",
               "spatial": "spatial cached (auto)", "online": "online counterpart"}
CACHED = ("pooled", "spatial")


@dataclass
class Run:
    """One student training run of the matrix."""

    kind: str  # plain | pooled | spatial | online
    seed: int
    teacher: str | None = None  # None for plain
    online_of: str | None = None  # for online: the cached kind it mirrors (pooled | spatial)
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.teacher + '-' if self.teacher else ''}{self.kind}-seed{self.seed}"

    @property
    def variant(self) -> str:
        """The report's row key: plain, or <teacher>-<kind>."""
        return f"{self.teacher}-{self.kind}" if self.teacher else "plain"


# Every piece in the order they must run: each depends only on pieces before it (the spatial
# variants on the tuning, an online piece on its cached piece, which picks the variant it mirrors).
PIECES = ("teacher-T1", "tune", "plain", "T1-cached", "T1-online", "teacher-T2", "T2-cached", "T2-online",
          "teacher-T3", "T3-cached", "T3-online")


def piece_runs(piece: str, seeds: int) -> list[Run]:
    """The student runs of a student piece (teacher and tune pieces have none), seed-major."""
    if piece == "plain":
        return [Run("plain", s) for s in range(seeds)]
    teacher, _, what = piece.partition("-")
    if what == "cached":
        return [Run(kind, s, teacher) for s in range(seeds) for kind in CACHED]
    if what == "online":
        return [Run("online", s, teacher) for s in range(seeds)]
    return []


def selected(run: Run, only: dict[str, str]) -> bool:
    """`--only teacher=T3,kind=online,seed=0`: keep the runs matching every given key."""
    values = {"teacher": run.teacher or "-", "kind": run.kind, "seed": str(run.seed)}
    return all(values.get(k) == v for k, v in only.items())
