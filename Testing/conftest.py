"""Shared fixtures for the PancreasC2F test suite (kept fast: tiny networks, small volumes).

- ``tiny_bundle``: a saved bundle of a width-4 random ResDSN pair (windows 32^3, coarse n=1 at
  4 mm, fine n=2 at native spacing, margin 10 mm, untrained).
- ``forced_bundle``: a bundle of ``IntensityBandNet`` stubs that find the phantom's bright
  "pancreas" exactly (see c2f_testutils.py); ``empty_bundle``: one whose coarse stage finds nothing.
- ``phantom_ct``: (image, label) of the phantom, 64x64x48 at 2 mm, LPS, non-zero origin.
- ``small_ct``: a small synthetic CT (image, label): the synthetic generator's small case (seed 0,
  96x96x64 at 2 mm; ~5-10 s once per session), or the phantom if the generator is absent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Tiny networks gain nothing from threads, and on a busy 2-core machine OpenMP threads spinning
# against another process make them ~10x slower.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

import c2f_testutils as tu  # noqa: E402  (registers the stub architecture)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return tu.resdsn_bundle(tmp_path_factory.mktemp("bundles") / "tiny-resdsn")


@pytest.fixture(scope="session")
def forced_bundle(tmp_path_factory) -> Path:
    return tu.band_bundle(tmp_path_factory.mktemp("bundles") / "forced-band")


@pytest.fixture(scope="session")
def empty_bundle(tmp_path_factory) -> Path:
    """Coarse stage finds nothing (its band lies above every intensity of the phantom)."""
    return tu.band_bundle(tmp_path_factory.mktemp("bundles") / "empty-coarse", coarse_band_hu=(5000.0, 6000.0), name="empty-coarse")


@pytest.fixture(scope="session")
def phantom_ct():
    image, label = tu.phantom_case()
    return SimpleNamespace(image=image, label=label)


@pytest.fixture(scope="session")
def small_ct(phantom_ct):
    try:
        from PancreasC2FLib.synthetic import generate_small_case
    except ImportError:
        return phantom_ct
    case = generate_small_case(0)  # 96x96x64 at 2 mm, the whole pancreas inside
    return SimpleNamespace(image=case.image, label=case.label)


@pytest.fixture
def phantom_file(tmp_path, phantom_ct) -> Path:
    import SimpleITK as sitk

    p = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom_ct.image, str(p))
    return p
