"""The per-case quality flag (quality.py): each reason triggers on a hand-made case and not on a
good one; pipelines without an independent first stage have no agreement score (not an error);
the report, the batch CSV and the Slicer summary carry it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from PancreasC2FLib.apps import batch as libbatch
from PancreasC2FLib.apps.cli import main as cli_main
from PancreasC2FLib.processing.geometry import expand_box, mask_box, touches_box_border
from PancreasC2FLib.pipelines.base import Region, Result
from PancreasC2FLib.processing.postprocess import mask_statistics
from PancreasC2FLib.processing.quality import MIN_LARGEST_FRACTION, MIN_MEMBER_DSC, MIN_STAGE_DSC, VOLUME_RANGE_ML, MemberAgreement, assess, summary_line

SHAPE = (48, 56, 64)
SPACING = (2.0, 2.0, 2.0)  # 0.008 mL per voxel


def ellipsoid(center, radii, shape=SHAPE) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    (cz, cy, cx), (rz, ry, rx) = center, radii
    return (((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.uint8)


GOOD = ellipsoid((24, 28, 32), (9, 10, 15))  # about 45 mL
FIRST = ellipsoid((25, 28, 31), (9, 10, 15))  # the first stage, shifted by a voxel: Dice ~0.9


def result_for(mask, first=FIRST, box=None, spacing=SPACING, extra=None, source="coarse") -> Result:
    """A Result as ``Pipeline.finish`` builds it, for a hand-made mask."""
    shape = mask.shape
    if box is None:
        box = expand_box(mask_box(mask) or mask_box(GOOD), 10.0, spacing, shape)
    region = Region(box, source, coarse_mask=first, extra=dict(extra or {}))
    hu = np.full(shape, 40, np.int16)
    stats = mask_statistics(mask, hu, spacing)
    flags = touches_box_border(mask, box, shape)
    flags["empty"] = stats["voxels"] == 0
    return Result(None, mask, region, stats, flags, {}, [])


def test_good_case_is_ok():
    q = assess(result_for(GOOD))
    assert q["quality"] == "ok" and q["quality_reasons"] == []
    assert q["components"] == 1 and q["largest_component_fraction"] == 1.0
    assert 0.8 < q["stage_agreement_dsc"] < 1.0
    assert VOLUME_RANGE_ML[0] < mask_statistics(GOOD, GOOD, SPACING)["volume_ml"] < VOLUME_RANGE_ML[1]
    assert summary_line(q) == "Quality: ok"


def test_empty_mask():
    q = assess(result_for(np.zeros(SHAPE, np.uint8), box=((10, 30), (10, 30), (10, 30))))
    assert q["quality"] == "review" and q["quality_reasons"] == ["empty mask"]  # no volume or Dice reason on top
    assert q["components"] == 0 and q["largest_component_fraction"] is None


def test_touches_region_border():
    box = mask_box(GOOD)  # tight: the mask reaches every face of the region
    q = assess(result_for(GOOD, box=box))
    assert q["quality_reasons"] == ["touches the region border"]
    assert summary_line(q) == "Quality: review (touches the region border)"


def test_touches_image_border():
    mask = GOOD.copy()
    mask[:24, 26:30, 30:34] = 1  # a stalk down to slice 0
    q = assess(result_for(mask, first=mask))
    assert q["quality_reasons"] == ["touches the image border"]


@pytest.mark.parametrize("radii, spacing", [((3, 3, 3), SPACING), ((9, 10, 15), (3.5, 3.5, 3.5))])
def test_volume_outside_the_adult_range(radii, spacing):
    mask = ellipsoid((24, 28, 32), radii)
    r = result_for(mask, first=mask, spacing=spacing)
    volume = r.statistics["volume_ml"]
    assert not VOLUME_RANGE_ML[0] <= volume <= VOLUME_RANGE_ML[1]
    assert assess(r)["quality_reasons"] == [f"volume {volume:.1f} mL outside 20-200 mL"]


def test_stages_disagree():
    elsewhere = ellipsoid((24, 28, 20), (9, 10, 6))
    q = assess(result_for(GOOD, first=elsewhere))
    assert q["stage_agreement_dsc"] < MIN_STAGE_DSC
    assert q["quality_reasons"] == [f"stages disagree (Dice {q['stage_agreement_dsc']:.2f})"]


def test_member_agreement_pools_pairs_and_parts():
    a, b, c = (np.zeros(10) for _ in range(3))
    a[:4], b[2:6], c[:4] = 0.9, 0.8, 0.7  # a and c agree; b shares half of its voxels with each
    agreement = MemberAgreement(0.5)
    assert agreement.dsc() is None  # nothing compared yet
    agreement.add([a, b, c])
    # pairs (a, b), (a, c), (b, c): shared 2 * (2 + 4 + 2), sizes 3 * (4 + 4)
    assert agreement.dsc() == pytest.approx(16 / 24, abs=1e-4)
    agreement.add([np.zeros(5), np.zeros(5), np.zeros(5)])  # a part where no member marks anything
    assert agreement.dsc() == pytest.approx(16 / 24, abs=1e-4)
    agreement.add([np.ones(2), np.ones(2), np.zeros(2)])  # a second part: pooled, not averaged
    assert agreement.dsc() == pytest.approx((16 + 4) / (24 + 8), abs=1e-4)
    single = MemberAgreement(0.5)
    single.add([a])
    assert single.dsc() is None  # one model: nothing to agree with


@pytest.mark.parametrize("members, review", [(0.9, False), (0.4, True), (None, False)])
def test_ensemble_members_disagree(members, review):
    extra = {} if members is None else {"member_agreement_dsc": members}
    q = assess(result_for(GOOD, extra=extra))
    assert q["member_agreement_dsc"] == members
    assert (q["quality"] == "review") is review
    if review:
        assert members < MIN_MEMBER_DSC and q["quality_reasons"] == ["ensemble members disagree (Dice 0.40)"]


def test_fragmented():
    mask = GOOD | ellipsoid((24, 28, 55), (8, 8, 6))  # a second piece, ~22% of the mask, apart
    q = assess(result_for(mask, first=mask))
    assert q["components"] == 2 and q["largest_component_fraction"] < MIN_LARGEST_FRACTION
    assert q["quality_reasons"] == [f"fragmented (2 pieces, largest {q['largest_component_fraction']:.0%})"]
    speck = GOOD.copy()
    speck[24, 28, 55] = 1  # a one-voxel island alone is not a reason
    q = assess(result_for(speck, first=speck))
    assert q["quality"] == "ok" and q["components"] == 2


@pytest.mark.parametrize("first, extra, source", [(None, {}, "roi"), (GOOD, {"end_to_end": True}, "coarse")])
def test_no_independent_first_stage_means_no_score(first, extra, source):
    """A user ROI without a first-stage result, and Fang's single network (its region's mask is the
    result itself): no agreement score, no error."""
    q = assess(result_for(GOOD, first=first, extra=extra, source=source))
    assert q["stage_agreement_dsc"] is None and q["quality"] == "ok"


def test_report_and_batch_csv_have_the_quality(tmp_path, forced_bundle, phantom_file):
    report = tmp_path / "r.json"
    assert cli_main(["segment", str(phantom_file), "-o", str(tmp_path / "s.nii.gz"), "--report", str(report), "--model", str(forced_bundle), "--device", "cpu", "--quiet"]) == 0
    r = json.loads(report.read_text())
    assert r["quality"] in ("ok", "review") and isinstance(r["quality_reasons"], list)
    assert r["stage_agreement_dsc"] > 0.8 and r["components"] == 1
    # The phantom's "pancreas" is ~19 mL: below the adult range.
    assert r["quality"] == "review" and any(s.startswith("volume") for s in r["quality_reasons"])

    out = tmp_path / "batch"
    assert cli_main(["batch", "--input", str(phantom_file), "--output", str(out), "--model", str(forced_bundle), "--device", "cpu"]) == 0
    with open(out / libbatch.CSV_NAME, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    for column in ("quality", "quality_reasons", "stage_agreement_dsc", "largest_component_fraction"):
        assert column in reader.fieldnames
    assert rows[0]["quality"] == "review" and rows[0]["quality_reasons"].startswith("volume")
    assert float(rows[0]["stage_agreement_dsc"]) > 0.8 and float(rows[0]["largest_component_fraction"]) == 1.0


def test_csv_from_an_older_version_is_refused(tmp_path):
    """A table without the quality columns is never appended to (exit 4 from the CLI)."""
    from PancreasC2FLib.errors import OutputError

    path = tmp_path / libbatch.CSV_NAME
    old = [c for c in libbatch.CSV_FIELDS if not c.startswith(("quality", "stage_agreement", "largest_component"))]
    path.write_text(",".join(old) + "\n", encoding="utf-8")
    with pytest.raises(OutputError, match="adds quality, quality_reasons"):
        libbatch.BatchCSV(path).append({"case": "x", "status": "ok"})


def test_coarse_only_report_has_no_quality(tmp_path, forced_bundle, phantom_file):
    report = tmp_path / "r.json"
    assert cli_main(["segment", str(phantom_file), "--coarse-only", "--report", str(report), "--model", str(forced_bundle), "--device", "cpu", "--quiet"]) == 0
    r = json.loads(report.read_text())
    assert r["quality"] is None and r["quality_reasons"] == []

