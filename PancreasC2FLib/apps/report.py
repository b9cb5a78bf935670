"""The per-case report (JSON): provenance, parameters, timings, region, measurements, flags and
the quality flag (processing/quality.py; None for a coarse-only run, which has no final mask)."""

from __future__ import annotations

import datetime as _dt
import platform

import torch

from ..processing.geometry import box_corners_physical, box_to_ijk
from ..pipelines.base import Case, Pipeline, Region, Result
from ..processing.quality import assess
from ..io.jsonable import jsonable


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def region_description(pipeline: Pipeline, case: Case, region: Region) -> dict:
    corners = box_corners_physical(case.image, case.orientation, region.box)
    roi = pipeline.roi_for(case, region)["markups"][0]
    return {
        "source": region.source,
        "box_ijk": box_to_ijk(case.image, case.orientation, region.box),  # [[i0, i1], [j0, j1], [k0, k1]), end exclusive
        "box_lps_min_mm": [round(float(v), 3) for v in corners.min(axis=0)],
        "box_lps_max_mm": [round(float(v), 3) for v in corners.max(axis=0)],
        "roi_center_lps_mm": [round(v, 3) for v in roi["center"]],
        "roi_size_mm": [round(v, 3) for v in roi["size"]],
    }


def build_report(pipeline: Pipeline, case: Case, region: Region, result: Result | None, input_desc: str, extra: dict | None = None) -> dict:
    report = {
        "input": input_desc,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **pipeline.provenance(),
        "device": device_description(pipeline.device),
        "torch": torch.__version__,
        "input_geometry": {
            "size": list(case.image.GetSize()),
            "spacing": [round(v, 6) for v in case.image.GetSpacing()],
            "origin": [round(v, 6) for v in case.image.GetOrigin()],
            "direction": [round(v, 6) for v in case.image.GetDirection()],
        },
        "region": region_description(pipeline, case, region),
        "timings_s": dict(region.timings if result is None else result.timings),
        "warnings": list(dict.fromkeys(case.warnings + region.warnings + ([] if result is None else result.warnings))),
    }
    if result is not None:
        report.update(
            {
                "pancreas_volume_ml": result.statistics["volume_ml"],
                "pancreas_mean_hu": result.statistics["mean_hu"],
                "pancreas_voxels": result.statistics["voxels"],
                "touches_region_border": result.flags["touches_box"],
                "touches_image_border": result.flags["touches_image_border"],
                "empty": result.flags["empty"],
                **assess(result),
            }
        )
    else:
        report.update({"quality": None, "quality_reasons": [], "stage_agreement_dsc": None, "components": None, "largest_component_fraction": None, "member_agreement_dsc": None})
    if extra:
        report.update(extra)
    return jsonable(report)
