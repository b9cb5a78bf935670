"""The training recipes by pipeline name. ``register`` adds recipes (and the stage settings they use
only while training), ``recipe`` looks one up. recipes.py and the plug-ins (variants.py,
ggpfn_training.py, rstn_training.py) register into it; catalog.py imports them all, so look
recipes up through catalog.py.
"""

from __future__ import annotations

RECIPES: dict = {}  # pipeline name -> recipes.PipelineRecipe

# Stage settings used only while training (kept in checkpoints, left out of bundles).
TRAINING_ONLY_SETTINGS: tuple[str, ...] = ()


def register(*recipes, training_only: tuple[str, ...] = ()) -> None:
    """Make ``recipes`` trainable under their names; ``training_only``: their stage settings that
    stay out of bundles."""
    global TRAINING_ONLY_SETTINGS
    for r in recipes:
        RECIPES[r.name] = r
    TRAINING_ONLY_SETTINGS = tuple(dict.fromkeys(TRAINING_ONLY_SETTINGS + tuple(training_only)))


def recipe(pipeline: str):
    try:
        return RECIPES[pipeline]
    except KeyError:
        raise ValueError(f"unknown pipeline {pipeline!r}; known: {', '.join(sorted(RECIPES))}") from None
