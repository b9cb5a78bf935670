"""PancreasC2FLib: coarse-to-fine 3D pancreas segmentation in CT (pure library, no Slicer/Qt)."""

__version__ = "0.1.0"
