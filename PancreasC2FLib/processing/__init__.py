"""Array processing shared by the pipelines and training: canonical orientation and boxes
(geometry.py), HU clipping, normalisation and resampling (preprocessing.py), sliding-window
inference (sliding_window.py), connected components and measurements (postprocess.py) and the
per-case quality flag (quality.py)."""
