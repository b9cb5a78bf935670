"""Bounded fuzzing: the readers only ever raise InputError, and the command line only ever
returns a documented exit code (or argparse's usage exit 2). Small example counts, deadlines set."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import c2f_testutils as tu
from PancreasC2FLib.apps import cli
from PancreasC2FLib.errors import InputError
from PancreasC2FLib.io.formats import IMAGE_SUFFIXES
from PancreasC2FLib.io.images import read_image

FUZZ = settings(max_examples=40, deadline=3000, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
WORK = Path(tempfile.mkdtemp(prefix="c2f-fuzz-"))


def _read_only_input_error(path: Path):
    try:
        img = read_image(path)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    # anything accepted is a usable 3D scalar volume
    assert img.GetDimension() == 3 and img.GetNumberOfComponentsPerPixel() == 1 and min(img.GetSize()) >= 8
    return img


@FUZZ
@given(data=st.binary(min_size=0, max_size=3000), suffix=st.sampled_from(IMAGE_SUFFIXES))
def test_random_bytes(data, suffix):
    p = WORK / f"random{suffix}"
    p.write_bytes(data)
    assert _read_only_input_error(p) is None


def _valid(suffix: str) -> bytes:
    arr = (np.arange(10 * 10 * 10, dtype=np.int16).reshape(10, 10, 10) % 300) - 100
    p = WORK / f"valid{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    return p.read_bytes()


VALID_NII = _valid(".nii")
VALID_NRRD = _valid(".nrrd")


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1, max_size=12), gz=st.booleans())
def test_mutated_nifti_header(edits, gz):
    data = bytearray(VALID_NII)
    for pos, value in edits:
        data[pos] = value
    if gz:
        import gzip

        p = WORK / "mutated.nii.gz"
        p.write_bytes(gzip.compress(bytes(data)))
    else:
        p = WORK / "mutated.nii"
        p.write_bytes(bytes(data))
    _read_only_input_error(p)


HEADER_END = VALID_NRRD.index(b"\n\n") + 2
NRRD_VALUES = st.sampled_from([b"-1", b"0", b"3", b"4", b"99999999999", b"1e400", b"nan", b"", b"raw", b"gzip", b"short", b"double", b"(nan,0,0)", b"none", b"\xff\xfe", b"1 1", b"10 10 10 10", b"left-posterior-superior"])


@FUZZ
@given(line=st.integers(1, 12), value=NRRD_VALUES, cut=st.integers(0, 2100))
def test_mutated_nrrd_header(line, value, cut):
    header = VALID_NRRD[:HEADER_END].split(b"\n")
    body = VALID_NRRD[HEADER_END:]
    i = line % max(1, len(header) - 2) + 1  # never the magic line
    key = header[i].split(b":")[0]
    header[i] = key + b": " + value
    p = WORK / "mutated.nrrd"
    p.write_bytes(b"\n".join(header) + body[: len(body) - cut % (len(body) + 1)])
    _read_only_input_error(p)


# --- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_world(forced_bundle, empty_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-fuzz")
    image, _ = tu.phantom_case()
    sitk.WriteImage(image, str(d / "ct.nii.gz"))
    (d / "bad.nii.gz").write_bytes(b"not an image")
    from PancreasC2FLib.processing.geometry import Orientation
    from PancreasC2FLib.io.roi import box_to_roi_dict

    (d / "roi.mrk.json").write_text(json.dumps(box_to_roi_dict(image, Orientation.of(image), ((10, 40), (20, 50), (10, 50)))), encoding="utf-8")
    (d / "out").mkdir()
    return {"dir": d, "forced": forced_bundle, "empty": empty_bundle}


FLAGS = ["--coarse-only", "--overwrite", "--quiet", "--deterministic"]
VALUED = {
    "-o": ["{d}/out/a.nii.gz", "{d}/out/b.seg.nrrd", "{d}/out/c.nrrd", "{d}/out/z.png", "{d}/nowhere/a.nii.gz", "{d}/ct.nii.gz", "{d}"],
    "--seg-out": ["{d}/out/b.seg.nrrd", "{d}/out/b.nii.gz"],
    "--report": ["{d}/out/r.json", "{d}/out/a.nii.gz"],
    "--dicom-seg": ["{d}/out/s.dcm", "{d}/ct.nii.gz"],  # no input here is a DICOM series
    "--roi": ["{d}/roi.mrk.json", "{d}/ct.nii.gz", "{d}/missing.mrk.json"],
    "--roi-out": ["{d}/out/x.mrk.json", "{d}/roi.mrk.json"],
    "--series-uid": ["1.2.3", ""],
    "--pipeline": ["resdsn-c2f", "roth-cascade", "zhao-two-stage"],
    "--device": ["cpu", "cuda:7", "auto", "mps", "tpu", ""],
    "--threads": ["0", "1", "-1", "99999", "x"],
    "--batch-size": ["0", "1", "3", "-2", "nan"],
    "--preset": ["fast", "paper", "default", "nonexistent"],
    "--coarse-n": ["-1", "0", "1", "2", "100000", "1.5"],
    "--fine-n": ["-3", "0", "2", "1000000"],
    "--margin-mm": ["-10", "0", "5", "nan", "inf", "1e308"],
    "--min-island-fraction": ["-0.5", "0", "0.2", "1", "2", "nan"],
}
MODELS = ["{forced}", "{forced}", "{forced}", "{empty}", "no-such-model", "{d}"]
INPUTS = ["{d}/ct.nii.gz", "{d}/ct.nii.gz", "{d}/ct.nii.gz", "{d}/bad.nii.gz", "{d}/missing.nii.gz", "{d}"]
NOISE = ["--frobnicate", "-x", "--threads", "é", "", "--"]

option_pairs = st.sampled_from(sorted(VALUED)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(VALUED[k])))
BASE = [["-o", "{d}/out/base.nii.gz", "--overwrite", "--quiet"]] * 4 + [["-o", "{d}/out/base.nii.gz"], []]
segment_argv = st.tuples(
    st.sampled_from(INPUTS),
    st.sampled_from(MODELS),
    st.sampled_from(BASE),
    st.lists(st.one_of(st.sampled_from(FLAGS).map(lambda f: (f,)), option_pairs), max_size=4),
    st.sampled_from([[]] * 6 + [[n] for n in NOISE]),
).map(lambda t: ["segment", t[0], "--model", t[1]] + t[2] + [x for item in t[3] for x in item] + t[4])
other_argv = st.sampled_from([["models"], ["info"], ["bogus"], [], ["--version"], ["segment", "--help"]])


@settings(max_examples=80, deadline=10000, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=st.one_of(segment_argv, segment_argv, segment_argv, other_argv))
def test_cli_arguments(cli_world, argv):
    fmt = {"d": cli_world["dir"], "forced": cli_world["forced"], "empty": cli_world["empty"]}
    argv = [str(a).format(**fmt) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = ("exit", exc.code)
    STATS[rc if not isinstance(rc, tuple) else f"SystemExit {rc[1]}"] = STATS.get(rc if not isinstance(rc, tuple) else f"SystemExit {rc[1]}", 0) + 1
    if isinstance(rc, tuple):
        assert rc[1] in (0, 2), (argv, err.getvalue())  # --help/--version, or an argparse usage error
        return
    assert rc in {0, 2, 3, 4, 5, 6}, (argv, rc, err.getvalue())
    if rc != 0:
        lines = err.getvalue().strip().splitlines()
        assert lines and lines[-1].startswith("pancreas-c2f: error:") and "Traceback" not in err.getvalue()
    # nothing half-written is ever left behind
    assert not [p for p in (cli_world["dir"] / "out").iterdir() if ".part" in p.name]


STATS: dict = {}


def test_cli_fuzz_reached_the_pipeline():
    """The generator is useful only if it reaches real runs and several error paths."""
    if not STATS:
        pytest.skip("test_cli_arguments did not run in this session")
    assert STATS.get(0, 0) >= 1 and len([k for k in STATS if isinstance(k, int)]) >= 3, STATS
