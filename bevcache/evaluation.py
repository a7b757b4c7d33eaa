"""`SafeNuScenesMetric`: mmdet3d's NuScenesMetric that scores an empty prediction set as 0.

With zero predicted boxes over the whole split (an untrained model) nuscenes-devkit crashes
in `filter_eval_boxes` with `Invalid box type: None`; this subclass returns the parent's keys
with the values the devkit gives a detector that finds nothing, and logs a warning.
"""

from __future__ import annotations

import logging

import mmengine
from mmdet3d.evaluation.metrics import NuScenesMetric
from mmdet3d.registry import METRICS
from mmengine.logging import print_log

# TP errors the devkit reports as NaN for these classes (nuscenes/eval/detection/evaluate.py).
_NAN_TP = {
    "traffic_cone": ("attr_err", "vel_err", "orient_err"),
    "barrier": ("attr_err", "vel_err"),
}


@METRICS.register_module()
class SafeNuScenesMetric(NuScenesMetric):
    """NuScenesMetric that returns mAP = NDS = 0 instead of crashing when nothing was predicted."""

    def _evaluate_single(
        self,
        result_path: str,
        classes: list[str] | None = None,
        result_name: str = "pred_instances_3d",
    ) -> dict[str, float]:
        """Score one result file; an empty one gets the devkit's no-detection values."""
        if any(mmengine.load(result_path)["results"].values()):
            return super()._evaluate_single(result_path, classes=classes, result_name=result_name)
        print_log(
            f"SafeNuScenesMetric: no predicted boxes in any sample for {result_name!r}; "
            "reporting mAP = NDS = 0 (nuscenes-devkit cannot evaluate an empty prediction set)",
            logger="current",
            level=logging.WARNING,
        )
        return self._no_detection_metrics(classes or self.dataset_meta["classes"], result_name)

    def _no_detection_metrics(self, classes: list[str], result_name: str) -> dict[str, float]:
        """The keys `_evaluate_single` produces, valued as the devkit values a detector with no boxes."""
        prefix = f"{result_name}_NuScenes"
        detail: dict[str, float] = {}
        for name in classes:
            for dist in self.eval_detection_configs.dist_ths:
                detail[f"{prefix}/{name}_AP_dist_{float(dist)}"] = 0.0
            for err in self.ErrNameMapping:
                detail[f"{prefix}/{name}_{err}"] = (
                    float("nan") if err in _NAN_TP.get(name, ()) else 1.0
                )
        for short in self.ErrNameMapping.values():
            detail[f"{prefix}/{short}"] = 1.0
        detail[f"{prefix}/NDS"] = 0.0
        detail[f"{prefix}/mAP"] = 0.0
        return detail
