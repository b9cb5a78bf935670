"""Compatibility: the pipelines moved to ``PancreasC2FLib.pipelines`` (this module re-exports the
names it used to define)."""

from .pipelines import create_pipeline, register_pipeline  # noqa: F401
from .pipelines.base import (  # noqa: F401
    PIPELINES,
    Case,
    Pipeline,
    Progress,
    Region,
    Result,
    deep_merge,
    grow_box_to,
    remove_small_islands_in,
    resolve_device,
)
from .pipelines.resdsn_c2f import ResDSNC2F  # noqa: F401
