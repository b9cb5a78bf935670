"""The five pipelines, all on the shared machinery of base.py (``Case``, ``Region``, ``Result``,
``Pipeline``, the registry and ``create_pipeline``):

resdsn_c2f.py (Zhu et al. 2018), roth_cascade.py (Roth et al. 2018), zhao_two_stage.py (Zhao et
al. 2019), yu_rstn.py (Yu et al. 2018), fang_ggpfn.py (Fang et al. 2019). options.py builds a
pipeline from command-line style options. Importing this package registers all five.
"""

from .base import PIPELINES, Case, Pipeline, Region, Result, create_pipeline, register_pipeline
from . import resdsn_c2f, roth_cascade, zhao_two_stage, yu_rstn, fang_ggpfn  # noqa: E402,F401  (they register)

__all__ = ["PIPELINES", "Case", "Pipeline", "Region", "Result", "create_pipeline", "register_pipeline"]
