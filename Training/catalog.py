"""Every training recipe: importing this module imports recipes.py and the plug-ins, which register
themselves in registry.py. The commands (``__main__``, train.py, export.py) look recipes up here."""

from __future__ import annotations

from . import recipes, variants, ggpfn_training, rstn_training  # noqa: F401  (they register)
from .registry import RECIPES, recipe  # noqa: F401
