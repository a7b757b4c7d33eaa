"""A held-out split carved from train, for choosing settings without ever looking at val.

The nuScenes devkit scores the samples of the scenes whose *names* are in its val split, so the
held-out split is made at the data-root level: `<out>/tune/data` links the root's points, images and
tables, except that
- a fixed-seed `fraction` of the train *scenes* (samples of one scene are correlated: a scene is
  held out whole) become its val split: `nuscenes_infos_val.pkl`, their scenes renamed to the
  devkit's val names in `scene.json`;
- the remaining train scenes are its `nuscenes_infos_train.pkl` (`sample_idx` renumbered: a store
  row is a dataset index);
- the real val scenes are renamed to a train name: the devkit never scores them, and no info
  file lists them.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

VERSIONS = ("v1.0-mini", "v1.0-trainval")
LINKED = ("samples", "sweeps", "maps")


def make_heldout_root(data: Path, out: Path, fraction: float, seed: int = 0) -> dict:
    """Write the held-out root at `out` (idempotent for the same inputs); returns its summary."""
    summary_file = out / "heldout.json"
    want = {"data": str(data), "fraction": fraction, "seed": seed}
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if {k: summary.get(k) for k in want} == want:
            return summary
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    version = next(v for v in VERSIONS if (data / v / "scene.json").is_file())
    scenes = json.loads((data / version / "scene.json").read_text())
    scene_of = {s["token"]: s["scene_token"] for s in json.loads((data / version / "sample.json").read_text())}
    with open(data / "nuscenes_infos_train.pkl", "rb") as fh:
        train = pickle.load(fh)
    with open(data / "nuscenes_infos_val.pkl", "rb") as fh:
        val = pickle.load(fh)
    train_scenes = sorted({scene_of[i["token"]] for i in train["data_list"]})
    val_scenes = {scene_of[i["token"]] for i in val["data_list"]}
    n_held = max(1, round(fraction * len(train_scenes)))
    if n_held >= len(train_scenes):
        raise ValueError(f"holding out {n_held} of {len(train_scenes)} train scenes leaves nothing to train on")
    held = set(random.Random(seed).sample(train_scenes, n_held))
    by_token = {s["token"]: s for s in scenes}
    val_names = sorted({by_token[t]["name"] for t in val_scenes})
    train_name = next(by_token[t]["name"] for t in train_scenes if t not in held)
    renamed = {t: val_names[i % len(val_names)] for i, t in enumerate(sorted(held))}
    renamed.update({t: train_name for t in val_scenes})
    for v in VERSIONS:
        if not (data / v).is_dir():
            continue
        (out / v).mkdir()
        for table in (data / v).iterdir():
            if table.name != "scene.json":
                (out / v / table.name).symlink_to(table.resolve())
        rows = json.loads((data / v / "scene.json").read_text())
        for row in rows:
            row["name"] = renamed.get(row["token"], row["name"])
        (out / v / "scene.json").write_text(json.dumps(rows, indent=1))
    for name in LINKED:
        if (data / name).exists():
            (out / name).symlink_to((data / name).resolve())
    splits = {"train": [i for i in train["data_list"] if scene_of[i["token"]] not in held],
              "val": [i for i in train["data_list"] if scene_of[i["token"]] in held]}
    for split, infos in splits.items():
        infos = [dict(info, sample_idx=k) for k, info in enumerate(infos)]
        with open(out / f"nuscenes_infos_{split}.pkl", "wb") as fh:
            pickle.dump({"metainfo": train["metainfo"], "data_list": infos}, fh)
    summary = {**want, "fit_samples": len(splits["train"]), "heldout_samples": len(splits["val"]),
               "fit_scenes": len(train_scenes) - n_held, "heldout_scenes": n_held}
    summary_file.write_text(json.dumps(summary, indent=2))
    return summary
