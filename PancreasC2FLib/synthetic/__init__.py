"""SynthSeg-style synthetic abdominal CT with a pancreas label (``generate_case``).

anatomy.py: the source label maps, their deformation targets and body hull; intensities.py: HU per
tissue and contrast phase; acquisition.py: output grids, orientation, resampling, noise and PSF
helpers; render.py: one case on the work grid; case.py: ``generate_case`` (the method, timings
and reproducibility are described there). The example grid PNG: ``apps/overlay.py``.
"""

from .acquisition import ORIENTATIONS
from .anatomy import ANATOMIES, LABELMAP_DIR, PANCREAS_LABEL_ID, load_label_names, source_labelmap
from .case import EXAMPLE_GRID_CASES, GENERATOR_VERSION, SyntheticCase, generate_case, generate_small_case
from .intensities import PHASES

__all__ = [
    "ANATOMIES",
    "EXAMPLE_GRID_CASES",
    "GENERATOR_VERSION",
    "LABELMAP_DIR",
    "ORIENTATIONS",
    "PANCREAS_LABEL_ID",
    "PHASES",
    "SyntheticCase",
    "generate_case",
    "generate_small_case",
    "load_label_names",
    "source_labelmap",
]
