"""Synthetic CT, rendering one case on the work grid: body layers (wall, fat, skin), the patient
table, organ details (vessels, bowel content and gas, fatty pancreas), intensities and texture,
correlated noise and the PSF."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import SimpleITK as sitk

from .acquisition import _Grid, _gauss_noise_gain, _interp, _smooth_field, _upsample2_box
from .anatomy import _CHEST_IDS, _SRC_PANCREAS, _Source, _bbox, _dilate_into, _interior, _lut_mask
from .intensities import _CONTENTS, _SOFT, _SRC_LUT, _TI, _TISSUES, _TNAMES, _phase_ranges


def _realistic_soft_tissue(mean: np.ndarray, v2: dict[str, Any]) -> None:
    """Version 2: soft-tissue means (in place) drawn anywhere (SynthSeg) or pulled towards one
    level and moved independently, as real scans overlap (see ``case.realism_draws``)."""
    soft = np.array([_TI[n] for n in _SOFT])
    if v2["randomize"]:
        mean[soft] = np.random.default_rng(v2["randomize_seed"]).uniform(-40.0, 160.0, soft.size)
        return
    c, level = v2["soft_tissue_compression"], v2["soft_tissue_level"]
    mean[soft] = level + (1.0 - c) * (mean[soft] - level) + np.asarray(v2["jitter"])[: soft.size]


def _render(rng: np.random.Generator, src: _Source, work: _Grid, transform: sitk.Transform,
            phase_name: str, phase_t: float, thickness: float,
            p: dict[str, Any], v2: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HU image (z, y, x float32, PSF applied) and pancreas mask on the work grid (``v2``: the
    version-2 realism draws of ``case.realism_draws``, applied on top of version 1's)."""
    shape = tuple(work.size[::-1])
    wsp = np.asarray(work.spacing)  # x, y, z
    # ---- case parameters (drawn in a fixed order)
    wall0 = float(rng.uniform(5.0, 14.0))
    fat0 = float(rng.uniform(5.0, 35.0))
    skin = 1.5
    table = bool(rng.random() < 0.7)
    table_curv = float(rng.uniform(0.0, 1.0 / 1200.0)) if rng.random() < 0.7 else 0.0
    table_pad = float(rng.uniform(10.0, 50.0)) if rng.random() < 0.6 else 0.0
    table_comp = float(rng.uniform(0.0, 10.0))
    table_shell = float(rng.uniform(2.0, 5.0))
    table_core = float(rng.uniform(15.0, 45.0))
    table_width = float(rng.uniform(380.0, 520.0))
    fatty = float(rng.uniform(0.1, 0.45)) if rng.random() < 0.3 else 0.0
    panc_shift = float(rng.uniform(0.0, 20.0)) if fatty > 0 else 0.0
    liver_vessels = float(rng.uniform(0.15, 0.35)) if rng.random() < 0.85 else 0.0
    lung_vessels = float(rng.uniform(0.12, 0.25))
    strands = float(rng.uniform(0.08, 0.2))
    loops = float(rng.uniform(0.05, 0.3)) if rng.random() < 0.6 else 0.0
    oral = rng.random() < 0.12
    gas = {"stomach": float(rng.uniform(0.05, 0.6)) if rng.random() < 0.7 else 0.0,
           "duodenum": float(rng.uniform(0.0, 0.4)),
           "small_bowel": float(rng.uniform(0.0, 0.2)),
           "colon": float(rng.uniform(0.1, 0.7)),
           "loop": float(rng.uniform(0.0, 0.3))}
    u_global = float(rng.random())
    psf = float(rng.uniform(0.5, 1.2))
    noise = float(np.exp(rng.uniform(math.log(5.0), math.log(30.0))))
    corr = float(rng.uniform(0.3, 1.0))
    circular = bool(rng.random() < 0.35)

    # ---- per-tissue HU and texture
    ranges = _phase_ranges(phase_name, phase_t)
    n_t = len(_TISSUES)
    mean = np.empty(n_t, np.float32)
    a_low = np.empty(n_t, np.float32)
    a_mid = np.empty(n_t, np.float32)
    hu_params: dict[str, float] = {}
    for i, (name, *_r, tex) in enumerate(_TISSUES):
        u = abs(u_global + rng.normal(0.0, 0.3))  # near a shared contrast-dose quantile,
        u = float(2.0 - u if u > 1.0 else u)        # reflected into [0, 1]
        lo, hi = ranges[i]
        mean[i] = lo + u * (hi - lo)
        a_low[i] = rng.uniform(0.5, 1.0) * tex[0]
        a_mid[i] = rng.uniform(0.5, 1.0) * tex[1]
        hu_params[name] = round(float(mean[i]), 1)
    for name in _CONTENTS:  # bowel content: mostly fluid, sometimes positive oral contrast
        if oral and name != "stomach_content" and rng.random() < 0.8:
            mean[_TI[name]] = rng.uniform(150.0, 350.0)
        hu_params[name] = round(float(mean[_TI[name]]), 1)
    if phase_name == "arterial":  # arciform / heterogeneous spleen in the arterial phase
        a_mid[_TI["spleen"]] = rng.uniform(15.0, 35.0)
    mean[_TI["pancreas"]] -= panc_shift
    if v2 is not None:
        if fatty == 0.0 and v2["fatty_pancreas"] > 0:
            fatty, panc_shift = v2["fatty_pancreas"], v2["pancreas_shift"]
            mean[_TI["pancreas"]] -= panc_shift
        _realistic_soft_tissue(mean, v2)
        hu_params.update({name: round(float(mean[i]), 1) for i, name in enumerate(_TNAMES)})
    hu_params["pancreas"] = round(float(mean[_TI["pancreas"]]), 1)
    mean[_TI["air"]] = -1000.0

    # ---- anatomy on the work and coarse grids
    lab_img = work.resample(src.label, transform, sitk.sitkNearestNeighbor, 0)
    lab = sitk.GetArrayFromImage(lab_img)
    del lab_img
    cgrid = _Grid(tuple(s // 2 + 1 for s in work.size), tuple(2 * wsp),
                  tuple(np.asarray(work.origin) + work.direction @ (0.5 * wsp)),
                  work.direction)
    # hull distances are smooth: sampled at 6 mm through the deformation, then interpolated
    c2grid = _Grid(tuple(s // 2 + 1 for s in cgrid.size), tuple(4 * wsp),
                   tuple(np.asarray(cgrid.origin) + work.direction @ wsp),
                   work.direction)
    cshape = tuple(cgrid.size[::-1])
    sdf, dist_any = _interp(np.stack([
        sitk.GetArrayFromImage(c2grid.resample(img, transform, sitk.sitkLinear, 1e4))
        for img in (src.hull_sdf, src.dist_any)]), 2, cshape)
    f_a = _smooth_field(rng, cshape, 2 * wsp, 50.0)
    f_b = _smooth_field(rng, cshape, 2 * wsp, 70.0)
    fl = _smooth_field(rng, shape, wsp, 25.0)  # organ-scale texture
    f_mid = _smooth_field(rng, cshape, 2 * wsp, 2.5)  # fine texture, lobulation, small vessels
    f_mid2 = _smooth_field(rng, cshape, 2 * wsp, 2.5)
    f_blob = _smooth_field(rng, cshape, 2 * wsp, 6.0)  # gas pockets, loops, hepatic vessels
    f_blob2 = _smooth_field(rng, cshape, 2 * wsp, 6.0)

    # body layers (mm levels, negative inside): hull SDF -> wall -> subcutaneous fat -> skin
    _, cy = cgrid.xy()
    yc = p["patient_center"][1]
    back = np.clip((cy - yc) / 80.0, 0.0, 1.0)[None]  # supine: thin wall and fat at the back
    wall_t = np.maximum(wall0 * (1.0 + 0.3 * f_a) * (1.0 - 0.75 * back), 1.5)
    fat_t = np.maximum(fat0 * (1.0 + 0.25 * f_b) * (1.0 - 0.6 * back), 2.0)
    body_level = sdf - wall_t - fat_t - skin
    # one continuous layer coordinate: < 0 visceral, [0, 1) wall, >= 1 subcutaneous
    layer = np.where(sdf < 0, sdf, np.where(sdf < wall_t, sdf / wall_t,
                                            1.0 + (sdf - wall_t) / fat_t)).astype(np.float32)
    free = dist_any > 4.0  # room for unlabelled bowel loops, away from the labelled organs
    del sdf, wall_t, fat_t, dist_any
    body_w, layer_w, fm, fm2, fb = _interp(np.stack([body_level, layer, f_mid, f_mid2, f_blob]),
                                           2, shape)
    free_w = free[np.ix_(*[np.arange(n) // 2 for n in shape])]
    del body_level, layer, f_mid, f_mid2, f_blob, free

    x2, y2 = work.xy()
    t = _SRC_LUT[lab]
    un = lab == 0
    body = body_w < 0.0
    # table: flattens the back (the patient lies on it) and shows below
    tab_hu = None
    if table:
        cols = body.any(axis=0)
        y_back = float(np.percentile(y2[cols], 99.5)) if cols.any() else yc + 150.0
        x_t = p["patient_center"][0]

        def below(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            """mm below the table's top surface (LPS: +y posterior); its sides curve up."""
            return y - (y_back - table_comp - table_curv * (x - x_t) ** 2)

        body &= ~((below(x2, y2) > 0)[None] & un)
        # layers: pad, shell, foam core, shell; 3x3 supersampled so that thin shells do not alias
        edges = np.cumsum([0.0, table_pad, table_shell, table_core, table_shell])
        layer_hu = [mean[_TI[n]] for n in ("table_pad", "table_shell", "table_core", "table_shell")]
        tab_hu = np.zeros(shape[1:], np.float32)
        d = work.direction
        for u in (-1 / 3, 0.0, 1 / 3):
            for v in (-1 / 3, 0.0, 1 / 3):
                xs = x2 + (d[0, 0] * u * wsp[0] + d[0, 1] * v * wsp[1])
                ys = y2 + (d[1, 0] * u * wsp[0] + d[1, 1] * v * wsp[1])
                dep = below(xs, ys)
                val = np.full(shape[1:], -1000.0, np.float32)
                inside = np.abs(xs - x_t) < table_width / 2
                for n, hu_n in enumerate(layer_hu):
                    val[inside & (dep >= edges[n]) & (dep < edges[n + 1])] = hu_n
                tab_hu += val / 9.0
    t[un & ~body] = _TI["air"]
    t[un & body & (body_w >= -skin)] = _TI["skin"]
    t[un & (body_w < -skin) & (layer_w >= 1)] = _TI["fat_subcut"]
    t[un & (layer_w < 1) & (layer_w >= 0)] = _TI["muscle"]  # abdominal / chest wall
    visc = un & (layer_w < 0)
    del layer_w, body_w
    # mesenteric / retroperitoneal vessels and nodes: thin tubes in the visceral fat
    tube = (np.abs(fm - 0.8) < strands) & (np.abs(fm2 + 0.8) < strands)
    t[visc & tube] = _TI["strand"]
    if loops > 0:  # bowel loops the maps leave unlabelled, away from the labelled organs
        q = np.quantile(fb[::2, ::2, ::2], 1.0 - loops)
        loop = visc & (fb > q) & free_w
        t[loop] = _TI["loop_content"]
    del free_w
    _dilate_into(t, visc, _lut_mask(lab, _CHEST_IDS), 3, _TI["muscle"])  # diaphragm, intercostals
    _dilate_into(t, visc, lab == 79, 2, _TI["csf"])  # spinal canal around the cord
    del visc

    t_sub = t[::2, ::2, ::2].copy()  # bounding boxes from a 2x subsampled map (+margin): cheap

    def refine(cls: int, fn) -> None:
        """Apply ``fn(t_crop, lab_crop, mask_crop, crop)`` inside the bounding box of a class."""
        box = _bbox(t_sub == cls, margin=2)
        if box is not None:
            box = tuple(slice(2 * b.start, min(2 * b.stop, n)) for b, n in zip(box, shape))
            tc = t[box]
            fn(tc, lab[box], tc == cls, box)

    anterior = (y2 - yc) / 100.0  # < 0 anterior: gas rises to the front in a supine patient

    def bones(tc, lc, mc, box):
        tc[mc & ~_interior(lc, mc)] = _TI["bone_cortex"]

    def kidneys(tc, lc, mc, box):
        tc[_interior(lc, mc, 3)] = _TI["kidney_medulla"]

    def heart(tc, lc, mc, box):
        tc[mc & ~_interior(lc, mc, 3)] = _TI["myocardium"]

    def organ_vessels(frac: float, target: str, thick: bool):
        def fn(tc, lc, mc, box):
            if thick:  # hepatic and portal branches, 3-8 mm
                f1, f2 = fb[box], _upsample2_box(f_blob2, box)
            else:
                f1, f2 = fm[box], fm2[box]
            tb = (np.abs(f1) < frac) & (np.abs(f2) < frac)
            tc[mc & tb & _interior(lc, mc, 2)] = _TI[target]
        return fn

    def pancreas(tc, lc, mc, box):
        if fatty > 0:
            vals = fm[box][mc]
            q = np.quantile(vals[::3], 1.0 - fatty)
            tc[mc & (fm[box] > q)] = _TI["pancreas_fat"]

    def bowel(content: str, key: str, wall_iters: int, level: bool):
        def fn(tc, lc, mc, box):
            inner = _interior(lc, mc, wall_iters)
            tc[mc & ~inner] = _TI["bowel_wall"]
            frac = gas[key]
            if frac <= 0 or not inner.any():
                return
            if level:  # air-fluid level: gas fills the anterior part of the lumen
                ya = np.broadcast_to(y2[box[1:]][None], inner.shape)
                thr = np.quantile(ya[inner][::3], frac)
                tc[inner & (ya < thr)] = _TI["gas"]
            else:  # gas pockets, preferably anterior
                score = fb[box] - 1.5 * anterior[box[1:]][None]
                thr = np.quantile(score[inner][::5], 1.0 - frac)
                tc[inner & (score > thr)] = _TI["gas"]
            if content == "colon_content":  # faecal mottling: small gas bubbles
                tc[inner & (fm[box] > 1.6)] = _TI["gas"]
        return fn

    refine(_TI["bone_trab"], bones)
    refine(_TI["kidney_cortex"], kidneys)
    refine(_TI["heart"], heart)
    if liver_vessels > 0:
        refine(_TI["liver"], organ_vessels(liver_vessels, "liver_vessel", True))
    refine(_TI["lung"], organ_vessels(lung_vessels, "lung_vessel", False))
    refine(_TI["pancreas"], pancreas)
    refine(_TI["stomach_content"], bowel("stomach_content", "stomach", 2, True))
    refine(_TI["duodenum_content"], bowel("duodenum_content", "duodenum", 1, False))
    refine(_TI["small_bowel_content"], bowel("small_bowel_content", "small_bowel", 1, False))
    refine(_TI["colon_content"], bowel("colon_content", "colon", 1, False))
    if loops > 0:
        refine(_TI["loop_content"], bowel("loop_content", "loop", 1, False))
    panc = lab == _SRC_PANCREAS
    if v2 is not None and v2.get("pancreas_kept", 1.0) < 1.0:
        p["pancreas_atrophy_kept"] = _atrophy(panc, t, fm, wsp, v2["pancreas_kept"])

    # ---- intensities
    hu = np.take(mean, t)
    hu += np.take(a_low, t) * fl
    hu += np.take(a_mid, t) * fm
    if tab_hu is not None:
        m = (t == _TI["air"]) & (tab_hu > -999.0)[None]
        hu[m] = np.broadcast_to(tab_hu[None], shape)[m]
    del fl, fm, fm2, fb, t, lab
    # correlated noise: white on the 1.5 mm grid, smoothed by the PSF, then linearly resampled;
    # amplified by what those two steps take away so that ``noise_sigma`` is about (+-20 %) the
    # final std in a flat region
    sig_z = max(thickness / 2.35, 0.3)
    gain = (_gauss_noise_gain(psf / wsp[0]) * _gauss_noise_gain(psf / wsp[1])
            * _gauss_noise_gain(sig_z / wsp[2]) * 0.68)  # 0.68: linear resampling, measured
    hu += (corr * noise / gain) * rng.standard_normal(shape, dtype=np.float32)
    img = sitk.GetImageFromArray(hu)
    del hu
    img.SetSpacing(work.spacing)
    img = sitk.SmoothingRecursiveGaussian(img, [psf, psf, sig_z])
    hu = sitk.GetArrayFromImage(img)
    p.update(wall_thickness_mm=wall0, subcutaneous_fat_mm=fat0, table=table,
             table_curvature=table_curv, table_pad_mm=table_pad, fatty_pancreas_fraction=fatty,
             liver_vessels=liver_vessels, lung_vessels=lung_vessels, mesenteric_strands=strands,
             unlabelled_loops=loops, oral_contrast=bool(oral), gas_fractions=gas,
             contrast_dose_quantile=u_global, psf_sigma_mm=psf, psf_sigma_z_mm=sig_z,
             noise_sigma=noise, noise_correlated_fraction=corr,
             noise_white_sigma=float(noise * math.sqrt(max(0.0, 1.0 - corr**2))),
             table_top_compression_mm=table_comp, table_width_mm=table_width,
             circular_fov=circular, hu=hu_params)
    return hu, panc


def _atrophy(panc: np.ndarray, t: np.ndarray, fm: np.ndarray, wsp: np.ndarray, keep: float) -> float:
    """Version 3: an atrophic pancreas keeping the fraction ``keep`` of its volume. The voxels
    nearest its surface, the order perturbed by the fine texture field so that the new contour is
    lobulated, become visceral fat, in the label too (in place). Returns the fraction kept."""
    box = _bbox(panc, margin=2)
    if box is None:
        return 1.0
    organ = panc[box].copy()
    mask = sitk.GetImageFromArray(organ.astype(np.uint8))
    mask.SetSpacing([float(v) for v in wsp])
    inside = -sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
    score = inside + 1.5 * fm[box]  # mm
    rim = organ & (score < np.quantile(score[organ], 1.0 - keep))
    t[box][rim] = _TI["fat_visceral"]
    panc[box] &= ~rim
    return round(float(panc[box].sum() / organ.sum()), 3)
