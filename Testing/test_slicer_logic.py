"""The Slicer module's logic on real MRML (slicer-core: MRML and module logics, no Qt).

The scene is made like the application makes it: an application logic with the subject
hierarchy, volumes, segmentations, markups and crop-volume logics registered. The model is the
deterministic stub bundle (``forced_bundle``: both stages find exactly the phantom's "pancreas"),
so results are checked voxel for voxel.

slicer-core is required here (``pip install slicer-core``): an ImportError is a failure, not a skip.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

import slicer  # slicer-core
import vtk

import c2f_testutils as tu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "PancreasC2F"))
import PancreasC2F as module  # noqa: E402

from PancreasC2FLib.errors import Cancelled, EmptyCoarseResult  # noqa: E402


@pytest.fixture
def mrml():
    """A fresh scene wired through an application logic, and the module's logic on it."""
    scene, app_logic, logics = module.createCoreScene()
    for name in ("Volumes", "Segmentations", "Markups", "CropVolume", "SubjectHierarchy"):
        assert app_logic.GetModuleLogic(name) is logics[name]
    logic = module.PancreasC2FLogic(scene)
    yield logic
    scene.Clear(1)


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def roi_voxel_mask(logic, roi, volume) -> np.ndarray:
    """1 on the volume's voxels inside an (axis-aligned) ROI, in (k, j, i) order."""
    dims = volume.GetImageData().GetDimensions()
    inside = np.zeros(dims[::-1], np.uint8)
    inside[module._roiVoxelBox(logic, roi, volume)] = 1
    return inside


GRIDS = {
    "lps": {},
    "permuted-flipped": {"axes": (1, 0, 2), "flips": (True, False, True), "origin": (12.0, -7.0, 40.0)},
    "oblique": {"rotation_deg": 20.0},
}


@pytest.fixture(params=list(GRIDS))
def case(request):
    image, label = tu.phantom_case(shape_zyx=(40, 56, 56), **GRIDS[request.param])
    return image, sitk.GetArrayFromImage(label)


def test_volume_node_round_trip_is_exact(mrml, case):
    image, _ = case
    volume = mrml.addVolumeFromImage(image, "ct")
    back = mrml.imageFromVolume(volume)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert np.allclose(back.GetSpacing(), image.GetSpacing())
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    # IJK->RAS is the LPS geometry with the first two axes negated.
    ijk_to_ras = mrml.ijkToRas(volume)
    ras = np.array(volume.GetOrigin())
    assert np.allclose(ras, [-image.GetOrigin()[0], -image.GetOrigin()[1], image.GetOrigin()[2]])
    assert np.allclose(ijk_to_ras[:3, 3], ras)


def test_coarse_region_covers_the_pancreas_then_fine_segments_it(mrml, case, forced_bundle):
    image, truth = case
    volume = mrml.addVolumeFromImage(image, "ct")
    roi = mrml.findRegion(volume, model=str(forced_bundle), device="cpu")
    assert roi.GetName() == module.ROI_NAME and roi.GetDisplayNode().GetVisibility()
    assert roi.GetAttribute("PancreasC2F.modelSha256")
    # Aligned with the volume's axes and snapped to its voxel grid: the ROI's axes are the
    # volume's and each side is a whole number of voxels.
    axes = np.array(mrml.roiDictFromNode(roi, volume)["markups"][0]["orientation"]).reshape(3, 3)
    direction_ras = np.diag([-1, -1, 1]) @ np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(np.abs(direction_ras.T @ axes), np.eye(3)[np.argmax(np.abs(direction_ras.T @ axes), axis=1)], atol=1e-6)
    size = np.array(roi.GetSize())
    spacing = np.array(image.GetSpacing())
    n_vox = np.abs(direction_ras.T @ axes) @ size / spacing
    assert np.allclose(n_vox, np.round(n_vox), atol=1e-4)
    inside = roi_voxel_mask(mrml, roi, volume)
    assert truth.sum() > 0 and int((truth * (1 - inside)).sum()) == 0, "the region must cover the pancreas"

    seg = mrml.segmentInRegion(volume, roi, model=str(forced_bundle), device="cpu")
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "Pancreas"
    assert "SCT^15776009^Pancreas" in segment.GetTerminology()
    assert np.allclose(segment.GetColor(), module.PANCREAS_COLOR)
    mask = mrml.segmentArray(seg, volume)
    assert int((mask != truth).sum()) == 0
    stats = json.loads(seg.GetAttribute("PancreasC2F.statistics"))
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    assert stats["volume_ml"] == pytest.approx(truth.sum() * voxel_ml, rel=1e-6)
    assert stats["mean_hu"] == pytest.approx(tu.PANCREAS_HU, abs=2)
    provenance = json.loads(seg.GetAttribute("PancreasC2F.provenance"))
    assert provenance["model_sha256"] == seg.GetAttribute("PancreasC2F.modelSha256") and len(provenance["model_sha256"]) == 64
    assert provenance["tool_version"] and "stages" in json.loads(seg.GetAttribute("PancreasC2F.parameters"))


def test_shrunk_roi_keeps_the_result_inside_it(mrml, forced_bundle):
    image, label = tu.phantom_case(shape_zyx=(40, 56, 56))
    truth = sitk.GetArrayFromImage(label)
    volume = mrml.addVolumeFromImage(image, "ct")
    roi = mrml.findRegion(volume, model=str(forced_bundle), device="cpu")
    roi.SetSize(*[s * 0.4 for s in roi.GetSize()])  # now cuts through the pancreas
    out = mrml.process(volume, roi=roi, model=str(forced_bundle), device="cpu")
    mask = mrml.segmentArray(out["segmentation"], volume)
    inside = roi_voxel_mask(mrml, roi, volume)
    assert mask.sum() > 0 and int((mask * (1 - inside)).sum()) == 0
    assert int(mask.sum()) == int((truth * inside).sum())
    assert out["result"].flags["touches_box"]
    assert any("region's border" in w for w in out["report"]["warnings"])
    assert out["roi"] is roi and out["report"]["region"]["source"] == "roi"


def test_new_nodes_go_to_the_input_study_with_its_geometry(mrml, forced_bundle):
    image, _ = tu.phantom_case(shape_zyx=(40, 56, 56))
    volume = mrml.addVolumeFromImage(image, "ct")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, volume)
    out = mrml.process(volume, model=str(forced_bundle), device="cpu")
    for node in (out["segmentation"], out["roi"]):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert out["segmentation"].GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is volume


def test_existing_segmentation_gets_only_the_pancreas_segment(mrml, forced_bundle):
    """The user's segmentation keeps its place, transform, reference geometry and other segments;
    the Pancreas segment is added (then replaced) in its coordinates."""
    image, label = tu.phantom_case(shape_zyx=(40, 56, 56))
    truth = sitk.GetArrayFromImage(label)
    volume = mrml.addVolumeFromImage(image, "ct")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, volume)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "my folder")
    moved = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    shift = np.eye(4)
    shift[:3, 3] = [12.0, -6.0, 9.0]
    moved.SetMatrixTransformToParent(mrml._arrayToMatrix(shift))
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    seg.SetAndObserveTransformNodeID(moved.GetID())
    sh.SetItemParent(sh.CreateItem(folder, seg), folder)
    liver = slicer.vtkOrientedImageData()
    liver.SetExtent(0, 9, 0, 9, 0, 9)
    liver.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    liver.GetPointData().GetScalars().Fill(1)
    liver_id = seg.GetSegmentation().AddEmptySegment("Liver", "Liver")
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(liver, seg, liver_id)
    def on_grid(segment_id, image_to_world):
        """A segment resampled to a grid (k, j, i) given in the segmentation's coordinates."""
        labelmap = slicer.vtkOrientedImageData()
        seg.GetBinaryLabelmapRepresentation(segment_id, labelmap)
        reference = slicer.vtkOrientedImageData()
        reference.SetImageToWorldMatrix(mrml._arrayToMatrix(image_to_world))
        reference.SetExtent(volume.GetImageData().GetExtent())
        reference.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        resampled = slicer.vtkOrientedImageData()
        assert slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled, False, False)
        dims = resampled.GetDimensions()
        return (vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]) > 0).astype(np.uint8)

    from vtk.util.numpy_support import vtk_to_numpy

    liver_before = on_grid(liver_id, np.eye(4))
    assert liver_before.sum() >= 1000
    out = mrml.process(volume, segmentationNode=seg, model=str(forced_bundle), device="cpu")
    mrml.process(volume, segmentationNode=seg, model=str(forced_bundle), device="cpu")  # rerun: replaced, not added
    assert out["segmentation"] is seg
    names = [seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert names == ["Liver", "Pancreas"]
    assert seg.GetParentTransformNode() is moved and sh.GetItemParent(sh.GetItemByDataNode(seg)) == folder
    assert seg.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is None
    assert np.array_equal(on_grid(liver_id, np.eye(4)), liver_before)  # the Liver is as it was
    # The Pancreas, seen through the segmentation's transform, lies on the volume's pancreas.
    pancreas_id = seg.GetSegmentation().GetSegmentIdBySegmentName("Pancreas")
    assert int((on_grid(pancreas_id, np.linalg.inv(shift) @ mrml.ijkToRas(volume)) != truth).sum()) == 0


def test_saved_seg_nrrd_reloads_identically(mrml, forced_bundle, tmp_path):
    image, label = tu.phantom_case(shape_zyx=(40, 56, 56), axes=(1, 0, 2), flips=(True, False, True))
    volume = mrml.addVolumeFromImage(image, "ct")
    out = mrml.process(volume, model=str(forced_bundle), device="cpu")
    path = tmp_path / "pancreas.seg.nrrd"
    mrml.saveSegmentation(out["segmentation"], path)
    assert not list(tmp_path.glob(".*part*"))  # written atomically
    reloaded = mrml.loadSegmentation(path)
    assert reloaded.GetSegmentation().GetNumberOfSegments() == 1
    segment = reloaded.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "Pancreas" and "15776009" in segment.GetTerminology()
    tag = vtk.reference("")
    assert segment.GetTag("PancreasC2F.modelSha256", tag) and str(tag) == out["report"]["model_sha256"]
    assert np.array_equal(mrml.segmentArray(reloaded, volume), mrml.segmentArray(out["segmentation"], volume))
    # Readable outside Slicer too (slicerio), and on the input's grid.
    seg = slicerio.read_segmentation(str(path))
    voxels = np.transpose(seg["voxels"] > 0, (2, 1, 0)).astype(np.uint8)  # (i,j,k) -> (k,j,i)
    as_image = sitk.GetImageFromArray(voxels)
    m = np.asarray(seg["ijkToLPS"])
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    as_image.SetSpacing(spacing.tolist())
    as_image.SetDirection((m[:3, :3] / spacing).ravel().tolist())
    as_image.SetOrigin(m[:3, 3].tolist())
    on_input = sitk.Resample(as_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    assert np.array_equal(sitk.GetArrayViewFromImage(on_input), sitk.GetArrayViewFromImage(label))
    assert np.allclose(np.abs(m[:3, :3] / spacing), np.abs(np.array(image.GetDirection()).reshape(3, 3)), atol=1e-6)


def test_cancelled_run_leaves_no_nodes_behind(mrml, forced_bundle):
    image, _ = tu.phantom_case(shape_zyx=(40, 56, 56))
    volume = mrml.addVolumeFromImage(image, "ct")
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    before = node_ids(mrml.scene)
    cancel = threading.Event()

    def progress(stage, fraction, message):
        if stage == "fine":  # cancel in the middle of the second stage
            cancel.set()

    with pytest.raises(Cancelled):
        mrml.process(volume, segmentationNode=seg, progress=progress, cancel=cancel, model=str(forced_bundle), device="cpu")
    assert node_ids(mrml.scene) == before
    assert seg.GetSegmentation().GetNumberOfSegments() == 0


def test_computed_job_is_applied_afterwards(mrml, forced_bundle):
    image, label = tu.phantom_case(shape_zyx=(40, 56, 56))
    volume = mrml.addVolumeFromImage(image, "ct")
    job = mrml.prepareJob("both", volume, model=str(forced_bundle), device="cpu")
    before = node_ids(mrml.scene)
    stages = set()
    computed = job.compute(lambda stage, fraction, message: stages.add(stage))
    assert node_ids(mrml.scene) == before  # computing never touches MRML
    assert {"coarse", "fine"} <= stages
    nodes = mrml.applyJob(job, computed, inputVolume=volume)
    assert int((mrml.segmentArray(nodes["segmentation"], volume) != sitk.GetArrayFromImage(label)).sum()) == 0
    text = mrml.summaryText(computed, job, 1.0)
    assert "mL" in text and "UNTRAINED" in text
    assert "\nQuality: review (volume " in text  # the phantom's ~19 mL "pancreas" is below the adult range


def test_empty_coarse_result_then_default_region(mrml, empty_bundle, forced_bundle):
    image, label = tu.phantom_case(shape_zyx=(40, 56, 56))
    volume = mrml.addVolumeFromImage(image, "ct")
    before = node_ids(mrml.scene)
    with pytest.raises(EmptyCoarseResult):
        mrml.findRegion(volume, model=str(empty_bundle), device="cpu")
    assert node_ids(mrml.scene) == before
    roi = mrml.defaultRegion(volume)
    inside = roi_voxel_mask(mrml, roi, volume)
    dims = np.array(inside.shape)
    assert np.isclose(inside.sum() / dims.prod(), 0.125, rtol=0.15)  # half the extent per axis
    centre = np.array(np.nonzero(inside)).mean(axis=1)
    assert np.allclose(centre, (dims - 1) / 2, atol=1.0)
    seg = mrml.segmentInRegion(volume, roi, model=str(forced_bundle), device="cpu")
    mask = mrml.segmentArray(seg, volume)
    assert int((mask * (1 - inside)).sum()) == 0 and mask.sum() > 0


def test_rotated_roi_is_reported(mrml, forced_bundle):
    image, _ = tu.phantom_case(shape_zyx=(40, 56, 56))
    volume = mrml.addVolumeFromImage(image, "ct")
    roi = mrml.findRegion(volume, model=str(forced_bundle), device="cpu")
    m = roi.GetObjectToNodeMatrix()
    rot = np.eye(4)
    t = np.deg2rad(25)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    current = mrml._matrixToArray(m)
    new = current.copy()
    new[:3, :3] = rot[:3, :3] @ current[:3, :3]
    roi.SetAndObserveObjectToNodeMatrix(mrml._arrayToMatrix(new))
    out = mrml.process(volume, roi=roi, model=str(forced_bundle), device="cpu")
    assert any("rotated" in w for w in out["report"]["warnings"])


def test_module_self_test_runs_headless(mrml):
    """PancreasC2FTest (what Slicer's ctest runs) passes on a slicer-core scene."""
    module.PancreasC2FTest().test_PancreasC2F_logic(mrml.scene)


def test_torch_description_names_build_and_device(mrml):
    text = mrml.ensureTorch()
    assert "PyTorch" in text and ("CPU" in text or "CUDA" in text or "GPU" in text)
    assert mrml._versionTuple("2.13.0+cpu") > mrml._versionTuple(module.MINIMUM_TORCH)


def test_real_resdsn_bundle_runs_through_the_logic(mrml, tiny_bundle):
    """A (random, width-4) ResDSN pair: the segment is on the input grid and its recorded
    volume matches the voxels stored in the node, whatever the network found."""
    image, _ = tu.phantom_case(shape_zyx=(40, 56, 56), axes=(1, 0, 2), flips=(True, False, True))
    volume = mrml.addVolumeFromImage(image, "ct")
    roi = mrml.defaultRegion(volume, fraction=0.6)
    seg = mrml.segmentInRegion(volume, roi, model=str(tiny_bundle), device="cpu", fineN=0)
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    mask = mrml.segmentArray(seg, volume)
    assert mask.shape == sitk.GetArrayViewFromImage(image).shape
    inside = roi_voxel_mask(mrml, roi, volume)
    assert int((mask * (1 - inside)).sum()) == 0
    stats = json.loads(seg.GetAttribute("PancreasC2F.statistics"))
    assert stats["voxels"] == int(mask.sum())
    assert json.loads(seg.GetAttribute("PancreasC2F.parameters"))["stages"]["fine"]["n"] == 0


def test_module_import_does_not_import_torch_or_the_library():
    """PyTorch is ensured at first use (it may not be installed yet when Slicer loads the module)."""
    import subprocess

    code = "import sys; sys.path.insert(0, sys.argv[1]); import PancreasC2F; print('torch' in sys.modules, 'PancreasC2FLib.pipelines' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(Path(module.__file__).parent)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_second_stage_reuses_the_first_stages_region_for_the_same_volume_and_model(mrml, tmp_path):
    """Roth's stage 2 is limited to the dilated stage-1 mask inside the adjusted ROI: "Segment in
    region" gets the region "Find pancreas region" found, unless the voxels or the model changed."""
    from test_roth_cascade import band_roth_bundle

    bundle = str(band_roth_bundle(tmp_path / "roth-band"))
    image, _ = tu.phantom_case()
    volume = mrml.addVolumeFromImage(image, "ct")
    roi = mrml.findRegion(volume, model=bundle, device="cpu")
    job = mrml.prepareJob("segment", volume, roi, model=bundle, device="cpu")
    assert job.previous is not None and job.previous.candidate_mask is not None
    computed = job.compute()
    candidate = computed["region"].candidate_mask.astype(bool)
    assert computed["result"].mask.sum() > 0 and not (computed["result"].mask.astype(bool) & ~candidate).any()
    # Another model's parameters, or edited voxels: the ROI alone.
    assert mrml.prepareJob("segment", volume, roi, model=bundle, device="cpu", minIslandFraction=0.5).previous is None
    volume.GetImageData().Modified()
    assert mrml.prepareJob("segment", volume, roi, model=bundle, device="cpu").previous is None


def test_pipeline_choice_checks_the_model_or_picks_its_shipped_one(mrml, forced_bundle, monkeypatch):
    """The panel's Pipeline choice means what --pipeline means: with a model, it must agree; with
    no model, the pipeline's shipped model."""
    from PancreasC2FLib.errors import InputError

    image, _ = tu.phantom_case(shape_zyx=(24, 32, 32))
    volume = mrml.addVolumeFromImage(image, "ct")
    job = mrml.prepareJob("both", volume, model=str(forced_bundle), device="cpu", pipeline=module.PIPELINE_FROM_MODEL)
    assert job.pipeline.bundle.pipeline == "resdsn-c2f"
    with pytest.raises(InputError, match="roth-cascade"):
        mrml.prepareJob("both", volume, model=str(forced_bundle), device="cpu", pipeline="roth-cascade")
    monkeypatch.setenv("PANCREAS_C2F_MODELS", str(forced_bundle.parent))
    chosen = []
    import PancreasC2FLib.io.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "default_model", lambda pipeline=None: chosen.append(pipeline) or forced_bundle.name)
    assert mrml.prepareJob("both", volume, device="cpu", pipeline="resdsn-c2f").pipeline.bundle.name == forced_bundle.name
    assert chosen == ["resdsn-c2f"]
    from PancreasC2FLib.pipelines import PIPELINES  # importing the package registers all of them

    assert set(module.PIPELINE_CHOICES[1:]) == set(PIPELINES)  # the panel offers every pipeline
