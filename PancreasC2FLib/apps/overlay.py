"""PNG views of a CT volume with segmentation outlines.

Two renderers. ``render_overlay`` / ``save_case_grid`` are plain pixel panels (numpy + SimpleITK,
no text), also used for the example grid of synthetic cases
(``python -m PancreasC2FLib.apps.overlay [grid.png]``). ``write_qa_overlay`` (one case: demo,
``segment --overlay``) and ``write_batch_overview`` (one row per case: ``batch``) draw the
annotated QA pictures with matplotlib (optional: ``pip install matplotlib``; without it the
callers fall back to the plain panels or skip the overview, and say so).

Panels are axial | coronal | sagittal through one point, each resampled to square pixels so the
physical aspect ratio is right, in the radiological convention: the volume is first reoriented to
LPS, so the patient's left is on the image right (axial, coronal), anterior is up (axial) or left
(sagittal) and superior is up (coronal, sagittal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..synthetic import EXAMPLE_GRID_CASES, generate_case

__all__ = ["render_overlay", "save_png", "save_case_grid", "window_to_uint8", "write_example_grid",
           "write_qa_overlay", "write_report_overlay", "write_batch_overview", "batch_overview", "have_matplotlib", "MATPLOTLIB_HINT"]

Color = tuple[int, int, int]
DEFAULT_COLORS: tuple[Color, ...] = ((255, 220, 0), (0, 200, 255), (255, 60, 60), (60, 255, 60))


def window_to_uint8(a: np.ndarray, window: tuple[float, float] = (40, 400)) -> np.ndarray:
    """Map HU to 0..255 with a (level, width) window."""
    level, width = window
    lo = level - width / 2.0
    return (np.clip((a.astype(np.float32) - lo) / float(width), 0.0, 1.0) * 255.0 + 0.5).astype(
        np.uint8)


def _to_square_pixels(a: np.ndarray, row_mm: float, col_mm: float, pixel_mm: float,
                      nearest: bool) -> np.ndarray:
    """Resample a 2D array (rows, cols) with the given pixel sizes to ``pixel_mm`` square pixels."""
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.SetSpacing((col_mm, row_mm))
    size = [max(1, int(round(a.shape[1] * col_mm / pixel_mm))),
            max(1, int(round(a.shape[0] * row_mm / pixel_mm)))]
    # keep the first and last pixel edges of both grids aligned
    origin = (-0.5 * col_mm + 0.5 * a.shape[1] * col_mm / size[0],
              -0.5 * row_mm + 0.5 * a.shape[0] * row_mm / size[1])
    spacing = (a.shape[1] * col_mm / size[0], a.shape[0] * row_mm / size[1])
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(img, size, sitk.Transform(), interp, origin, spacing, (1.0, 0.0, 0.0, 1.0),
                        0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a 2D mask (pixels with a 4-neighbour outside the mask)."""
    inner = mask.copy()
    for _ in range(thickness):
        e = inner.copy()
        e[1:] &= inner[:-1]
        e[:-1] &= inner[1:]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        e[0] = e[-1] = False
        e[:, 0] = e[:, -1] = False
        inner = e
    return mask & ~inner


def _on_grid(mask: sitk.Image, ref: sitk.Image) -> sitk.Image:
    same = (mask.GetSize() == ref.GetSize()
            and np.allclose(mask.GetSpacing(), ref.GetSpacing())
            and np.allclose(mask.GetOrigin(), ref.GetOrigin())
            and np.allclose(mask.GetDirection(), ref.GetDirection()))
    if same:
        return mask
    return sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         mask.GetPixelID())


def render_overlay(image: sitk.Image, masks: Sequence[tuple[sitk.Image, Color]] = (),
                   center_xyz_index: tuple[int, int, int] | None = None,
                   window: tuple[float, float] = (40, 400), *, pixel_mm: float | None = None,
                   views: Sequence[str] = ("axial", "coronal", "sagittal"),
                   thickness: int = 1, gap: int = 4) -> np.ndarray:
    """RGB uint8 (H, W, 3) panels through one point, each mask drawn as a coloured outline.

    center_xyz_index: an (x, y, z) index of ``image``; None = centroid of the first non-empty
        mask (the image centre if none).
    window: (level, width) in HU.
    pixel_mm: display pixel size; None = the finest spacing of the image.
    views: panels to draw, left to right, from "axial", "coronal", "sagittal".
    """
    if image.GetDimension() != 3:
        raise ValueError("render_overlay expects a 3D image")
    # the centre as a physical point first, so that it survives the reorientation
    if center_xyz_index is not None:
        center_pt = image.TransformContinuousIndexToPhysicalPoint(
            [float(v) for v in center_xyz_index])
    else:
        center_pt = None
        for m, _ in masks:
            mm = _on_grid(m, image)
            idx = np.argwhere(sitk.GetArrayViewFromImage(mm) > 0)
            if idx.size:
                c = idx.mean(axis=0)[::-1]
                center_pt = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
                break
        if center_pt is None:
            c = (np.asarray(image.GetSize()) - 1) / 2.0
            center_pt = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])

    img = sitk.DICOMOrient(image, "LPS")
    arr = sitk.GetArrayFromImage(img)  # z (S+), y (P+), x (L+)
    mask_arrs = [(sitk.GetArrayFromImage(sitk.DICOMOrient(_on_grid(m, image), "LPS")) > 0,
                  tuple(int(v) for v in col)) for m, col in masks]
    sx, sy, sz = img.GetSpacing()
    cidx = img.TransformPhysicalPointToContinuousIndex(center_pt)
    i, j, k = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(cidx, img.GetSize()))
    pix = pixel_mm or float(min(sx, sy, sz))

    def cut(a: np.ndarray, view: str) -> tuple[np.ndarray, float, float]:
        if view == "axial":  # rows anterior -> posterior, columns right -> left
            return a[k], sy, sx
        if view == "coronal":  # rows superior -> inferior
            return a[::-1, j, :], sz, sx
        if view == "sagittal":  # rows superior -> inferior, columns anterior -> posterior
            return a[::-1, :, i], sz, sy
        raise ValueError(f"unknown view {view!r}")

    panels = []
    for view in views:
        sl, rmm, cmm = cut(arr, view)
        gray = window_to_uint8(_to_square_pixels(sl, rmm, cmm, pix, nearest=False), window)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        for m, col in mask_arrs:
            ms, _, _ = cut(m, view)
            sq = _to_square_pixels(ms.astype(np.float32), rmm, cmm, pix, nearest=False) >= 0.5
            rgb[_outline(sq, thickness)] = col
        panels.append(rgb)
    return _hstack(panels, gap)


def _hstack(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    cols = []
    for n, pnl in enumerate(panels):
        pad = np.zeros((h, pnl.shape[1], 3), np.uint8)
        top = (h - pnl.shape[0]) // 2
        pad[top: top + pnl.shape[0]] = pnl
        cols.append(pad)
        if gap and n < len(panels) - 1:
            cols.append(np.zeros((h, gap, 3), np.uint8))
    return np.concatenate(cols, axis=1)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array (or (H, W) grayscale) as PNG."""
    a = np.ascontiguousarray(rgb)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8, got {a.dtype}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(a, isVector=a.ndim == 3)
    sitk.WriteImage(img, str(path))


def save_case_grid(path: str | Path, cases: Sequence[Any], *, columns: int = 2,
                   pixel_mm: float = 2.0, tile: tuple[int, int] = (220, 220),
                   color: Color = DEFAULT_COLORS[0], window: tuple[float, float] = (40, 400)) -> None:
    """Grid of cases (anything with ``.image`` and ``.label``): axial | coronal through the
    pancreas centroid, pancreas outlined. Tiles are padded/cropped to ``tile`` (h, w) per view."""
    tiles = []
    for case in cases:
        views = []
        for view in ("axial", "coronal"):
            p = render_overlay(case.image, [(case.label, color)], window=window,
                               pixel_mm=pixel_mm, views=(view,))
            views.append(_fit(p, tile))
        tiles.append(_hstack(views, gap=2))
    rows = []
    for r in range(0, len(tiles), columns):
        row = tiles[r: r + columns]
        while len(row) < columns:
            row.append(np.zeros_like(tiles[0]))
        rows.append(_hstack(row, gap=6))
    sep = np.zeros((6, rows[0].shape[1], 3), np.uint8)
    grid = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    save_png(path, grid)


def _fit(p: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """Centre-crop or pad a panel to (h, w)."""
    h, w = tile
    out = np.zeros((h, w, 3), np.uint8)
    sh, sw = p.shape[:2]
    y0, x0 = max(0, (sh - h) // 2), max(0, (sw - w) // 2)
    crop = p[y0: y0 + h, x0: x0 + w]
    oy, ox = (h - crop.shape[0]) // 2, (w - crop.shape[1]) // 2
    out[oy: oy + crop.shape[0], ox: ox + crop.shape[1]] = crop
    return out


def write_example_grid(path: str | Path,
                       cases: tuple[dict[str, Any], ...] = EXAMPLE_GRID_CASES) -> list[dict[str, Any]]:
    """Generate the example cases and save their axial | coronal grid (pancreas outlined) as PNG.

    Returns the parameters of each case, in grid order (left to right, top to bottom)."""
    made = [generate_case(c["seed"], **{k: v for k, v in c.items() if k != "seed"})
            for c in cases]
    save_case_grid(path, made)
    return [m.params for m in made]


# --- annotated QA pictures (matplotlib) ------------------------------------------------------

MATPLOTLIB_HINT = "the annotated QA picture needs matplotlib (pip install matplotlib)"
RESULT_RGB = (1.0, 0.55, 0.1)  # orange: filled, outlined
REFERENCE_RGB = (0.25, 0.85, 1.0)  # cyan: dashed outline only, so the result stays visible under it
BOX_RGB = (1.0, 1.0, 0.35)  # yellow: the coarse region's box, dashed
QUALITY_RGB = {"ok": (0.45, 0.9, 0.45), "review": (1.0, 0.5, 0.35)}
# Per view, in LPS index axes (0: x, patient right -> left; 1: y, anterior -> posterior; 2: z,
# inferior -> superior): column axis, row axis, rows flipped (superior up), axis cut through.
_VIEW_AXES = {"axial": (0, 1, False, 2), "coronal": (0, 2, True, 1), "sagittal": (1, 2, True, 0)}
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # low, high end of each LPS index axis


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (also headless and inside Slicer)
    import matplotlib.pyplot as plt

    return plt


class _LPSVolume:
    """One case reoriented to LPS (CT, masks, region box) and the point the views go through."""

    def __init__(self, image: sitk.Image, masks: Sequence[sitk.Image | None],
                 box_ijk: Sequence[Sequence[int]] | None = None):
        masks = [None if m is None else _on_grid(m, image) for m in masks]
        img = sitk.DICOMOrient(image, "LPS")
        self.ct = sitk.GetArrayFromImage(img)  # (z, y, x)
        self.masks = [None if m is None else sitk.GetArrayFromImage(sitk.DICOMOrient(m, "LPS")) > 0
                      for m in masks]
        self.spacing = img.GetSpacing()
        self.size = img.GetSize()
        self.box = None  # (2, 3): continuous-index edges (low, high) along i, j, k
        if box_ijk is not None:
            corners = [image.TransformContinuousIndexToPhysicalPoint([a - 0.5, b - 0.5, c - 0.5])
                       for a in box_ijk[0] for b in box_ijk[1] for c in box_ijk[2]]
            idx = np.array([img.TransformPhysicalPointToContinuousIndex(p) for p in corners])
            self.box = np.stack([idx.min(0), idx.max(0)])
        # through the pancreas' centre: the first non-empty mask, else the box, else the middle
        self.center = (np.asarray(self.size) - 1) / 2.0
        found = [m for m in self.masks if m is not None and m.any()]
        if found:
            self.center = np.argwhere(found[0]).mean(0)[::-1]
        elif self.box is not None:
            self.center = self.box.mean(0)
        self.center = tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(self.center, self.size))
        # what the zoomed views show: every mask and the box
        edges = [] if self.box is None else [self.box[0], self.box[1]]
        for m in found:
            idx = np.argwhere(m)[:, ::-1]
            edges += [idx.min(0) - 0.5, idx.max(0) + 0.5]
        self.focus = np.stack([np.min(edges, 0), np.max(edges, 0)]) if edges else None

    def mm(self, c, axis: int, flipped: bool) -> np.ndarray:
        """Continuous LPS index along ``axis`` -> displayed mm (0 at the top/left edge)."""
        n, s = self.size[axis], self.spacing[axis]
        c = np.asarray(c, float)
        return (n - 0.5 - c) * s if flipped else (c + 0.5) * s

    def cut(self, a: np.ndarray, view: str) -> np.ndarray:
        col, row, flipped, through = _VIEW_AXES[view]
        sl = np.take(a, self.center[through], axis=2 - through)  # rows: `row` axis, cols: `col`
        return sl[::-1] if flipped else sl


def _draw_view(ax, vol: _LPSVolume, view: str, window: tuple[float, float],
               styles: Sequence[dict], zoom: bool = False, letters: bool = True,
               label: str | None = None, scale: bool = True) -> None:
    """One view into ``ax``: CT in the window, masks (styles: color, fill, dashed), the box,
    the orientation letters, a scale bar, in mm so the physical aspect ratio is kept."""
    import matplotlib.patches as mpatches
    import matplotlib.patheffects as pe

    col, row, flipped, through = _VIEW_AXES[view]
    ct = vol.cut(vol.ct, view)
    w, h = ct.shape[1] * vol.spacing[col], ct.shape[0] * vol.spacing[row]
    level, width = window
    ext = (0, w, h, 0)
    ax.imshow(ct, cmap="gray", vmin=level - width / 2, vmax=level + width / 2, extent=ext,
              interpolation="bilinear" if zoom else "antialiased")
    xs = (np.arange(ct.shape[1]) + 0.5) * vol.spacing[col]
    ys = (np.arange(ct.shape[0]) + 0.5) * vol.spacing[row]
    lw = 1.8 if zoom else 1.2
    for m, st in zip(vol.masks, styles):
        sl = None if m is None else vol.cut(m, view)
        if sl is None or not sl.any():
            continue
        if st.get("fill"):
            rgba = np.zeros(sl.shape + (4,), np.float32)
            rgba[sl] = (*st["color"], 0.35)
            ax.imshow(rgba, extent=ext, interpolation="nearest")
        ax.contour(xs, ys, sl.astype(np.float32), levels=[0.5], colors=[st["color"]], linewidths=lw,
                   linestyles="--" if st.get("dashed") else "-")
    if vol.box is not None:
        x0, x1 = sorted(vol.mm(vol.box[:, col], col, False))
        y0, y1 = sorted(vol.mm(vol.box[:, row], row, flipped))
        ax.add_patch(mpatches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=BOX_RGB, lw=1.0,
                                        ls=(0, (4, 3))))
    if zoom and vol.focus is not None:
        margin = 15.0
        x0, x1 = sorted(vol.mm(vol.focus[:, col], col, False))
        y0, y1 = sorted(vol.mm(vol.focus[:, row], row, flipped))
        ax.set_xlim(max(0, x0 - margin), min(w, x1 + margin))
        ax.set_ylim(min(h, y1 + margin), max(0, y0 - margin))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    outline = [pe.withStroke(linewidth=2.5, foreground="black")]
    if letters:
        lo_c, hi_c = _AXIS_LETTERS[col]
        top, bottom = _AXIS_LETTERS[row][::-1] if flipped else _AXIS_LETTERS[row]
        for x, y, t, ha, va in ((0.02, 0.5, lo_c, "left", "center"), (0.98, 0.5, hi_c, "right", "center"),
                                (0.5, 0.98, top, "center", "top"), (0.5, 0.02, bottom, "center", "bottom")):
            ax.text(x, y, t, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=11,
                    fontweight="bold", path_effects=outline)
    if scale:
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()  # y0 is the bottom (rows grow downwards)
        bar = 10.0 if (x1 - x0) < 150 else 50.0
        bx, by = x0 + 0.06 * (x1 - x0), y0 - 0.06 * (y0 - y1)
        ax.plot([bx, bx + bar], [by, by], color="white", lw=2, solid_capstyle="butt", path_effects=outline)
        ax.text(bx + bar / 2, by - 0.025 * (y0 - y1), f"{bar / 10:g} cm", color="white", fontsize=7,
                ha="center", va="bottom", path_effects=outline)
    if label:
        ax.set_title(label, color="white", fontsize=10, pad=3)


def _view_label(vol: _LPSVolume, view: str) -> str:
    through = _VIEW_AXES[view][3]
    return f"{view.capitalize()} (slice {vol.center[through] + 1} of {vol.size[through]})"


def _quality_text(quality: str | None, reasons: Sequence[str] = ()) -> str:
    if not quality:
        return "quality: n/a"
    return f"quality: {quality.upper()}" + (f" ({'; '.join(reasons)})" if reasons else "")


def write_qa_overlay(path: str | Path, image: sitk.Image, result: sitk.Image | None,
                     reference: sitk.Image | None = None, box_ijk=None, *, title: str = "",
                     volume_ml: float | None = None, quality: str | None = None,
                     quality_reasons: Sequence[str] = (), extra: str = "",
                     provenance: dict | None = None,
                     window: tuple[float, float] = (40, 400)) -> None:
    """The QA picture of one case, for a radiologist at a glance: axial, coronal and sagittal views
    through the pancreas' centre (whole field of view, then zoomed on the region), the result
    filled orange, the reference (if any) dashed cyan, the coarse region's box dashed yellow
    (``box_ijk``: ITK index ranges, end exclusive, as in the report), orientation letters in the
    radiological convention (patient right on the image left), window/level, volume and quality
    flag in the caption; tool version, model and parameters also in the PNG's text chunks.
    Needs matplotlib (``have_matplotlib``)."""
    import json

    from .. import __version__

    plt = _pyplot()
    import matplotlib.lines as mlines
    import matplotlib.patches as mpatches

    vol = _LPSVolume(image, [result, reference], box_ijk)
    styles = [{"color": RESULT_RGB, "fill": True}, {"color": REFERENCE_RGB, "dashed": True}]
    views = ("axial", "coronal", "sagittal")
    rows = 2 if vol.focus is not None else 1
    # panel widths in proportion to each view's width in mm at a common height
    ratios = []
    for v in views:
        col, row, _, _ = _VIEW_AXES[v]
        ratios.append(vol.size[col] * vol.spacing[col] / (vol.size[row] * vol.spacing[row]))
    fig = plt.figure(figsize=(4.2 * sum(ratios) + 0.6, 4.2 * rows + 1.6), facecolor="black")
    gs = fig.add_gridspec(rows, 3, width_ratios=ratios, left=0.01, right=0.99, wspace=0.03,
                          hspace=0.1, top=1 - 1.05 / (4.2 * rows + 1.6), bottom=0.6 / (4.2 * rows + 1.6))
    for r in range(rows):
        for c, v in enumerate(views):
            ax = fig.add_subplot(gs[r, c])
            _draw_view(ax, vol, v, window, styles, zoom=r == 1,
                       label=_view_label(vol, v) + (", zoomed on the region" if r == 1 else ""))
    level, width = window
    head = title or "PancreasC2F result"
    vol_txt = "pancreas: none found" if volume_ml is None else f"pancreas {volume_ml:.1f} mL"
    fig.text(0.01, 1 - 0.3 / fig.get_figheight(), head, color="white", fontsize=13, fontweight="bold", va="top")
    fig.text(0.01, 1 - 0.62 / fig.get_figheight(), f"{vol_txt}   {_quality_text(quality, quality_reasons)}"
             + (f"   {extra}" if extra else ""), color=QUALITY_RGB.get(quality or "", (0.9, 0.9, 0.9)),
             fontsize=11, va="top")
    handles = []
    if result is not None:
        handles.append(mpatches.Patch(facecolor=(*RESULT_RGB, 0.5), edgecolor=RESULT_RGB, label="result (pancreas)"))
    if reference is not None:
        handles.append(mlines.Line2D([], [], color=REFERENCE_RGB, ls="--", lw=1.8, label="reference"))
    if box_ijk is not None:
        handles.append(mlines.Line2D([], [], color=BOX_RGB, ls=(0, (4, 3)), lw=1.2, label="coarse region (box)"))
    if handles:
        fig.legend(handles=handles, loc="upper right", ncol=len(handles), frameon=False, fontsize=10,
                   labelcolor="white", bbox_to_anchor=(0.99, 1 - 0.2 / fig.get_figheight()))
    prov = provenance or {}
    model = prov.get("model_name")
    foot = (f"window W {width:g} / L {level:g} HU;  views through the pancreas' centre;  "
            f"PancreasC2F {__version__}" + (f";  model {model} (sha256 {str(prov.get('model_sha256', ''))[:12]})" if model else ""))
    fig.text(0.01, 0.2 / fig.get_figheight(), foot, color="0.8", fontsize=9, va="bottom")
    meta = {"Software": f"PancreasC2F {__version__}", "Title": head,
            "Description": json.dumps({**prov, "window_level_hu": level, "window_width_hu": width,
                                       "volume_ml": volume_ml, "quality": quality,
                                       "quality_reasons": list(quality_reasons), "box_ijk": box_ijk},
                                      default=str)}
    _save_figure(fig, path, meta)


def _save_figure(fig, path: str | Path, meta: dict) -> None:
    """An RGB PNG (no alpha: it is opaque) with ``meta`` as text chunks; Pillow comes with
    matplotlib."""
    from PIL import Image, PngImagePlugin

    plt = _pyplot()
    fig.set_dpi(100)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    info = PngImagePlugin.PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).save(str(path), format="PNG", pnginfo=info)


def write_report_overlay(path: str | Path, image: sitk.Image, result: sitk.Image | None, report: dict,
                         reference: sitk.Image | None = None, title: str = "", extra: str = "") -> bool:
    """The QA picture of a case from its report (report.build_report): volume, quality flag,
    region box and provenance come from it. Without matplotlib the plain panels are written
    instead (result green, reference red) and False is returned (callers print MATPLOTLIB_HINT)."""
    if not have_matplotlib():
        masks = [(m, c) for m, c in ((reference, (255, 60, 60)), (result, (60, 255, 60))) if m is not None]
        save_png(path, render_overlay(image, masks))
        return False
    prov = {k: report.get(k) for k in ("tool_version", "model_name", "model_sha256", "model_version", "pipeline", "trained", "parameters") if k in report}
    write_qa_overlay(path, image, result, reference, (report.get("region") or {}).get("box_ijk"), title=title,
                     volume_ml=report.get("pancreas_volume_ml"), quality=report.get("quality"),
                     quality_reasons=report.get("quality_reasons") or (), extra=extra, provenance=prov)
    return True


def write_batch_overview(path: str | Path, rows: Sequence[dict], load: Callable[[dict], tuple],
                         window: tuple[float, float] = (40, 400), rows_per_page: int = 20) -> list[Path]:
    """One row per case for a quick visual check of a whole batch: case name, status, volume and
    quality flag, then the axial view (whole field of view) and axial and coronal views zoomed on
    the region, through the pancreas' centre, result filled orange, region box dashed yellow.

    rows: dicts with ``case``, ``status``, ``volume_ml``, ``quality``, ``quality_reasons``,
        ``error`` (the batch CSV's fields; missing ones are left out).
    load: row -> (image, result label or None, box_ijk or None); what it raises is shown in the
        row instead of the views. One case is in memory at a time.
    More rows than ``rows_per_page`` go to ``NAME-1.png``, ``NAME-2.png``, ... Returns the files.
    Needs matplotlib (``have_matplotlib``)."""
    import textwrap

    from .. import __version__
    from ..io.outputs import atomic_path

    plt = _pyplot()
    path = Path(path)
    pages = [rows[i: i + rows_per_page] for i in range(0, len(rows), rows_per_page)] or [[]]
    written = []
    for n, page in enumerate(pages, 1):
        out = path if len(pages) == 1 else path.with_name(f"{path.name[:-len(path.suffix)]}-{n}{path.suffix}")
        height = 2.3 * max(len(page), 1) + 0.7
        fig = plt.figure(figsize=(12, height), facecolor="black")
        gs = fig.add_gridspec(max(len(page), 1), 4, width_ratios=[1.1, 1, 1, 1], left=0.005, right=0.995,
                              top=1 - 0.62 / height, bottom=0.25 / height, wspace=0.03, hspace=0.12)
        level, width = window
        fig.text(0.005, 1 - 0.1 / height, f"PancreasC2F {__version__} batch overview"
                 + (f" (page {n} of {len(pages)})" if len(pages) > 1 else "")
                 + f": result orange, coarse region dashed yellow; window W {width:g} / L {level:g} HU;"
                 " R/L, A/P, S/I: patient directions", color="white", fontsize=10, va="top")
        for r, row in enumerate(page):
            text_ax = fig.add_subplot(gs[r, 0])
            text_ax.set_axis_off()
            quality = row.get("quality") or ""
            lines = [(row.get("case", "?"), "white", "bold"),
                     (f"status: {row.get('status', '?')}", "white", "normal")]
            if row.get("volume_ml") not in (None, ""):
                lines.append((f"{float(row['volume_ml']):.1f} mL", "white", "normal"))
            if quality:
                lines.append((f"quality: {quality.upper()}", QUALITY_RGB.get(quality, "white"), "bold"))
            detail = row.get("quality_reasons") or row.get("error") or ""
            image = None
            if row.get("status") != "failed":  # failed: its error says it all
                try:
                    image, label, box = load(row)
                except Exception as exc:  # unreadable input or output: say so in the row, go on
                    detail = f"{detail} (not shown: {exc})".strip()
            y = 0.95
            for t, c, w in lines:
                text_ax.text(0.03, y, t, color=c, fontweight=w, fontsize=10, va="top", transform=text_ax.transAxes)
                y -= 0.16
            if detail:
                text_ax.text(0.03, y, textwrap.fill(str(detail), 30), color="0.75", fontsize=8, va="top",
                             transform=text_ax.transAxes)
            if image is None:
                continue
            vol = _LPSVolume(image, [label], box)
            for c, (view, zoom) in enumerate((("axial", False), ("axial", True), ("coronal", True)), 1):
                ax = fig.add_subplot(gs[r, c])
                _draw_view(ax, vol, view, window, [{"color": RESULT_RGB, "fill": True}], zoom=zoom,
                           scale=zoom, label=f"{view}{', zoomed' if zoom else ''}" if r == 0 else None)
            del image, label, vol
        with atomic_path(out) as tmp:
            _save_figure(fig, tmp, {"Software": f"PancreasC2F {__version__}", "Title": "batch overview",
                                    "Description": f"{len(page)} case(s); window W {width:g} / L {level:g} HU"})
        written.append(out)
    return written


def batch_overview(path: str | Path, cases: Sequence[Any], table_rows: Sequence[dict],
                   report_path: Callable[[str], Path], series_uid: str | None = None,
                   log: Callable[[str], None] | None = None) -> list[Path]:
    """``pancreas-c2f batch``'s overview picture(s): ``cases`` (with ``.name`` and ``.path``) with
    their latest rows of the batch table and their reports (``report_path(name)``), each drawn
    from its input and its output, read again one case at a time. Never fails the batch: a
    problem is logged and nothing is drawn."""
    import json
    import sys

    from ..io.images import read_image

    log = log or (lambda m: print(m, file=sys.stderr))
    if not have_matplotlib():
        log(f"no batch overview picture: {MATPLOTLIB_HINT}")
        return []
    try:
        latest = {r.get("case"): r for r in table_rows}
        inputs = {c.name: c.path for c in cases}
        rows = []
        for c in cases:
            row = dict(latest.get(c.name) or {"case": c.name, "status": "not run"})
            rep = Path(report_path(c.name))
            if row.get("status") in ("ok", "skipped") and rep.is_file():  # skipped: done earlier, its report is there
                report = json.loads(rep.read_text(encoding="utf-8"))
                row.update(volume_ml=report.get("pancreas_volume_ml"), quality=report.get("quality"),
                           quality_reasons="; ".join(report.get("quality_reasons") or []),
                           box_ijk=(report.get("region") or {}).get("box_ijk"), output=row.get("output") or "")
            rows.append(row)

        def load(row: dict) -> tuple:
            image = read_image(inputs[row["case"]], series_uid)
            out = Path(row.get("output") or "")
            label = sitk.ReadImage(str(out)) if out.name.endswith(".seg.nrrd") and out.is_file() else None
            return image, label, row.get("box_ijk")

        log(f"drawing the overview of {len(rows)} case(s) ...")
        written = write_batch_overview(path, rows, load)
        log("overview picture: " + ", ".join(str(p) for p in written))
        return written
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # the segmentations are written; a picture must not fail the batch
        log(f"no batch overview picture: {exc.__class__.__name__}: {exc}")
        return []


if __name__ == "__main__":  # python -m PancreasC2FLib.apps.overlay [grid.png]
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "synthetic_grid.png"
    for prm in write_example_grid(out):
        print(prm["seed"], prm["anatomy"], prm["phase"], prm["orientation"],
              [round(v, 3) for v in prm["spacing"]], prm["size"])
