"""A per-case quality flag: ``ok`` or ``review``, the reasons, and two scores.

Cheap by design: it only looks at masks the run already has (no extra network pass). A case is
``review`` when any of these holds (each reason is a short phrase, for the CSV and the GUI):

- the mask is empty;
- the mask touches the border of the region the second stage ran in (it may be cut off), or the
  image border (the organ may extend outside the field of view) - the pipeline's own flags;
- its volume is outside ``VOLUME_RANGE_ML``;
- the first stage's mask and the final mask disagree inside the region: Dice below
  ``MIN_STAGE_DSC`` (score ``stage_agreement_dsc``; absent where the pipeline has no independent
  first-stage mask: a user ROI without a first-stage result, or Fang's single network, whose
  "first stage" *is* the final mask);
- the mask is fragmented: its largest connected component holds less than
  ``MIN_LARGEST_FRACTION`` of the voxels (score ``largest_component_fraction``);
- an ensemble's members disagree: the Dice of their thresholded maps, pooled over member pairs,
  below ``MIN_MEMBER_DSC`` (score ``member_agreement_dsc``, from ``MemberAgreement``; absent for
  a single model). Compared on the last stage where the members work independently: the final
  stage, except RSTN's coarse maps (its fine rounds all refine one shared mask). Runs of one
  recipe with other seeds agree on the cases they were trained for and fall apart where the input
  is unlike them, so this is a label-free warning of domain shift (docs/pipelines_table.md,
  round 10).

What each pipeline's region holds (``Region.coarse_mask``, canonical, full resolution):
resdsn-c2f P^C; roth-cascade the stage-1 labels (kept for an ROI run after a first-stage run);
zhao-two-stage the upsampled stage-1 mask (one of the three voters); yu-rstn the thresholded
three-view coarse map; fang-ggpfn the final mask itself (``extra["end_to_end"]``: no score). A
region from a user ROI has none, except Roth's (see above).
"""

from __future__ import annotations

import numpy as np

import itertools

from .geometry import box_slices, mask_box
from .postprocess import component_sizes, dice

# Adult pancreas volume on CT: Saisho et al., Clin. Anat. 2007;20:933-942, report a plateau of
# about 70 mL in adults that falls with age. 20-200 mL is deliberately wide (atrophy, pancreatitis,
# tumours): a value outside it is more likely a segmentation error than anatomy.
VOLUME_RANGE_ML = (20.0, 200.0)
# The two stages see the same organ; a good case agrees far above this. Below it they disagree on
# more voxels than they share: one of them is wrong (a heuristic threshold, not from a paper).
MIN_STAGE_DSC = 0.5
# Members of one recipe see the same organ; as for the stages, below this they disagree on more
# voxels than they share.
MIN_MEMBER_DSC = 0.5
# The pancreas is one organ. Papers' island removal drops components under 20% of the mask
# (Zhu et al. 2018); more than 20% outside the main piece suggests stray or split findings.
MIN_LARGEST_FRACTION = 0.8

REVIEW = "review"
OK = "ok"


def first_stage_mask(region) -> np.ndarray | None:
    """The first stage's own mask on the canonical grid, or None where the pipeline has no
    independent one (a user ROI; an end-to-end network whose region mask is the result)."""
    if region is None or region.coarse_mask is None or region.extra.get("end_to_end"):
        return None
    return region.coarse_mask


def stage_agreement(mask: np.ndarray, first: np.ndarray | None, box) -> float | None:
    """Dice of the first-stage and final masks inside ``box`` (where the second stage ran)."""
    if first is None or first.shape != mask.shape:
        return None
    s = box_slices(box)
    return round(float(dice(first[s], mask[s])), 4)


class MemberAgreement:
    """How far an ensemble's members agree: the Dice of their masks (each
    member's probability >= ``threshold``), pooled over member pairs and over every part the stage
    runs on (``add`` once per part: Zhao's two boxes, say). Pipelines fill it when asked;
    ``dsc()`` is None until two members were compared on a part where any marks something."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = float(threshold)
        self.shared = 0  # sum over pairs of 2 |A n B|
        self.total = 0  # sum over pairs of |A| + |B|

    def add(self, probabilities: list) -> None:
        masks = [np.asarray(p) >= self.threshold for p in probabilities]
        sizes = [int(np.count_nonzero(m)) for m in masks]
        for (a, na), (b, nb) in itertools.combinations(zip(masks, sizes), 2):
            self.shared += 2 * int(np.count_nonzero(a & b))
            self.total += na + nb

    def dsc(self) -> float | None:
        return round(self.shared / self.total, 4) if self.total else None


def components(mask: np.ndarray) -> tuple[int, float | None]:
    """Number of connected components (26-connectivity) and the largest one's voxel fraction;
    labelled only inside the mask's bounding box (cheap on a full CT)."""
    box = mask_box(mask)
    if box is None:
        return 0, None
    _, sizes = component_sizes(mask[box_slices(box)])
    return len(sizes), round(float(sizes.max() / sizes.sum()), 4)


def assess(result) -> dict:
    """The quality entry of a ``pipeline.Result``: ``quality`` (ok/review), ``quality_reasons``
    (short phrases), ``stage_agreement_dsc`` (None when absent), ``components`` and
    ``largest_component_fraction`` (None for an empty mask), ``member_agreement_dsc`` (None for a
    single model)."""
    mask = result.mask
    region = result.region
    flags = result.flags
    reasons = []
    n, largest = components(mask)
    dsc = stage_agreement(mask, first_stage_mask(region), region.box) if region is not None else None
    members = region.extra.get("member_agreement_dsc") if region is not None else None
    if n == 0:
        reasons.append("empty mask")
    if flags.get("touches_box"):
        reasons.append("touches the region border")
    if flags.get("touches_image_border"):
        reasons.append("touches the image border")
    volume = result.statistics.get("volume_ml")
    lo, hi = VOLUME_RANGE_ML
    if n and volume is not None and not lo <= volume <= hi:
        reasons.append(f"volume {_digits(volume, lo, hi)} mL outside {lo:g}-{hi:g} mL")
    if n and dsc is not None and dsc < MIN_STAGE_DSC:
        reasons.append(f"stages disagree (Dice {dsc:.2f})")
    if largest is not None and largest < MIN_LARGEST_FRACTION:
        reasons.append(f"fragmented ({n} pieces, largest {largest:.0%})")
    if members is not None and members < MIN_MEMBER_DSC:
        reasons.append(f"ensemble members disagree (Dice {members:.2f})")
    return {
        "quality": REVIEW if reasons else OK,
        "quality_reasons": reasons,
        "stage_agreement_dsc": dsc,
        "components": n,
        "largest_component_fraction": largest,
        "member_agreement_dsc": members,
    }


def summary_line(quality: dict) -> str:
    """One line for a person: ``Quality: ok`` or ``Quality: review (reason; reason)``."""
    reasons = quality.get("quality_reasons") or []
    text = f"Quality: {quality.get('quality')}"
    return f"{text} ({'; '.join(reasons)})" if reasons else text


def _digits(volume: float, lo: float, hi: float) -> str:
    """The volume with enough decimals that it visibly lies outside [lo, hi] (19.95, not 20.0)."""
    for d in range(1, 6):
        text = f"{volume:.{d}f}"
        if not lo <= float(text) <= hi:
            return text
    return f"{volume:g}"
