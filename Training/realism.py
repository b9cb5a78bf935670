"""Realism report: how synthetic CT compares with real CT, tissue by tissue.

    python -m Training realism --real ../shared/real-ct --synthetic synthetic:6:700000 --out runs/realism

For every case (real image + multi-organ label map with TotalSegmentator ids, or a synthetic case
rendered with its label map) it measures what a segmentation network sees:

* HU per tissue: median and 10th-90th percentile spread inside each labelled structure (fat:
  unlabelled body voxels between -250 and -30 HU);
* noise: the standard deviation of the high-pass residual (image minus a 1-voxel Gaussian blur) in
  the eroded liver, spleen and muscles, and its texture, the correlation of neighbouring residuals
  in-plane (0: white noise, near 1: blotchy, strongly correlated noise);
* edge blur: the 10-90 % width (mm) of the air-to-skin step across the body outline (the edge
  spread function, averaged over the whole outline);
* field of view and body: the scan's extent (mm), the body's width and depth at the pancreas'
  centre slice, and how far the scan reaches above and below the pancreas.

Real and synthetic figures side by side: ``realism.csv`` (one row per case), ``realism.md`` (a
table of medians per group) and ``realism.png``. The real cases are only measured here; their
statistics may calibrate the generator (say so where that is done), never train a network.
"""

from __future__ import annotations

import csv
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Tissue groups by TotalSegmentator "total" id (the ids of both the generator's source maps and
# the real-CT label map).
TISSUES: dict[str, list[int]] = {
    "pancreas": [7],
    "liver": [5],
    "spleen": [1],
    "kidney": [2, 3],
    "stomach": [6],
    "duodenum": [19],
    "small_bowel": [18],
    "colon": [20],
    "aorta": [52],
    "ivc": [63],
    "portal_splenic_vein": [64],
    "muscle": [86, 87, 88, 89],  # autochthon and iliopsoas: present in every abdominal scan
    "bladder": [21],
    "vertebrae": list(range(25, 51)),
}
FAT_HU = (-250.0, -30.0)
BODY_HU = -500.0
_NOISE_TISSUES = ("liver", "spleen", "muscle")


@dataclass
class RealismCase:
    """One measured case; ``kind`` is "real" or "synthetic"."""

    name: str
    kind: str
    image: sitk.Image
    labels: sitk.Image


def _canonical(img: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(img, "LPS")


def _erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    inner = mask.copy()
    for _ in range(iterations):
        k = inner.copy()
        for ax in range(3):
            k &= np.roll(inner, 1, ax) & np.roll(inner, -1, ax)
        inner = k
    return inner


def _residual(a: np.ndarray) -> np.ndarray:
    """High-pass residual: the image minus its 5 x 5 in-plane box mean (organ-scale texture and
    edges largely removed, noise kept)."""
    img = sitk.GetImageFromArray(a)
    return a - sitk.GetArrayFromImage(sitk.Mean(img, [2, 2, 0]))


def _edge_width(a: np.ndarray, body: np.ndarray, spacing_zyx: np.ndarray) -> float:
    """10-90 % width (mm) of the mean HU profile across the body outline (air -> skin)."""
    img = sitk.GetImageFromArray(body.astype(np.uint8))
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    # in-plane distance only: slices are thicker than pixels, the outline is mostly vertical
    ks = np.unique(np.linspace(0, a.shape[0] - 1, min(12, a.shape[0])).round().astype(int))  # a sample of slices
    sd = np.stack([sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(img[:, :, int(k)], insideIsPositive=True, squaredDistance=False, useImageSpacing=True)) for k in ks])
    sub = a[ks]
    near = np.abs(sd) < 12.0
    d, v = sd[near], sub[near]
    step = 0.25 * float(spacing_zyx[1:].min())
    bins = np.arange(-12.0, 12.0 + step, step)
    idx = np.digitize(d, bins)
    prof = np.array([np.median(v[idx == i]) if np.any(idx == i) else np.nan for i in range(1, len(bins))])
    centres = (bins[:-1] + bins[1:]) / 2
    ok = ~np.isnan(prof)
    centres, prof = centres[ok], prof[ok]
    lo, hi = np.median(prof[centres < -6]), np.median(prof[(centres > 3) & (centres < 8)])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < 200:
        return float("nan")
    frac = (prof - lo) / (hi - lo)
    x10 = centres[np.argmax(frac >= 0.1)]
    x90 = centres[np.argmax(frac >= 0.9)]
    return float(x90 - x10)


def measure(case: RealismCase) -> dict:
    """The realism figures of one case (see the module docstring)."""
    img, lab = _canonical(case.image), _canonical(case.labels)
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    l = sitk.GetArrayFromImage(lab)
    sp = np.asarray(img.GetSpacing(), float)[::-1]  # z, y, x
    body = a > BODY_HU
    row: dict = {"case": case.name, "kind": case.kind}
    for name, ids in TISSUES.items():
        m = np.isin(l, ids)
        v = a[m]
        if v.size >= 20:
            row[f"{name}_median"] = float(np.median(v))
            row[f"{name}_p10"] = float(np.percentile(v, 10))
            row[f"{name}_p90"] = float(np.percentile(v, 90))
    fat = body & (l == 0) & (a > FAT_HU[0]) & (a < FAT_HU[1])
    if fat.sum() >= 20:
        row["fat_median"] = float(np.median(a[fat]))
        row["fat_p10"] = float(np.percentile(a[fat], 10))
        row["fat_p90"] = float(np.percentile(a[fat], 90))
    # noise: robust std of the residual in homogeneous organs, and its in-plane lag-1 correlation
    res = _residual(a)
    homog = _erode(np.isin(l, sum((TISSUES[t] for t in _NOISE_TISSUES), [])), 2)
    if homog.sum() > 100:
        r = res[homog]
        row["noise_hu"] = float(1.4826 * np.median(np.abs(r - np.median(r))))
        pair = homog[:, :, :-1] & homog[:, :, 1:]
        x0, x1 = res[:, :, :-1][pair], res[:, :, 1:][pair]
        row["noise_correlation"] = float(np.corrcoef(x0, x1)[0, 1])
    row["edge_width_mm"] = _edge_width(a, body, sp)
    extent = (np.asarray(a.shape) - 1) * sp
    row.update(fov_z_mm=float(extent[0]), fov_y_mm=float(extent[1]), fov_x_mm=float(extent[2]))
    row.update(spacing_x_mm=float(sp[2]), spacing_z_mm=float(sp[0]))
    panc = np.argwhere(l == 7)
    if len(panc):
        kz = int(round(panc[:, 0].mean()))
        sl = body[kz]
        ys, xs = np.nonzero(sl)
        if len(xs):
            row["body_width_mm"] = float((xs.max() - xs.min() + 1) * sp[2])
            row["body_depth_mm"] = float((ys.max() - ys.min() + 1) * sp[1])
        row["above_pancreas_mm"] = float((a.shape[0] - 1 - panc[:, 0].max()) * sp[0])
        row["below_pancreas_mm"] = float(panc[:, 0].min() * sp[0])
        row["pancreas_ml"] = float(len(panc) * np.prod(sp) / 1000.0)
    return row


def real_cases(folder: str | Path) -> list[RealismCase]:
    """A folder holding ct.nii.gz + labels.nii.gz (the layout of shared/real-ct), or images/ and
    labels/ subfolders with matching names (multi-organ label maps with TotalSegmentator ids)."""
    folder = Path(folder)
    if (folder / "ct.nii.gz").is_file() and (folder / "labels.nii.gz").is_file():
        pairs = [(folder.name, folder / "ct.nii.gz", folder / "labels.nii.gz")]
    elif (folder / "images").is_dir() and (folder / "labels").is_dir():
        pairs = [(p.name.split(".")[0], p, folder / "labels" / p.name) for p in sorted((folder / "images").iterdir()) if (folder / "labels" / p.name).is_file()]
    else:
        raise FileNotFoundError(f"{folder}: expected ct.nii.gz + labels.nii.gz, or images/ and labels/ folders")
    if not pairs:
        raise FileNotFoundError(f"{folder}: no image with a label map of the same name")
    return [RealismCase(n, "real", sitk.ReadImage(str(i)), sitk.ReadImage(str(l), sitk.sitkUInt8)) for n, i, l in pairs]


def synthetic_cases(count: int, seed: int, options: dict | None = None) -> list[RealismCase]:
    """``count`` generated cases (seeds ``seed``...) with their label maps; ``options`` are
    ``generate_case`` keywords (e.g. ``{"version": 1, "phase": "non-contrast"}``)."""
    from PancreasC2FLib.synthetic import generate_case

    out = []
    for s in range(seed, seed + count):
        c = generate_case(s, with_labels=True, **(options or {}))
        sp = c.params["spacing"]
        name = f"synthetic-v{c.params['generator_version']}-{s} ({c.params['phase']}, {sp[0]:.2f} x {sp[2]:.2f} mm)"
        out.append(RealismCase(name, "synthetic", c.image, c.labels))
    return out


SUMMARY_KEYS = ["pancreas", "liver", "spleen", "kidney", "duodenum", "small_bowel", "muscle", "fat", "aorta"]
SCALARS = [("noise_hu", "noise (HU)"), ("noise_correlation", "noise correlation (lag 1)"), ("edge_width_mm", "edge 10-90 % (mm)"),
           ("fov_z_mm", "FOV z (mm)"), ("below_pancreas_mm", "scan below pancreas (mm)"), ("above_pancreas_mm", "scan above pancreas (mm)"),
           ("body_width_mm", "body width (mm)"), ("body_depth_mm", "body depth (mm)"), ("pancreas_ml", "pancreas (mL)")]


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0f}" if abs(v) >= 10 else f"{v:.2f}"


def summary_table(rows: list[dict]) -> str:
    """Markdown: per tissue and per scalar, the real value(s) and the synthetic median [p10-p90 over cases]."""
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("real", "synthetic")}

    def cell(rs, key):
        vals = np.array([r[key] for r in rs if key in r and not (isinstance(r[key], float) and math.isnan(r[key]))], float)
        if vals.size == 0:
            return "n/a"
        if vals.size == 1:
            return _fmt(vals[0])
        return f"{_fmt(np.median(vals))} [{_fmt(np.percentile(vals, 10))} to {_fmt(np.percentile(vals, 90))}]"

    lines = ["| measure | real | synthetic: median over cases [p10 to p90] |", "|---|---|---|"]
    for t in SUMMARY_KEYS:
        lines.append(f"| {t} median HU (p10 / p90 within the structure) | {cell(kinds['real'], t + '_median')} ({cell(kinds['real'], t + '_p10')} / {cell(kinds['real'], t + '_p90')}) | {cell(kinds['synthetic'], t + '_median')} |")
    for key, title in SCALARS:
        lines.append(f"| {title} | {cell(kinds['real'], key)} | {cell(kinds['synthetic'], key)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    xs = np.arange(len(SUMMARY_KEYS))
    for off, kind, colour in ((-0.15, "synthetic", "tab:blue"), (0.15, "real", "tab:red")):
        for r in rows:
            if r["kind"] != kind:
                continue
            med = [r.get(t + "_median", np.nan) for t in SUMMARY_KEYS]
            lo = [r.get(t + "_p10", np.nan) for t in SUMMARY_KEYS]
            hi = [r.get(t + "_p90", np.nan) for t in SUMMARY_KEYS]
            jitter = off + (np.random.default_rng(zlib.crc32(r["case"].encode())).uniform(-0.08, 0.08) if kind == "synthetic" else 0)
            ax.errorbar(xs + jitter, med, yerr=[np.subtract(med, lo), np.subtract(hi, med)], fmt="o", ms=4, color=colour, alpha=0.9 if kind == "real" else 0.45, lw=1, capsize=2)
    ax.plot([], [], "o", color="tab:red", label="real")
    ax.plot([], [], "o", color="tab:blue", label="synthetic")
    ax.set_xticks(xs, SUMMARY_KEYS, rotation=30)
    ax.set_ylabel("HU: median, bar = 10th-90th percentile in the structure")
    ax.set_ylim(-200, 250)
    ax.axhline(0, color="0.8", lw=0.8)
    ax.legend()
    ax.set_title("Tissue intensities")
    names = [t for _, t in SCALARS[:3]]
    for i, (k, _) in enumerate(SCALARS[:3]):
        for kind, colour, off in (("synthetic", "tab:blue", -0.15), ("real", "tab:red", 0.15)):
            vals = [r[k] * (100 if k == "noise_correlation" else 1) for r in rows if r["kind"] == kind and k in r]
            ax2.plot(np.full(len(vals), i + off), vals, "o", color=colour, alpha=0.6)
    ax2.set_xticks(range(3), [n.replace("noise correlation (lag 1)", "noise corr. (lag 1) x 100") for n in names], rotation=15)
    ax2.set_title("Noise and blur")
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    plt.close(fig)


def realism_report(real: list[RealismCase], synthetic: list[RealismCase], out: str | Path, log=print) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in real + synthetic:
        rows.append(measure(c))
        log(f"{c.kind:9s} {c.name}: pancreas {_fmt(rows[-1].get('pancreas_median'))} HU, noise {_fmt(rows[-1].get('noise_hu'))} HU, edge {_fmt(rows[-1].get('edge_width_mm'))} mm")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "realism.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    (out / "realism.md").write_text(summary_table(rows), encoding="utf-8")
    plot(rows, out / "realism.png")
    return rows
