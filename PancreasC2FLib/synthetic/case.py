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

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case: ``image`` (int16 HU) and ``label`` (uint8, 1 = pancreas) share geometry."""

    image: sitk.Image
    label: sitk.Image
    params: dict[str, Any]


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
                  center_on_pancreas: bool = False) -> SyntheticCase:
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
    """
    rng = np.random.default_rng(seed)
    p: dict[str, Any] = {"seed": int(seed), "generator_version": GENERATOR_VERSION}

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
    if spacing is None:
        xy = xy_spacing_draw
        if fit_fov:  # radiographers fit the reconstruction FOV to the patient
            xy = float(np.clip(max(xy, (body_width + 90.0) / 512), 0.6, 1.0))
        spacing = (xy, xy, z_spacing_draw)
    spacing_a = np.asarray(spacing, float)
    center = np.array([fov_offset[0], fov_offset[1], 0.0])
    z_top_src = min(src.z_marks["liver_top"] + top_margin, src.z_marks["data_top"] - 5.0)
    if upper_only:
        z_bot_src = src.z_marks["pancreas_bottom"] - 30.0 - 50.0 * bottom_u
    else:
        z_bot_src = src.z_marks["iliac_crest"] - 20.0 + bottom_u * (
            src.z_marks["hip_bottom"] - src.z_marks["iliac_crest"])
    z_bot_src = max(z_bot_src, src.z_marks["data_bottom"] + 5.0)
    zz = to_output(np.array([[*src.body_center[:2], z_top_src],
                             [*src.body_center[:2], z_bot_src]]))[:, 2]
    if size is None:
        nz = int(round(abs(zz[0] - zz[1]) / spacing_a[2])) + 1
        size = (512, 512, nz)
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
                            phase_name, phase_t, thickness, p)

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
    return SyntheticCase(image, label, _jsonable(p))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


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
