"""Files: CT images and label maps (images.py, formats.py), DICOM SEG (dicomseg.py), Slicer ROI
files (roi.py), model bundles (bundle.py) and all-or-nothing output staging (outputs.py)."""
