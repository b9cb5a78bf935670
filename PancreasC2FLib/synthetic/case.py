"""SynthSeg-style synthetic abdominal CT with a pancreas label.

Why: no CT images can be shipped, but two real multi-organ label maps can (TotalSegmentator
subjects s0327 and s0328, CC BY 4.0, see ``data/labelmaps/ATTRIBUTION.md``). Every case draws
a new patient and scanner from them, as SynthSeg does for MRI (Billot et al., MedIA 2023):

1. anatomy: random affine (scale +-15 %, rotation a few degrees) + smooth elastic field (a few
   mm up to ~10 mm), applied to the label map with nearest-neighbour resampling;
2. body: the maps leave fat, abdominal wall, skin and air unlabelled, so a hull of all labelled
   structures (closing + per-slice hole filling, cached per anatomy) is grown by a sampled
   muscle wall (6-18 mm) and subcutaneous fat (5-35 mm, thinner at the back); the back is
   flattened on a patient table in most cases;
3. intensities: Hounsfield units per tissue sampled by contrast phase (non-contrast, arterial,
   portal-venous or in between), with cortical/trabecular bone, renal cortex/medulla, bowel wall,
   bowel content (fluid, positive oral contrast, faeces, gas pockets, air-fluid levels), fatty
   pancreas, hepatic and pulmonary vessels, mesenteric vessels and unlabelled bowel loops in the
   fat, and smooth texture fields so that intensity alone does not identify the pancreas;
4. scanner: everything is built in physical (LPS) space and resampled onto the output grid
   (LPS, RAS or slightly oblique direction, realistic non-zero origin, 512 x 512 in-plane at
   0.6-1.0 mm, slices 0.6-5 mm), with a Gaussian PSF (slice thickness along z), correlated and
   white noise (5-30 HU), an optional circular reconstruction field of view, int16 output.

Intensities are rendered on a 1.5 mm "work" grid that shares the output direction and field of
view, then linearly resampled; the label is a 0.5 iso-contour of the linearly resampled work
pancreas so that it matches the image's edges at any output spacing.

Timings (2-core VM shared with other jobs, load ~6; ``time.time()`` around one call, anatomy cache
warm; building the cache costs ~2.3 s per anatomy, once per process):

* ``generate_small_case`` (96 x 96 x 64 at 2 mm): 0.6-0.9 s
* 1.5 mm isotropic, 128^3 centred on the pancreas: ~1 s; whole FOV 272 x 272 x 240: ~7 s
* 512 x 512 x 157 (0.8 mm, 1.25 mm slices): ~6 s; x 283: ~10-14 s
* 512 x 512 x 314 (0.7 mm, 0.625 mm slices): ~9 s; x 565: ~15 s
  (cost is about proportional to the voxels of the 1.5 mm work grid plus those of the output)

Reproducible: the same arguments give bit-identical arrays (one ``numpy.random.default_rng``
stream drawn in a fixed order whatever the arguments; SimpleITK filters are deterministic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from .acquisition import ORIENTATIONS, _WORK_SPACING, _centred_grid, _fit_center, _label_on_grid, _rot, _smooth_field
from .anatomy import ANATOMIES, _load_source
from .intensities import _HU_MAX, _HU_MIN, _resolve_phase
from .render import _render
from ..io.jsonable import jsonable

GENERATOR_VERSION = 2
GENERATOR_VERSIONS = (1, 2, 3)


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case: ``image`` (int16 HU) and ``label`` (uint8, 1 = pancreas) share geometry."""

    image: sitk.Image
    label: sitk.Image
    params: dict[str, Any]
    labels: sitk.Image | None = None  # with_labels=True: the source structures (TotalSegmentator ids)


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------
def generate_small_case(seed: int, spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
                        size: tuple[int, int, int] = (96, 96, 64), **kwargs: Any) -> SyntheticCase:
    """A small case for unit tests: FOV centred on the pancreas (whole pancreas inside at 2 mm)."""
    return generate_case(seed, spacing=spacing, size=size, center_on_pancreas=True, **kwargs)


def generate_case(seed: int, *, anatomy: str | None = None,
                  spacing: tuple[float, float, float] | None = None,
                  size: tuple[int, int, int] | None = None,
                  phase: str | float | None = None,
                  orientation: str | None = None,
                  deform: bool = True,
                  center_on_pancreas: bool = False,
                  version: int = GENERATOR_VERSION,
                  with_labels: bool = False) -> SyntheticCase:
    """Generate one synthetic abdominal CT with its pancreas label.

    anatomy: "s0327" | "s0328" | None (drawn from the seed).
    spacing: output (x, y, z) mm; None draws a realistic one (in-plane 0.6-1.0 mm, slices
        0.625-5 mm).
    size: output (x, y, z) voxels; None gives 512 x 512 and a z extent from about the liver dome
        (with some lung base) down to somewhere between the lower pancreas and the pelvis.
    phase: "non-contrast" | "arterial" | "portal-venous" | float 0..1 (non-contrast -> portal
        venous) | None (drawn).
    orientation: "LPS" | "RAS" | "oblique" (LPS or RAS rotated 2-10 degrees about z) | None.
    deform: random affine + elastic deformation of the anatomy (off: only a translation).
    center_on_pancreas: centre the FOV on the pancreas bounding box instead of the scanner
        isocentre (z: a realistic abdominal range). Either way the FOV is shifted as little as
        possible to keep the whole pancreas inside when it fits.
    version: 2 (default) adds the real-CT realism draws of ``realism_draws`` on top of version
        1's, from a separate random stream: version 1 cases stay bit-identical. 3 adds
        ``atrophy_draws`` (smaller, atrophic pancreases) the same way.
    with_labels: also return every source structure on the output grid (``labels``, uint8
        TotalSegmentator ids, nearest neighbour): what ``python -m Training realism`` measures.
    """
    if version not in GENERATOR_VERSIONS:
        raise ValueError(f"version must be one of {GENERATOR_VERSIONS}, got {version!r}")
    rng = np.random.default_rng(seed)
    p: dict[str, Any] = {"seed": int(seed), "generator_version": int(version)}
    v2 = realism_draws(seed) if version >= 2 else None
    if version >= 3:
        v2 = {**v2, **atrophy_draws(seed)}

    # ---- draws (fixed order, independent of the arguments, so e.g. LPS and RAS share anatomy)
    anat_draw = rng.integers(len(ANATOMIES))
    phase_draw = (float(rng.random()), float(rng.random()))
    orient_draw = float(rng.random())
    oblique_base = "LPS" if rng.random() < 0.6 else "RAS"
    oblique_deg = float(rng.uniform(2.0, 10.0) * rng.choice([-1.0, 1.0]))
    xy_spacing_draw = float(rng.uniform(0.6, 1.0))
    z_spacings = [0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]
    z_spacing_draw = float(rng.choice(z_spacings, p=[.08, .08, .14, .12, .1, .12, .1, .12, .14]))
    fit_fov = bool(rng.random() < 0.85)
    thick_factor = float(rng.uniform(1.0, 1.5)) if rng.random() < 0.3 else 1.0
    # output -> source scale: < 1 enlarges the anatomy (the two sources have small pancreases,
    # ~57 mL, so enlargement is favoured: volumes ~40-95 mL)
    scale = np.exp(rng.uniform(-0.12, 0.08)) * np.exp(rng.uniform(-0.05, 0.05, 3))
    angles = np.deg2rad([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-6, 6)])
    el_amp = float(rng.uniform(1.0, 3.0))
    el_scale = float(rng.uniform(25.0, 45.0))
    el_seed = int(rng.integers(2**31))
    c_out = np.array([rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-450, 150)])
    fov_offset = np.array([rng.uniform(-15, 15), rng.uniform(-15, 15), 0.0])
    top_margin = float(rng.uniform(0.0, 40.0))
    upper_only = bool(rng.random() < 0.3)
    bottom_u = float(rng.random())
    z_pos_u = float(rng.random())
    render_seed = int(rng.integers(2**31))

    anatomy = anatomy if anatomy is not None else ANATOMIES[int(anat_draw)]
    src = _load_source(anatomy)
    phase_name, phase_t = _resolve_phase(phase, phase_draw)
    if orientation is None:
        orientation = "LPS" if orient_draw < 0.45 else "RAS" if orient_draw < 0.8 else "oblique"
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS} or None")
    base = oblique_base if orientation == "oblique" else orientation
    direction = np.diag([-1.0, -1.0, 1.0]) if base == "RAS" else np.eye(3)
    if orientation == "oblique":
        direction = _rot(2, math.radians(oblique_deg)) @ direction
    p.update(anatomy=anatomy, phase=phase_name, phase_value=phase_t, orientation=orientation,
             oblique_angle_deg=oblique_deg if orientation == "oblique" else 0.0)

    # ---- anatomy transform: output point p -> source point A(p + e(p))
    if not deform:
        scale, angles, el_amp = np.ones(3), np.zeros(3), 0.0
    m = _rot(2, angles[2]) @ _rot(1, angles[1]) @ _rot(0, angles[0]) @ np.diag(scale)
    aff = sitk.AffineTransform(3)
    aff.SetMatrix([float(v) for v in m.ravel()])
    aff.SetCenter([float(v) for v in c_out])
    aff.SetTranslation([float(v) for v in src.body_center - c_out])
    m_inv = np.linalg.inv(m)

    def to_output(q: np.ndarray) -> np.ndarray:
        """Source points -> output points (affine inverse, elastic by fixed-point iteration)."""
        r = c_out + (q - src.body_center) @ m_inv.T
        if elastic is None:
            return r
        pts = r.copy()
        for _ in range(4):
            disp = np.array([np.subtract(elastic.TransformPoint(tuple(map(float, v))), v)
                             for v in pts])
            pts = r - disp
        return pts

    # elastic field on a 10 mm grid around the anatomy (output space)
    elastic: sitk.DisplacementFieldTransform | None = None
    z_lo = to_output(np.array([[*src.body_center[:2], src.z_marks["data_bottom"] - 60]]))[0, 2]
    z_hi = to_output(np.array([[*src.body_center[:2], src.z_marks["data_top"] + 60]]))[0, 2]
    if el_amp > 0:
        erng = np.random.default_rng(el_seed)
        fld = sitk.Image([80, 80, int((z_hi - z_lo) / 10) + 2], sitk.sitkFloat32)
        fld.SetSpacing([10.0] * 3)
        fld.SetOrigin([c_out[0] - 395.0, c_out[1] - 395.0, z_lo])
        comps = [_smooth_field(erng, fld.GetSize()[::-1], 10.0, el_scale) * el_amp
                 for _ in range(3)]
        vec = sitk.GetImageFromArray(np.stack(comps, -1).astype(np.float64), isVector=True)
        vec.CopyInformation(fld)
        elastic = sitk.DisplacementFieldTransform(vec)
        transform = sitk.CompositeTransform([aff, elastic])
    else:
        transform = sitk.CompositeTransform([aff])
    p.update(scale=scale.tolist(), rotation_deg=np.rad2deg(angles).tolist(),
             elastic_amplitude_mm=el_amp, elastic_scale_mm=el_scale, patient_center=c_out.tolist())

    # ---- output geometry
    panc_out = to_output(src.pancreas_points)
    body_width = src.body_width / float(np.mean(scale[:2]))
    n_xy = 512
    if spacing is None:
        xy = xy_spacing_draw
        if fit_fov:  # radiographers fit the reconstruction FOV to the patient
            xy = float(np.clip(max(xy, (body_width + 90.0) / 512), 0.6, 1.0))
        spacing = (xy, xy, z_spacing_draw)
        if v2 is not None and v2["archive_xy"] is not None:
            # a scan resampled for an archive or a dataset (TotalSegmentator's 1.5 / 3 mm):
            # coarse pixels, slices no finer than them, the grid fitted to the body
            xy = v2["archive_xy"]
            spacing = (xy, xy, max(xy, v2["archive_z"]))
            n_xy = int(min(512, math.ceil((body_width + v2["archive_margin_mm"]) / xy)))
    spacing_a = np.asarray(spacing, float)
    center = np.array([fov_offset[0], fov_offset[1], 0.0])
    z_top_src = min(src.z_marks["liver_top"] + top_margin, src.z_marks["data_top"] - 5.0)
    if v2 is not None:  # fields of view from the lower chest to anywhere down to the thighs
        z_top_src = min(src.z_marks["liver_top"] + v2["top_margin_mm"], src.z_marks["data_top"] - 5.0)
        upper_only = v2["fov"] == "upper-abdomen"
    if upper_only:
        z_bot_src = src.z_marks["pancreas_bottom"] - 30.0 - 50.0 * bottom_u
    elif v2 is not None and v2["fov"] == "abdomen-pelvis":
        z_bot_src = src.z_marks["hip_bottom"] - 60.0 * bottom_u
    else:
        z_bot_src = src.z_marks["iliac_crest"] - 20.0 + bottom_u * (
            src.z_marks["hip_bottom"] - src.z_marks["iliac_crest"])
    z_bot_src = max(z_bot_src, src.z_marks["data_bottom"] + 5.0)
    zz = to_output(np.array([[*src.body_center[:2], z_top_src],
                             [*src.body_center[:2], z_bot_src]]))[:, 2]
    if size is None:
        nz = int(round(abs(zz[0] - zz[1]) / spacing_a[2])) + 1
        size = (n_xy, n_xy, nz)
        center[2] = zz.mean()
    else:
        extent_z = (size[2] - 1) * spacing_a[2]
        pz = panc_out[:, 2]
        slack = max(0.0, extent_z - (pz.max() - pz.min()))
        center[2] = (pz.max() + pz.min()) / 2 + (z_pos_u - 0.5) * slack
    if center_on_pancreas:
        center = (panc_out.min(axis=0) + panc_out.max(axis=0)) / 2.0
    size_a = np.asarray(size, int)
    extent = (size_a - 1) * spacing_a
    center = _fit_center(center, extent - 2 * spacing_a, direction, panc_out)
    out_grid = _centred_grid(center, size_a, spacing_a, direction)
    thickness = float(min(spacing_a[2] * thick_factor, 5.0))
    p.update(spacing=[float(s) for s in spacing_a], size=[int(s) for s in size_a],
             origin=list(out_grid.origin), direction=[float(v) for v in direction.ravel()],
             slice_thickness=thickness, center_on_pancreas=bool(center_on_pancreas))

    # ---- render on the work grid (same direction and FOV, 1.5 mm)
    ws = _WORK_SPACING
    # thick slices: a coarser work grid along z still resolves the slice profile (sigma_z / 2)
    work_sp = np.array([ws, ws, min(max(thickness / 2.0, ws), 2.5)])
    # bake affine + elastic into one displacement field over the work FOV (4.5 mm): resampling
    # through it is ~25 % cheaper than through the composite transform
    fstep = 3 * ws
    fsize = np.ceil((size_a - 1) * spacing_a / fstep).astype(int) + 5
    fgrid = _centred_grid(center, fsize, np.full(3, fstep), direction)
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, [int(v) for v in fgrid.size],
        [float(v) for v in fgrid.origin], [float(v) for v in fgrid.spacing],
        [float(v) for v in direction.ravel()])
    transform = sitk.DisplacementFieldTransform(field)
    same_grid = bool(np.allclose(spacing_a, work_sp))  # e.g. 1.5 mm training crops: no resampling
    work_size = size_a if same_grid else np.ceil((size_a - 1) * spacing_a / work_sp).astype(int) + 3
    work = out_grid if same_grid else _centred_grid(center, work_size, work_sp, direction)
    hu, panc_work = _render(np.random.default_rng(render_seed), src, work, transform,
                            phase_name, phase_t, thickness, p, v2)

    # ---- to the output grid: PSF already applied on the work grid; noise at output resolution
    if same_grid:
        arr = hu
    else:
        hu_img = sitk.GetImageFromArray(hu)
        del hu
        work.stamp(hu_img)
        arr = sitk.GetArrayFromImage(
            out_grid.resample(hu_img, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
        del hu_img
    nrng = np.random.default_rng(render_seed + 1)
    white = p["noise_white_sigma"]
    if white > 0:
        for k0 in range(0, arr.shape[0], 32):  # chunks keep the temporary small
            chunk = arr[k0: k0 + 32]
            chunk += white * nrng.standard_normal(chunk.shape, dtype=np.float32)
    if p["circular_fov"]:  # the scanner's reconstruction circle: 512 pixels about its centre
        x, y = out_grid.xy()
        r = 256.0 * float(min(spacing_a[0], spacing_a[1]))
        arr[:, (x - fov_offset[0]) ** 2 + (y - fov_offset[1]) ** 2 > r * r] = _HU_MIN
    np.clip(arr, _HU_MIN, _HU_MAX, out=arr)
    np.rint(arr, out=arr)
    image = sitk.GetImageFromArray(arr.astype(np.int16))
    del arr
    out_grid.stamp(image)
    label = _label_on_grid(panc_work, work, out_grid)
    label.CopyInformation(image)
    labels = None
    if with_labels:
        labels = out_grid.resample(src.label, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if v2 is not None:
        p["realism"] = {k: v for k, v in v2.items() if k != "jitter"}
    return SyntheticCase(image, label, jsonable(p), labels)


def realism_draws(seed: int) -> dict[str, Any]:
    """Version 2's draws, from their own stream (version 1's draws are left as they were).

    Why each (measured with ``python -m Training realism`` against a real non-contrast CT and
    the ranges of ``data/labelmaps/README``; see Training/README.md, "Real CT"):

    * fov: real abdominal scans often run on into the pelvis and thighs (the real case: 240 mm
      below the pancreas); version 1 stopped at the hips at most;
    * archive_xy: datasets are often resampled to 1.5-3 mm pixels; version 1 drew 0.6-1.0 mm;
    * soft-tissue intensities: in real scans the tissues around the pancreas overlap far more
      than textbook ranges (pancreas -9, duodenum 10, small bowel 22, muscle 12-49 HU in the real
      case): ``compress`` pulls soft tissues towards one level, ``jitter`` moves each tissue
      independently, ``randomize`` (SynthSeg) draws every soft tissue anywhere in -40..160 HU so
      that shape and position, not intensity, identify the pancreas;
    * fatty pancreas (fatty infiltration, partial volume with thick slices) in more cases.
    """
    r = np.random.default_rng([int(seed), 2])
    fov = str(r.choice(["upper-abdomen", "abdomen", "abdomen-pelvis"], p=[0.2, 0.4, 0.4]))
    archive = bool(r.random() < 0.25)
    archive_xy = float(r.uniform(1.2, 3.0))
    archive_z = float(r.choice([1.5, 2.0, 2.5, 3.0, 5.0]))
    archive_margin = float(r.uniform(30.0, 120.0))
    compress = float(r.uniform(0.2, 0.7)) if r.random() < 0.5 else 0.0
    level = float(r.uniform(10.0, 45.0))
    jitter = r.normal(0.0, 10.0, 64)
    randomize = bool(r.random() < 0.2)
    fatty = float(r.uniform(0.1, 0.5)) if r.random() < 0.35 else 0.0
    fat_shift = float(r.uniform(0.0, 30.0))
    top_margin = float(r.uniform(-10.0, 70.0))
    return {"fov": fov, "top_margin_mm": top_margin,
            "archive_xy": archive_xy if archive else None, "archive_z": archive_z,
            "archive_margin_mm": archive_margin,
            "soft_tissue_compression": compress, "soft_tissue_level": level,
            "jitter": jitter, "randomize": randomize, "randomize_seed": int(r.integers(2**31)),
            "fatty_pancreas": fatty, "pancreas_shift": fat_shift}


def atrophy_draws(seed: int) -> dict[str, Any]:
    """Version 3's draws, from a stream of their own (versions 1 and 2 stay as they were): an
    atrophic pancreas in 40 % of the cases, keeping 35-85 % of its volume (its surface turned to
    fat). Adult pancreas volumes run from about 20 to over 100 mL, falling with age and fatty
    replacement; the two source anatomies hold 52-72 mL pancreases, which the anatomy scaling only
    moves to 40-95 mL."""
    r = np.random.default_rng([int(seed), 3])
    kept = float(r.uniform(0.35, 0.85))
    return {"pancreas_kept": kept if r.random() < 0.4 else 1.0}


# Cases of the README grid: every phase, orientation and a spread of spacings, both anatomies.
EXAMPLE_GRID_CASES: tuple[dict[str, Any], ...] = (
    dict(seed=0, anatomy="s0327", phase="non-contrast", orientation="LPS", spacing=(0.7, 0.7, 5.0)),
    dict(seed=1, anatomy="s0328", phase="arterial", orientation="RAS", spacing=(0.8, 0.8, 1.0)),
    dict(seed=2, anatomy="s0327", phase="portal-venous", orientation="oblique",
         spacing=(0.9, 0.9, 2.5)),
    dict(seed=3, anatomy="s0328", phase=0.5, orientation="LPS", spacing=(0.65, 0.65, 0.625)),
    dict(seed=4, anatomy="s0327", phase="arterial", orientation="RAS", spacing=(0.75, 0.75, 3.0)),
    dict(seed=5, anatomy="s0328", phase="portal-venous", orientation="oblique",
         spacing=(1.0, 1.0, 1.25)),
    dict(seed=6, anatomy="s0327", phase="portal-venous", orientation="RAS", spacing=(0.85, 0.85, 2.0)),
    dict(seed=7, anatomy="s0328", phase="non-contrast", orientation=None, spacing=None),
)
