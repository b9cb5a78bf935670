"""PancreasC2F: coarse-to-fine pancreas segmentation in CT, as a 3D Slicer scripted module.

All computation is in the pure library ``PancreasC2FLib`` (packaged beside this module). This file
is the glue between it and MRML:

- ``PancreasC2FLogic`` converts volume nodes to SimpleITK images (exact geometry), runs the
  library, and turns its results into a markups ROI ("Pancreas region") and a segmentation node
  with one coded "Pancreas" segment. It opens no dialogs and works headless, also in plain Python
  with the ``slicer-core`` package (MRML and module logics without Qt; see ``createCoreScene``).
- ``PancreasC2FWidget`` runs the library's command line in a separate process (``PanelRun``): the
  volume (and ROI) are written to a temporary folder, a QTimer polls the process's JSON progress
  lines, Cancel kills the process tree, and the results are loaded on the main thread into the
  nodes captured when the run started. (A Python thread would barely run: Slicer's main thread
  holds the GIL while Qt's event loop runs.) ``PancreasC2FLogic.process`` stays in-process and
  synchronous for scripts and batch.

Runs on Slicer 5.6 and newer (Python 3.9): no Slicer API newer than 5.6 is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import unittest
from typing import Annotated

import numpy as np
import vtk

import slicer

try:  # the full application (Qt); absent in plain Python with slicer-core
    import qt
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_GUI = True
except ImportError:
    HAVE_GUI = False

    class ScriptedLoadableModule:  # minimal stand-ins so the logic imports without Qt
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass

    class VTKObservationMixin:
        pass


try:
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError:  # slicer-core: the wrapper needs the application's Qt layer

    def parameterNodeWrapper(cls):
        return cls

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)


from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

# Make PancreasC2FLib importable when it is packaged beside this module (see CMakeLists.txt) or
# when running from a source checkout (it sits one folder up).
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isfile(os.path.join(_candidate, "PancreasC2FLib", "__init__.py")) and _candidate not in sys.path:
        sys.path.append(_candidate)
        break

MINIMUM_TORCH = "2.1"
# The library's pure-Python dependencies (import name, requirement); numpy and SimpleITK come with Slicer.
DEPENDENCIES = (("safetensors", "safetensors>=0.4"), ("slicerio", "slicerio>=1.1"), ("tqdm", "tqdm"))
ROI_NAME = "Pancreas region"
SEGMENT_NAME = "Pancreas"
ATTRIBUTE_PREFIX = "PancreasC2F."
# Standard terminology (SNOMED CT 15776009 Pancreas), serialised as Slicer stores it.
PANCREAS_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^123037004^Anatomical Structure~SCT^15776009^Pancreas~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)
PANCREAS_COLOR = (0.976, 0.706, 0.431)
DEVICES = ["auto", "cpu", "cuda", "mps"]
# "from model": the pipeline the model records; a named pipeline without a model picks its shipped
# model (demo-synthetic, demo-roth-cascade, ...) and with a model checks that they agree (as --pipeline).
PIPELINE_FROM_MODEL = "from model"
PIPELINE_CHOICES = [PIPELINE_FROM_MODEL, "resdsn-c2f", "roth-cascade", "zhao-two-stage", "yu-rstn", "fang-ggpfn"]
# The spin boxes' lowest value, shown as "model default": the model's own value is used.
MODEL_DEFAULT = -1
# What every output records about the tool and the model (the keys of the pipeline's provenance).
PROVENANCE_KEYS = ("tool", "tool_version", "model_name", "model_version", "model_sha256", "pipeline", "trained", "license", "parameters")
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


#
# PancreasC2F
#


class PancreasC2F(ScriptedLoadableModule):
    """Module metadata (Slicer reads it when the module is loaded)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Pancreas C2F"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["PancreasC2F developers"]
        self.parent.helpText = """
Segments the pancreas in a CT volume in two stages (Zhu et al. 2018): a coarse network over the whole
scan finds the region, shown as the editable ROI "Pancreas region"; a fine network then segments
inside it. Use <b>Find pancreas region</b>, adjust the ROI if needed, then <b>Segment in region</b>;
or <b>Apply</b> for both stages. Results record the tool version, the model's sha256 and the
parameters. Command line and batch use: <code>pancreas-c2f</code> and <code>batch.py</code>.
<p>Methods:</p>
<ul>
<li>Z. Zhu, Y. Xia, W. Shen, E. K. Fishman, A. L. Yuille. A 3D coarse-to-fine framework for
volumetric medical image segmentation. 3DV 2018 (ResDSN C2F; the method implemented here).</li>
<li>H. R. Roth et al. An application of cascaded 3D fully convolutional networks for medical image
segmentation. Computerized Medical Imaging and Graphics 2018.</li>
<li>N. Zhao, N. Tong, D. Ruan, K. Sheng. Fully automated pancreas segmentation with two-stage 3D
convolutional neural networks. MICCAI 2019.</li>
<li>Q. Yu, L. Xie, Y. Wang, Y. Zhou, E. K. Fishman, A. L. Yuille. Recurrent saliency transformation
network: incorporating multi-stage visual cues for small organ segmentation. CVPR 2018.</li>
<li>C. Fang, G. Li, C. Pan, Y. Li, Y. Yu. Globally guided progressive fusion network for 3D pancreas
segmentation. MICCAI 2019.</li>
</ul>
<p>Not for clinical use.</p>
"""
        self.parent.acknowledgementText = """
The bundled demo weights were trained on synthetic CT generated from label maps of the
TotalSegmentator dataset (Wasserthal et al., Radiology: Artificial Intelligence 2023), used under
CC BY 4.0. Built on 3D Slicer, PyTorch, SimpleITK and slicerio.
"""


#
# PancreasC2FParameterNode
#


@parameterNodeWrapper
class PancreasC2FParameterNode:
    """
    inputVolume - the CT (Hounsfield units).
    roiNode - the region the fine stage runs in (made by "Find pancreas region", editable).
    outputSegmentation - receives the "Pancreas" segment (created when empty).
    model - registry name or bundle folder; empty: the default model (of the pipeline, if one is chosen).
    pipeline - "from model", or a pipeline: resdsn-c2f, roth-cascade, zhao-two-stage, yu-rstn, fang-ggpfn.
    device - auto, cpu, cuda or mps.
    coarseN, fineN - sliding-window n of each stage (MODEL_DEFAULT, shown as "model default": the model's value).
    marginMm - margin around the coarse result (MODEL_DEFAULT: the model's value).
    minIslandFraction - drop parts smaller than this fraction of the total (MODEL_DEFAULT: the model's value).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    roiNode: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    pipeline: Annotated[str, Choice(PIPELINE_CHOICES)] = PIPELINE_FROM_MODEL
    device: Annotated[str, Choice(DEVICES)] = "auto"
    coarseN: Annotated[int, WithinRange(-1, 30)] = -1
    fineN: Annotated[int, WithinRange(-1, 30)] = -1
    marginMm: Annotated[float, WithinRange(-1.0, 100.0)] = -1.0
    minIslandFraction: Annotated[float, WithinRange(-1.0, 1.0)] = -1.0


#
# Panel runs (pure Python: usable and testable without Qt)
#


def modelDefault(value, cast):
    """A spin box's value as an override: ``MODEL_DEFAULT`` (or None) means the model's own value;
    any other negative value is refused, so "model default" is one clear state."""
    if value is None or value == MODEL_DEFAULT:
        return None
    if value < 0:
        from PancreasC2FLib.errors import InputError

        raise InputError(f"{value} is not allowed: use 0 or more, or \"model default\"")
    return cast(value)


class PanelRun:
    """One panel job running in a separate process. The nodes are the ones selected when it
    started: its results go there, whatever is selected when it ends."""

    def __init__(self, kind, inputVolume, roiNode, segmentationNode, geometry, process):
        self.kind = kind  # "region", "segment" or "both"
        self.inputVolume = inputVolume
        self.roiNode = roiNode
        self.segmentationNode = segmentationNode
        self.geometry = geometry  # volume IJKToRAS (4x4 numpy) and parent transform id, at start
        self.process = process  # PancreasC2FLib.apps.segment_process.SegmentProcess
        self.folder = process.folder
        self.stages = []  # stage names in the order the process reported them

    @property
    def done(self) -> bool:
        return self.process.done

    def cancel(self) -> None:
        self.process.cancel()

    def output(self, name):
        return os.path.join(str(self.folder), name)


#
# PancreasC2FWidget
#


class PancreasC2FWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: parameters through the parameter node, work in a ``PanelRun`` (a separate
    process polled by a QTimer), results applied by the logic on the main thread."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run: PanelRun | None = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PancreasC2F.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = PancreasC2FLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._pollRun)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.findRegionButton.connect("clicked(bool)", self.onFindRegion)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentInRegion)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.defaultRoiButton.connect("clicked(bool)", self.onDefaultRoi)
        self.ui.defaultRoiButton.setVisible(False)
        self.ui.progressBar.setVisible(False)
        self.ui.modelLineEdit.setToolTip("Registry name (pancreas-c2f models) or model bundle folder; empty: the default model")
        # "model default" is the lowest value only: values between it and 0 snap to it (the
        # integer boxes have none).
        for spinBox in (self.ui.marginSpinBox, self.ui.minIslandSpinBox):
            spinBox.connect("valueChanged(double)", lambda value, box=spinBox: self._snapToModelDefault(box, value))

        self.initializeParameterNode()
        self._offerRunnablePipelines()

    def _snapToModelDefault(self, spinBox, value) -> None:
        if MODEL_DEFAULT < value < 0:
            spinBox.value = MODEL_DEFAULT

    def _offerRunnablePipelines(self) -> None:
        """Disable the pipelines that have no model installed (and say why)."""
        try:
            runnable = self.logic.pipelinesWithModels()
        except Exception as exc:  # a broken install must not break the panel: the run reports it
            logging.warning(f"PancreasC2F: could not list the installed models: {exc}")
            return
        if runnable is None:  # PyTorch is not installed yet: the check comes with the first run
            return
        model = self.ui.pipelineComboBox.model()
        for index in range(self.ui.pipelineComboBox.count):
            name = self.ui.pipelineComboBox.itemText(index)
            if name != PIPELINE_FROM_MODEL and name not in runnable:
                item = model.item(index) if hasattr(model, "item") else None
                if item is not None:
                    item.setEnabled(False)
                    item.setToolTip(f"No model for {name} is installed: give a model bundle folder in Model, or choose another pipeline")

    def cleanup(self) -> None:
        if self._run is not None:
            self._run.cancel()
            shutil.rmtree(str(self._run.folder), ignore_errors=True)
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:  # its nodes go with the scene: the result is discarded
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._run is not None
        p = self._parameterNode
        hasInput = bool(p and p.inputVolume)
        self.ui.findRegionButton.enabled = hasInput and not running
        self.ui.segmentButton.enabled = hasInput and bool(p and p.roiNode) and not running
        self.ui.applyButton.enabled = hasInput or running
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.toolTip = "Stop the running stage; the scene stays as it was" if running else "Find the region, then segment in it"
        # The inputs are locked during a run (its results go to the nodes it started with).
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.parametersCollapsibleButton.enabled = not running

    # --- actions ---------------------------------------------------------------------------

    def _params(self) -> dict:
        p = self._parameterNode
        return {"model": p.model or None, "pipeline": p.pipeline, "device": p.device, "coarseN": p.coarseN, "fineN": p.fineN, "marginMm": p.marginMm, "minIslandFraction": p.minIslandFraction}

    def _prepare(self) -> bool:
        """Main thread: make sure the dependencies are there, asking once before installing."""
        try:
            missing = self.logic.missingDependencies()
        except RuntimeError as exc:  # an older PyTorch: never upgraded silently
            slicer.util.errorDisplay(str(exc))
            return False
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                "Pancreas C2F needs these Python packages, which are not installed:\n\n  " + "\n  ".join(missing)
                + "\n\nInstall them now? PyTorch comes through the PyTorch extension when it is installed (the build that fits "
                "this computer's GPU), otherwise from pip. This can take several minutes."
            ):
                return False
            try:
                with slicer.util.tryWithErrorDisplay("The packages could not be installed.", waitCursor=True):
                    self.logic.installDependencies(missing)
            except Exception:
                return False
            self._offerRunnablePipelines()
        self._setStatus(self.logic.torchDescription())
        return True

    def onFindRegion(self) -> None:
        self._start("region")

    def onSegmentInRegion(self) -> None:
        self._start("segment")

    def onApply(self) -> None:
        if self._run is not None:
            self._run.cancel()  # the timer sees it end and discards it
            self._setStatus("Cancelling ...")
            return
        self._start("both")

    def onDefaultRoi(self) -> None:
        p = self._parameterNode
        roi = self.logic.defaultRegion(p.inputVolume, p.roiNode)
        p.roiNode = roi
        self.ui.defaultRoiButton.setVisible(False)
        self._setStatus("A default region in the middle of the volume was placed. Adjust it around the pancreas, then click \"Segment in region\".")

    def _start(self, kind: str) -> None:
        p = self._parameterNode
        if not p.inputVolume:
            return
        if not self._prepare():
            return
        self.ui.defaultRoiButton.setVisible(False)
        try:
            # The inputs are written and the nodes captured here, on the main thread.
            run = self.logic.startRun(kind, p.inputVolume, p.roiNode, p.outputSegmentation, **self._params())
        except Exception as exc:
            slicer.util.errorDisplay(f"Cannot start: {exc}")
            return
        self._run = run
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = "Starting: %p%"
        self._setStatus("Starting the segmentation process ...")
        self._updateButtons()
        self._timer.start()

    def _pollRun(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        events = run.process.poll()
        if events:
            from PancreasC2FLib.progress import describe

            event = events[-1]
            value, label = self.logic.progressValue(run, event)
            self.ui.progressBar.value = value
            self.ui.progressBar.format = f"{label}: %p%"
            self.ui.statusLabel.text = describe(event)
        if not run.done:
            return
        self._timer.stop()
        self.ui.progressBar.setVisible(False)
        self._run = None
        try:
            self._finish(run)
        finally:
            self._updateButtons()

    def _finish(self, run: PanelRun) -> None:
        from PancreasC2FLib.errors import Cancelled, EmptyCoarseResult

        try:
            nodes, report = self.logic.finishRun(run)
        except Cancelled as exc:
            self._setStatus(f"{exc} The scene was left as it was.")
            return
        except EmptyCoarseResult:
            self._setStatus(
                "The coarse stage found no pancreas in this scan. Draw the region yourself, or click "
                "\"Use a default region\" to place one in the middle of the volume and adjust it; then click \"Segment in region\"."
            )
            self.ui.defaultRoiButton.setVisible(True)
            return
        except Exception as exc:
            logging.error(f"PancreasC2F: {exc}")
            self._setStatus(f"Failed: {exc}")
            slicer.util.errorDisplay(f"Pancreas segmentation failed: {exc}")
            return
        p = self._parameterNode
        if p is not None and p.inputVolume is not None and p.inputVolume.GetID() == run.inputVolume.GetID():  # show what was made for it
            if nodes.get("roi") is not None:
                p.roiNode = nodes["roi"]
            if nodes.get("segmentation") is not None:
                p.outputSegmentation = nodes["segmentation"]
        if nodes.get("segmentation") is not None:
            nodes["segmentation"].CreateClosedSurfaceRepresentation()
        self._setStatus(self.logic.reportSummary(report, run.process.elapsed))

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.app.processEvents()


#
# PancreasC2FLogic
#


class Job:
    """What a worker thread computes: built on the main thread from copies of the scene's data."""

    def __init__(self, kind, pipeline, image, roiDict, geometry, previous=None):
        self.kind = kind  # "region", "segment" or "both"
        self.pipeline = pipeline
        self.image = image  # SimpleITK copy of the input volume (LPS)
        self.roiDict = roiDict  # markups ROI document (RAS) for kind "segment"
        self.geometry = geometry  # volume IJKToRAS (4x4 numpy) and parent transform id
        self.previous = previous  # the region the first stage found for this volume and model, if any
        self.case = None

    @property
    def deviceDescription(self) -> str:
        return str(self.pipeline.device)

    def compute(self, progress=None, cancel=None):
        """Pure computation (any thread): returns {"case", "region", "result"}."""
        p = self.pipeline
        case = p.prepare(self.image)
        if self.kind == "segment":
            # With the first stage's own region (Roth's dilated mask, RSTN's coarse map), the
            # second stage is limited to it inside the adjusted ROI, as in the papers.
            region = p.region_from_roi(case, self.roiDict, previous=self.previous)
        else:
            region = p.find_region(case, progress, cancel)
        result = p.segment_region(case, region, progress, cancel) if self.kind != "region" else None
        return {"case": case, "region": region, "result": result}


class PancreasC2FLogic(ScriptedLoadableModuleLogic):
    """All computation, usable without the widget (no dialogs).

    ``scene``: the MRML scene to work in; default ``slicer.mrmlScene`` (in plain Python with
    slicer-core pass the scene made by ``createCoreScene``)."""

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self._bundles = {}
        self._lastRegion = None  # (key, Region) of the last "Find pancreas region"

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        return PancreasC2FParameterNode(super().getParameterNode())

    # --- dependencies (at first use, never at import) ---------------------------------------

    @staticmethod
    def torchAvailable() -> bool:
        try:
            import torch  # noqa: F401
        except ImportError:
            return False
        return True

    @staticmethod
    def _versionTuple(v: str) -> tuple:
        out = []
        for part in v.split("+")[0].split(".")[:3]:
            digits = "".join(ch for ch in part if ch.isdigit())
            out.append(int(digits) if digits else 0)
        return tuple(out)

    def missingDependencies(self, minimumVersion: str = MINIMUM_TORCH) -> list:
        """The requirements to install before a run (empty when all are there). An installed
        PyTorch older than ``minimumVersion`` raises RuntimeError with advice: it is never
        upgraded silently (other extensions may depend on it)."""
        missing = []
        try:
            import torch
        except ImportError:
            missing.append(f"torch>={minimumVersion}")
        else:
            if self._versionTuple(torch.__version__) < self._versionTuple(minimumVersion):
                raise RuntimeError(
                    f"PyTorch {torch.__version__} is installed, but Pancreas C2F needs {minimumVersion} or later. It is not upgraded "
                    "automatically: update it in the PyTorch Utils module (PyTorch extension) or with "
                    f"slicer.util.pip_install('torch>={minimumVersion}'), then restart Slicer."
                )
        for module, requirement in DEPENDENCIES:
            try:
                __import__(module)
            except ImportError:
                missing.append(requirement)
        return missing

    @staticmethod
    def installDependencies(requirements) -> None:
        """Install ``requirements`` (from ``missingDependencies``): PyTorch through the PyTorch
        extension's ``PyTorchUtils`` when present (it picks the CUDA or CPU build for this
        machine), else pip; the others with ``slicer.packaging.pip_ensure`` where this Slicer has
        it, else ``slicer.util.pip_install``."""
        others = []
        for requirement in requirements:
            if not requirement.startswith("torch"):
                others.append(requirement)
                continue
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.pip_install(requirement)
            else:
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement[len("torch"):]) is None:
                    raise RuntimeError("PyTorch could not be installed; install it in the PyTorch Utils module and retry")
        if others:
            packaging = getattr(slicer, "packaging", None)
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                packaging.pip_ensure(others)
            else:
                slicer.util.pip_install(" ".join(others))  # a string: what pip_install takes on every Slicer

    def ensureTorch(self, minimumVersion: str = MINIMUM_TORCH) -> str:
        """Headless use (batch): install a missing PyTorch (never upgrade an older one: that
        raises with advice). Returns a line naming the torch build and the device it will use."""
        missing = [r for r in self.missingDependencies(minimumVersion) if r.startswith("torch")]
        if missing:
            self.installDependencies(missing)
        return self.torchDescription()

    @staticmethod
    def torchDescription() -> str:
        import torch

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
        if torch.cuda.is_available():
            device = "GPU " + torch.cuda.get_device_name(0)
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "Apple GPU (mps)"
        else:
            device = f"CPU, {torch.get_num_threads()} threads"
        return f"PyTorch {torch.__version__} ({build}); device: {device}"

    def ensureDependencies(self) -> None:
        """Headless use (batch): the library's small pure-Python dependencies (numpy and SimpleITK
        come with Slicer)."""
        missing = [r for r in self.missingDependencies() if not r.startswith("torch")]
        if missing:
            self.installDependencies(missing)

    # --- models and pipelines ---------------------------------------------------------------

    @staticmethod
    def pipelinesWithModels():
        """The pipelines that have an installed model (the panel offers only these), or None
        when PyTorch is not installed yet (the library needs it to read models)."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return None
        from PancreasC2FLib.io.bundle import available_models, default_model

        models = available_models()
        return [name for name in PIPELINE_CHOICES[1:] if default_model(name) in models]

    @staticmethod
    def defaultModelName() -> str:
        from PancreasC2FLib.io.bundle import DEFAULT_MODEL

        return DEFAULT_MODEL

    def bundle(self, model=None, pipeline=None):
        from PancreasC2FLib.io.bundle import load_bundle, resolve_model

        path = resolve_model(model, None if pipeline in (None, PIPELINE_FROM_MODEL) else pipeline)
        key = (str(path), max((f.stat().st_mtime_ns for f in path.iterdir()), default=0) if path.is_dir() else 0)
        if key not in self._bundles:
            self._bundles = {key: load_bundle(path)}  # keep one: bundles hold the networks
        return self._bundles[key]

    @staticmethod
    def commandOptions(model=None, device="auto", coarseN=MODEL_DEFAULT, fineN=MODEL_DEFAULT, marginMm=MODEL_DEFAULT, minIslandFraction=MODEL_DEFAULT, deterministic=False, preset=None, pipeline=None, threads=None, batchSize=None) -> dict:
        """The module's parameters as the command line's options (``MODEL_DEFAULT``: None, the
        model's own value), keyed like its argparse namespace."""
        return {
            "model": model or None, "pipeline": None if pipeline in (None, PIPELINE_FROM_MODEL) else pipeline, "device": device or "auto",
            "threads": threads, "batch_size": batchSize, "preset": preset, "coarse_n": modelDefault(coarseN, int), "fine_n": modelDefault(fineN, int),
            "margin_mm": modelDefault(marginMm, float), "min_island_fraction": modelDefault(minIslandFraction, float), "deterministic": bool(deterministic),
        }

    def createPipeline(self, model=None, device="auto", coarseN=MODEL_DEFAULT, fineN=MODEL_DEFAULT, marginMm=MODEL_DEFAULT, minIslandFraction=MODEL_DEFAULT, deterministic=False, preset=None, pipeline=None, threads=None, batchSize=None):
        """A library pipeline with the module's parameters (``MODEL_DEFAULT``: the model's own
        value); the overrides mean exactly what the command line's options mean."""
        import argparse

        from PancreasC2FLib.pipelines.options import pipeline_from_args

        args = argparse.Namespace(**self.commandOptions(model, device, coarseN, fineN, marginMm, minIslandFraction, deterministic, preset, pipeline, threads, batchSize))
        return pipeline_from_args(args, self.bundle(model, args.pipeline))

    # --- geometry: volume node <-> SimpleITK, ROI node <-> markups document ------------------

    @staticmethod
    def _matrixToArray(m) -> np.ndarray:
        return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])

    @staticmethod
    def _arrayToMatrix(a) -> vtk.vtkMatrix4x4:
        m = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, float(a[r][c]))
        return m

    def ijkToRas(self, volumeNode) -> np.ndarray:
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        return self._matrixToArray(m)

    def imageFromVolume(self, volumeNode):
        """A SimpleITK copy of a scalar volume node, on the exact same grid (LPS physical space).
        The volume's own (local) coordinates are used: results go under the same parent transform."""
        import SimpleITK as sitk
        from vtk.util import numpy_support

        imageData = volumeNode.GetImageData() if volumeNode else None
        if imageData is None or imageData.GetPointData().GetScalars() is None:
            raise ValueError("the input volume has no image data")
        if imageData.GetNumberOfScalarComponents() != 1:
            raise ValueError("the input volume has several components per voxel; a scalar CT volume is needed")
        dims = imageData.GetDimensions()
        array = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        image = sitk.GetImageFromArray(np.array(array, copy=True))  # copy: the worker must not share MRML memory
        lps = _LPS_RAS @ self.ijkToRas(volumeNode)[:3, :]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        image.SetSpacing([float(v) for v in spacing])
        image.SetDirection([float(v) for v in (lps[:, :3] / spacing).ravel()])
        image.SetOrigin([float(v) for v in lps[:, 3]])
        return image

    def addVolumeFromImage(self, image, name="CT"):
        """A scalar volume node holding a SimpleITK image (exact geometry); for batch and tests."""
        import SimpleITK as sitk
        from vtk.util import numpy_support

        array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
        imageData = vtk.vtkImageData()
        imageData.SetDimensions(image.GetSize())
        scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
        imageData.GetPointData().SetScalars(scalars)
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", self.scene.GenerateUniqueName(name))
        node.SetAndObserveImageData(imageData)
        d = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())[None, :]
        m = np.eye(4)
        m[:3, :3] = _LPS_RAS @ d
        m[:3, 3] = _LPS_RAS @ np.array(image.GetOrigin())
        node.SetIJKToRASMatrix(self._arrayToMatrix(m))
        node.CreateDefaultDisplayNodes()
        return node

    def _toVolumeFrame(self, node, volumeNode) -> np.ndarray:
        """4x4 from ``node``'s local coordinates to the volume's local coordinates (linear
        transforms only)."""
        return self._betweenFrames(node.GetParentTransformNode(), volumeNode.GetParentTransformNode())

    def _betweenFrames(self, fromTransform, toTransform) -> np.ndarray:
        """4x4 from the coordinates under transform node ``fromTransform`` to those under
        ``toTransform`` (None: world; linear transforms only)."""
        if fromTransform is toTransform:
            return np.eye(4)
        m = vtk.vtkMatrix4x4()
        if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(fromTransform, toTransform, m):
            raise ValueError("the nodes are under different non-linear transforms; harden the transforms first")
        return self._matrixToArray(m)

    def roiDictFromNode(self, roiNode, volumeNode) -> dict:
        """The ROI as a markups document (RAS) in the volume's coordinates."""
        t = self._toVolumeFrame(roiNode, volumeNode)
        objectToNode = self._matrixToArray(roiNode.GetObjectToNodeMatrix())
        objectToVolume = t @ objectToNode
        axes = objectToVolume[:3, :3]
        scale = np.linalg.norm(axes, axis=0)
        size = np.array(roiNode.GetSize(), float) * scale
        return {
            "markups": [
                {
                    "type": "ROI",
                    "coordinateSystem": "RAS",
                    "center": [float(v) for v in objectToVolume[:3, 3]],
                    "size": [float(v) for v in size],
                    "orientation": [float(v) for v in (axes / scale).ravel()],
                }
            ]
        }

    def updateRoiNodeFromDict(self, roiNode, roiDict) -> None:
        """Place a markups ROI node from a library ROI document (LPS or RAS)."""
        m = roiDict["markups"][0]
        center = np.array(m["center"], float)
        axes = np.array(m.get("orientation", [1, 0, 0, 0, 1, 0, 0, 0, 1]), float).reshape(3, 3)
        if m.get("coordinateSystem", "LPS").upper() == "LPS":
            center = _LPS_RAS @ center
            axes = _LPS_RAS @ axes
        matrix = np.eye(4)
        matrix[:3, :3] = axes
        matrix[:3, 3] = center
        wasModifying = roiNode.StartModify()
        roiNode.SetAndObserveObjectToNodeMatrix(self._arrayToMatrix(matrix))
        roiNode.SetCenter(*[float(v) for v in center])
        roiNode.SetSize(*[float(v) for v in m["size"]])
        if m.get("description"):
            roiNode.SetDescription(m["description"])
        roiNode.EndModify(wasModifying)

    # --- jobs: prepare (main thread), compute (any thread), apply (main thread) ---------------

    def prepareJob(self, kind, inputVolume, roiNode=None, **params):
        if inputVolume is None:
            raise ValueError("no input volume")
        if kind == "segment" and roiNode is None:
            raise ValueError("no region: run \"Find pancreas region\" or place a markups ROI")
        pipeline = self.createPipeline(**params)
        image = self.imageFromVolume(inputVolume)
        roiDict = self.roiDictFromNode(roiNode, inputVolume) if kind == "segment" else None
        geometry = {"ijkToRas": self.ijkToRas(inputVolume), "transformId": inputVolume.GetTransformNodeID()}
        key = self._regionKey(pipeline, inputVolume)
        previous = self._lastRegion[1] if kind == "segment" and self._lastRegion is not None and self._lastRegion[0] == key else None
        return Job(kind, pipeline, image, roiDict, geometry, previous)

    @staticmethod
    def _regionKey(pipeline, inputVolume) -> str:
        """What a found region depends on: the volume (and its voxels' last change) and the model
        with its parameters. A region is reused by "Segment in region" only when this matches."""
        provenance = pipeline.provenance()
        imageData = inputVolume.GetImageData()
        return json.dumps([inputVolume.GetID(), imageData.GetMTime() if imageData is not None else 0, provenance.get("model_sha256"), provenance.get("parameters")], sort_keys=True, default=str)

    def applyJob(self, job, computed, roiNode=None, segmentationNode=None, inputVolume=None) -> dict:
        """Main thread: store a finished job in the scene (ROI for the coarse stage, "Pancreas"
        segment for the fine one), beside ``inputVolume`` in the subject hierarchy. Returns the
        nodes written."""
        nodes = {"roi": None, "segmentation": None}
        created = {"roi": roiNode is None, "segmentation": segmentationNode is None}
        provenance = job.pipeline.provenance()
        if job.kind in ("region", "both"):
            if inputVolume is not None:  # kept (the last one only) for the second stage
                self._lastRegion = (self._regionKey(job.pipeline, inputVolume), computed["region"])
            roiDict = job.pipeline.roi_for(computed["case"], computed["region"])
            nodes["roi"] = self._writeRoi(roiNode, roiDict, job.geometry, provenance)
        if computed.get("result") is not None:
            nodes["segmentation"] = self._writeSegmentation(segmentationNode, computed["result"], job.geometry, provenance, inputVolume)
        if inputVolume is not None:  # only new nodes: the user's own stay where they are
            for key, node in nodes.items():
                if node is not None and created[key]:
                    self.placeInStudy(node, inputVolume)
        return nodes

    # --- panel runs: the command line in a separate process ---------------------------------

    def startRun(self, kind, inputVolume, roiNode=None, segmentationNode=None, python=None, **params) -> PanelRun:
        """Main thread: write the volume (and, for kind "segment", the ROI) to a temporary folder
        and start ``python -m PancreasC2FLib segment ...`` on it; returns at once. Poll
        ``run.process.poll()`` for progress, then call ``finishRun`` once ``run.done``."""
        import SimpleITK as sitk

        from PancreasC2FLib.apps.segment_process import SegmentProcess, python_executable, segment_command

        if inputVolume is None:
            raise ValueError("no input volume")
        if kind == "segment" and roiNode is None:
            raise ValueError("no region: run \"Find pancreas region\" or place a markups ROI")
        options = self.commandOptions(**params)  # bad values fail here, before anything is written
        folder = tempfile.mkdtemp(prefix="PancreasC2F-")
        try:
            inputPath = os.path.join(folder, "input.nrrd")
            sitk.WriteImage(self.imageFromVolume(inputVolume), inputPath)
            roiPath = None
            if kind == "segment":
                roiPath = os.path.join(folder, "input-roi.mrk.json")
                with open(roiPath, "w", encoding="utf-8") as f:
                    json.dump(self.roiDictFromNode(roiNode, inputVolume), f)
            command = segment_command(python or python_executable(), inputPath, folder, kind, roiPath, options)
            process = SegmentProcess(command, folder, self._childEnvironment()).start()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        geometry = {"ijkToRas": self.ijkToRas(inputVolume), "transformId": inputVolume.GetTransformNodeID()}
        return PanelRun(kind, inputVolume, roiNode, segmentationNode, geometry, process)

    @staticmethod
    def _childEnvironment():
        """Inside Slicer, the environment Slicer was started with (the PythonSlicer launcher sets
        up its own paths, as ``slicer.util.launchConsoleProcess`` does); else this process's."""
        from PancreasC2FLib.apps.segment_process import child_environment

        startup = getattr(getattr(slicer, "util", None), "startupEnvironment", None)
        return child_environment(startup() if HAVE_GUI and startup is not None else None)

    def _inScene(self, node) -> bool:
        return node is not None and self.scene.GetNodeByID(node.GetID()) is node

    def finishRun(self, run: PanelRun):
        """Main thread, once ``run.done``: load the results into the nodes captured at start.
        Returns (nodes, report). A cancelled run, or one whose nodes left the scene (closed,
        deleted), is discarded (``Cancelled``); a failed one raises the error its exit code
        stands for, with the process's message. The temporary folder is removed, except its
        log after a failure."""
        from PancreasC2FLib.errors import Cancelled, PancreasC2FError

        process = run.process
        try:
            if process.cancelled:
                raise Cancelled("Cancelled.")
            if not self._inScene(run.inputVolume) or any(n is not None and not self._inScene(n) for n in (run.roiNode, run.segmentationNode)):
                raise Cancelled("The run's volume, region or segmentation left the scene: its result was discarded.")
            code = process.returncode
            if code != 0:
                error = next((c for c in _errorClasses() if c.exit_code == code), PancreasC2FError)
                raise error(f"{process.error_message()} (log: {process.log_path})")
            with open(run.output("report.json"), encoding="utf-8") as f:
                report = json.load(f)
            nodes = self._applyRunOutputs(run, report)
        except BaseException as exc:
            keepLog = not isinstance(exc, Cancelled)
            self._removeRunFolder(run, keepLog)
            raise
        self._removeRunFolder(run, False)
        return nodes, report

    @staticmethod
    def _removeRunFolder(run, keepLog) -> None:
        if not keepLog:
            shutil.rmtree(str(run.folder), ignore_errors=True)
            return
        for name in os.listdir(str(run.folder)):
            path = os.path.join(str(run.folder), name)
            if name == os.path.basename(str(run.process.log_path)):
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)

    def _applyRunOutputs(self, run, report) -> dict:
        import types

        import SimpleITK as sitk

        provenance = {k: report[k] for k in PROVENANCE_KEYS if k in report}
        nodes = {"roi": None, "segmentation": None}
        created = []
        if run.kind in ("region", "both"):
            with open(run.output("roi.mrk.json"), encoding="utf-8") as f:
                roiDict = json.load(f)
            if run.roiNode is None:
                created.append("roi")
            nodes["roi"] = self._writeRoi(run.roiNode, roiDict, run.geometry, provenance)
        if run.kind != "region":
            result = types.SimpleNamespace(
                label=sitk.ReadImage(run.output("label.nrrd"), sitk.sitkUInt8),
                statistics={"volume_ml": report["pancreas_volume_ml"], "mean_hu": report["pancreas_mean_hu"], "voxels": report["pancreas_voxels"]},
                flags={"touches_box": report["touches_region_border"], "touches_image_border": report["touches_image_border"], "empty": report["empty"]},
            )
            if run.segmentationNode is None:
                created.append("segmentation")
            nodes["segmentation"] = self._writeSegmentation(run.segmentationNode, result, run.geometry, provenance, run.inputVolume)
        for key in created:  # only new nodes go beside the input in the subject hierarchy
            self.placeInStudy(nodes[key], run.inputVolume)
        return nodes

    @staticmethod
    def progressValue(run, event) -> tuple:
        """(percent of the whole run, stage name) for a progress event: with both stages, the
        first stage the run reports fills the first half of the bar."""
        stages = run.stages
        if event["stage"] not in stages:
            stages.append(event["stage"])
        offset, width = (0.0, 1.0) if run.kind != "both" else ((0.0, 0.5) if stages.index(event["stage"]) == 0 else (0.5, 0.5))
        return int(round(100 * (offset + width * float(event["fraction"])))), event["stage"]

    def _setProvenance(self, node, provenance) -> None:
        node.SetAttribute(ATTRIBUTE_PREFIX + "provenance", json.dumps(provenance, sort_keys=True))
        node.SetAttribute(ATTRIBUTE_PREFIX + "toolVersion", str(provenance.get("tool_version", "")))
        node.SetAttribute(ATTRIBUTE_PREFIX + "modelName", str(provenance.get("model_name", "")))
        node.SetAttribute(ATTRIBUTE_PREFIX + "modelSha256", str(provenance.get("model_sha256", "")))
        node.SetAttribute(ATTRIBUTE_PREFIX + "parameters", json.dumps(provenance.get("parameters", {}), sort_keys=True))

    def _writeRoi(self, roiNode, roiDict, geometry, provenance):
        if roiNode is None:
            roiNode = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", ROI_NAME)
        roiNode.SetName(ROI_NAME)
        roiNode.SetAndObserveTransformNodeID(geometry["transformId"])
        self.updateRoiNodeFromDict(roiNode, roiDict)
        if roiNode.GetDisplayNode() is None:
            roiNode.CreateDefaultDisplayNodes()
        display = roiNode.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
        self._setProvenance(roiNode, provenance)
        return roiNode

    def _orientedLabel(self, label, geometry, toNodeFrame=None):
        """A vtkOrientedImageData holding a uint8 SimpleITK label on the volume's grid
        (``toNodeFrame``: 4x4 from the volume's coordinates to the receiving node's)."""
        import SimpleITK as sitk
        from vtk.util import numpy_support

        array = np.ascontiguousarray(sitk.GetArrayViewFromImage(label), dtype=np.uint8)
        oriented = slicer.vtkOrientedImageData()
        oriented.SetDimensions(label.GetSize())
        oriented.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        imageToWorld = geometry["ijkToRas"] if toNodeFrame is None else toNodeFrame @ geometry["ijkToRas"]
        oriented.SetImageToWorldMatrix(self._arrayToMatrix(imageToWorld))
        return oriented

    def _writeSegmentation(self, segmentationNode, result, geometry, provenance, inputVolume=None):
        toNodeFrame = None
        if segmentationNode is None:
            segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName("Pancreas segmentation"))
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetAndObserveTransformNodeID(geometry["transformId"])
            if inputVolume is not None:
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        else:
            # The user's segmentation keeps its transform, reference geometry and other segments:
            # only the Pancreas segment is added or replaced (resampled to its geometry).
            toNodeFrame = self._betweenFrames(self.scene.GetNodeByID(geometry["transformId"]) if geometry["transformId"] else None, segmentationNode.GetParentTransformNode())
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentation.GetSegmentIdBySegmentName(SEGMENT_NAME)
        if not segmentId:
            segmentId = segmentation.AddEmptySegment(SEGMENT_NAME, SEGMENT_NAME, list(PANCREAS_COLOR))
        if segmentation.GetNumberOfSegments() > 1:
            # A layer of its own: the other segments' voxels are neither overwritten nor resampled.
            segmentation.SeparateSegmentLabelmap(segmentId)
        oriented = self._orientedLabel(result.label, geometry, toNodeFrame)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(oriented, segmentationNode, segmentId):
            raise RuntimeError("could not store the pancreas mask in the segmentation")
        segment = segmentation.GetSegment(segmentId)
        segment.SetName(SEGMENT_NAME)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*PANCREAS_COLOR)
        segment.SetColorAutoGenerated(False)
        # SetTag with the terminology tag is how every Slicer since 4.x stores it (SetTerminology is 5.10+).
        segment.SetTag(segment.GetTerminologyEntryTagName(), PANCREAS_TERMINOLOGY)
        # Short provenance as segment tags: they are saved in the .seg.nrrd header.
        segment.SetTag(ATTRIBUTE_PREFIX + "toolVersion", str(provenance.get("tool_version", "")))
        segment.SetTag(ATTRIBUTE_PREFIX + "modelSha256", str(provenance.get("model_sha256", "")))
        segment.SetTag(ATTRIBUTE_PREFIX + "volumeMl", str(result.statistics["volume_ml"]))
        self._setProvenance(segmentationNode, provenance)
        segmentationNode.SetAttribute(ATTRIBUTE_PREFIX + "statistics", json.dumps(result.statistics, sort_keys=True))
        segmentationNode.SetAttribute(ATTRIBUTE_PREFIX + "flags", json.dumps({k: bool(v) for k, v in result.flags.items()}, sort_keys=True))
        return segmentationNode

    def placeInStudy(self, node, inputVolume) -> None:
        """Put ``node`` beside the input volume in the subject hierarchy (its study), if any."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if shNode is None:
            return
        volumeItem = shNode.GetItemByDataNode(inputVolume)
        if not volumeItem:
            return
        parent = shNode.GetItemParent(volumeItem)
        item = shNode.GetItemByDataNode(node)
        if not item:
            item = shNode.CreateItem(parent, node)
        else:
            shNode.SetItemParent(item, parent)

    # --- the headless API --------------------------------------------------------------------

    def runStage(self, kind, inputVolume, roiNode=None, segmentationNode=None, progress=None, cancel=None, **params):
        """Prepare, compute and apply one job (``kind``: "region", "segment" or "both") on the
        calling thread. Returns (job, computed, nodes)."""
        job = self.prepareJob(kind, inputVolume, roiNode, **params)
        computed = job.compute(progress, cancel)  # nothing in the scene changes before this ends
        nodes = self.applyJob(job, computed, roiNode=roiNode, segmentationNode=segmentationNode, inputVolume=inputVolume)
        return job, computed, nodes

    def findRegion(self, inputVolume, roiNode=None, progress=None, cancel=None, **params):
        """Coarse stage: returns the markups ROI (created, or ``roiNode`` updated) around the
        pancreas. Raises ``EmptyCoarseResult`` when nothing is found (then use ``defaultRegion``)."""
        return self.runStage("region", inputVolume, roiNode, None, progress, cancel, **params)[2]["roi"]

    def segmentInRegion(self, inputVolume, roiNode, segmentationNode=None, progress=None, cancel=None, **params):
        """Fine stage inside ``roiNode``: returns the segmentation node with the "Pancreas" segment."""
        return self.runStage("segment", inputVolume, roiNode, segmentationNode, progress, cancel, **params)[2]["segmentation"]

    def process(self, inputVolume, roi=None, segmentationNode=None, progress=None, cancel=None, **params) -> dict:
        """Both stages (or only the fine one inside ``roi``). Returns the nodes made or updated
        (``roi``, ``segmentation``), the library ``result`` and the ``report`` (a dict)."""
        from PancreasC2FLib.apps.report import build_report

        t0 = time.perf_counter()
        kind = "segment" if roi is not None else "both"
        job, computed, nodes = self.runStage(kind, inputVolume, roi, segmentationNode, progress, cancel, **params)
        if roi is not None:
            nodes["roi"] = roi
        report = build_report(job.pipeline, computed["case"], computed["region"], computed["result"], inputVolume.GetName(), {"slicer_nodes": {k: v.GetID() for k, v in nodes.items() if v is not None}})
        report["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
        return {**nodes, "result": computed["result"], "report": report}

    def defaultRegion(self, inputVolume, roiNode=None, fraction: float = 0.5):
        """A region in the middle of the volume (``fraction`` of its extent along each axis),
        aligned with its axes and snapped to its voxel grid: for when the coarse stage finds
        nothing. ``roiNode`` is updated, or a new "Pancreas region" is made."""
        from PancreasC2FLib.processing.geometry import Orientation, canonical_shape
        from PancreasC2FLib.io.roi import box_to_roi_dict

        image = self.imageFromVolume(inputVolume)
        orientation = Orientation.of(image)
        shape = canonical_shape(image, orientation)
        box = tuple((int(round(n * (1 - fraction) / 2)), max(int(round(n * (1 + fraction) / 2)), int(round(n * (1 - fraction) / 2)) + 1)) for n in shape)
        roiDict = box_to_roi_dict(image, orientation, box, description="PancreasC2F default region (the coarse stage found nothing)")
        node = self._writeRoi(roiNode, roiDict, {"transformId": inputVolume.GetTransformNodeID()}, {})
        self.placeInStudy(node, inputVolume)
        return node

    def saveSegmentation(self, segmentationNode, path) -> None:
        """Write a .seg.nrrd with MRML's own storage node (what Slicer's Save does)."""
        from PancreasC2FLib.io.outputs import atomic_path

        storage = self.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        try:
            with atomic_path(path) as tmp:
                storage.SetFileName(str(tmp))
                if not storage.WriteData(segmentationNode):
                    raise OSError(f"could not write {path}")
        finally:
            self.scene.RemoveNode(storage)

    def loadSegmentation(self, path, name=None):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or os.path.basename(str(path)).split(".")[0])
        storage = self.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            self.scene.RemoveNode(node)
            self.scene.RemoveNode(storage)
            raise OSError(f"could not read {path}")
        node.SetAndObserveStorageNodeID(storage.GetID())
        return node

    def segmentArray(self, segmentationNode, inputVolume, segmentName=SEGMENT_NAME) -> np.ndarray:
        """A segment as a uint8 numpy array (k, j, i) on the volume's grid (for checks)."""
        from vtk.util import numpy_support

        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentation.GetSegmentIdBySegmentName(segmentName)
        if not segmentId:
            raise KeyError(f"no segment named {segmentName!r}")
        labelmap = slicer.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
        reference = slicer.vtkOrientedImageData()
        reference.SetImageToWorldMatrix(self._arrayToMatrix(self.ijkToRas(inputVolume)))
        reference.SetExtent(inputVolume.GetImageData().GetExtent())
        reference.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        reference.GetPointData().GetScalars().Fill(0)
        dims = reference.GetDimensions()
        if labelmap.GetPointData().GetScalars() is None or labelmap.IsEmpty():
            return np.zeros((dims[2], dims[1], dims[0]), np.uint8)
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled, False, False):
            raise RuntimeError("could not resample the segment to the volume's grid")
        return (numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]) > 0).astype(np.uint8)

    @staticmethod
    def summaryText(computed, job, elapsed: float) -> str:
        """The panel's summary of an in-process job (see ``reportSummary``)."""
        from PancreasC2FLib.apps.report import build_report

        report = build_report(job.pipeline, computed["case"], computed["region"], computed["result"], "")
        return PancreasC2FLogic.reportSummary(report, elapsed)

    @staticmethod
    def reportSummary(report: dict, elapsed: float) -> str:
        """A few lines for the panel from a run's report (the command line's report.json)."""
        from PancreasC2FLib.processing.quality import summary_line

        times = ", ".join(f"{k.replace('_s', '')} {v:.1f} s" for k, v in report.get("timings_s", {}).items() if k not in ("load_s", "total_s"))
        lines = [f"Done in {elapsed:.1f} s ({times}) on {report.get('device')}."]
        if report.get("pancreas_volume_ml") is None:
            lines.append("Region found: adjust the ROI \"Pancreas region\" if needed, then click \"Segment in region\".")
        else:
            mean = report.get("pancreas_mean_hu")
            lines.append(f"Pancreas: {report['pancreas_volume_ml']:.1f} mL, mean {'n/a' if mean is None else f'{mean:.0f} HU'}.")
            lines.append(summary_line(report) + ".")
        if not report.get("trained", False):
            lines.append("Warning: this model is UNTRAINED (random weights): the result is meaningless.")
        lines += [f"Warning: {w}" for w in dict.fromkeys(report.get("warnings", []))]
        return "\n".join(lines)


def _errorClasses():
    """The library's error classes (each with its exit code)."""
    from PancreasC2FLib import errors

    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.PancreasC2FError) and c is not errors.PancreasC2FError]


def createCoreScene():
    """A scene with the module logics this module needs wired through an application logic, for
    plain Python with slicer-core (no Qt, no ``slicer.app``). Returns (scene, appLogic, logics)."""
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    appLogic.GetColorLogic().SetMRMLScene(scene)
    logics = {}
    for name, cls in (
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("Markups", slicer.vtkSlicerMarkupsLogic),
        ("CropVolume", slicer.vtkSlicerCropVolumeLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(name, logic)
        logics[name] = logic
    return scene, appLogic, logics


#
# Self-test helpers (shared with the pytest suite): a phantom CT and a deterministic stub model
#

SELFTEST_ARCH = "pancreasc2f-selftest-band"


def makeSelfTestPhantom(shape=(40, 56, 64), spacing=(1.5, 1.5, 2.5), origin=(-40.0, -30.0, -120.0)):
    """(image, label) SimpleITK images in LPS: body at 40 HU in air, a 150 HU "pancreas" ellipsoid
    (the only structure in the stub's band), on a non-trivial origin."""
    import SimpleITK as sitk

    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    body = ((y - ny / 2) / (0.45 * ny)) ** 2 + ((x - nx / 2) / (0.45 * nx)) ** 2 <= 1
    label = (((z - 0.5 * nz) / 6) ** 2 + ((y - 0.55 * ny) / 7) ** 2 + ((x - 0.45 * nx) / 13) ** 2 <= 1).astype(np.uint8)
    hu = np.where(body, 40, -1000).astype(np.int16)
    hu[label > 0] = 150
    images = []
    for arr in (hu, label):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        images.append(img)
    return images[0], images[1]


def makeSelfTestBundle(folder):
    """A bundle whose both stages are a stub that marks 100..200 HU (so the "pancreas" exactly)."""
    import torch
    from torch import nn

    from PancreasC2FLib.io.bundle import save_bundle
    from PancreasC2FLib.networks import ARCHITECTURES, register_architecture

    if SELFTEST_ARCH not in ARCHITECTURES:

        class SelfTestBandNet(nn.Module):
            arch = SELFTEST_ARCH

            def __init__(self, lo: float, hi: float):
                super().__init__()
                self.register_buffer("band", torch.tensor([lo, hi], dtype=torch.float32))

            def forward(self, x, with_aux=False):
                fg = 20.0 * torch.minimum(x - self.band[0], self.band[1] - x)
                return torch.cat([torch.zeros_like(fg), fg], dim=1)

        register_architecture(SelfTestBandNet)
    cls = ARCHITECTURES[SELFTEST_ARCH]
    lo, hi = ((h - 70.0) / 170.0 for h in (100.0, 200.0))  # "fixed" normalisation of clip [-100, 240]
    net = {"arch": SELFTEST_ARCH, "args": {"lo": lo, "hi": hi}}
    stage = {"network": net, "window": [32, 32, 32], "n": 1, "threshold": 0.5}
    metadata = {
        "name": "selftest-band",
        "version": "0",
        "pipeline": "resdsn-c2f",
        "trained": False,
        "license": "Apache-2.0 (test fixture)",
        "preprocessing": {"clip": [-100.0, 240.0], "normalize": "fixed"},
        "stages": {"coarse": dict(stage), "fine": dict(stage, margin_mm=10.0)},
        "postprocess": {"coarse_min_island_fraction": 0.2, "min_island_fraction": 0.2},
    }
    save_bundle(folder, {"coarse": cls(lo, hi), "fine": cls(lo, hi)}, metadata)
    return folder


#
# PancreasC2FTest
#


class PancreasC2FTest(ScriptedLoadableModuleTest):
    """The logic checks on a phantom CT with a deterministic stub model (no download)."""

    def setUp(self):
        if HAVE_GUI:
            slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PancreasC2F_logic()

    def test_PancreasC2F_logic(self, scene=None):
        import tempfile

        logic = PancreasC2FLogic(scene)
        if HAVE_GUI:
            logic.ensureTorch()
            logic.ensureDependencies()
        with tempfile.TemporaryDirectory() as tmp:
            bundle = makeSelfTestBundle(os.path.join(tmp, "selftest-band"))
            image, label = makeSelfTestPhantom()
            volume = logic.addVolumeFromImage(image, "PhantomCT")
            truth = _sitkArray(label)
            voxelMl = float(np.prod(image.GetSpacing())) / 1000.0

            nodesBefore = logic.scene.GetNumberOfNodes()
            cancel = threading.Event()
            cancel.set()
            from PancreasC2FLib.errors import Cancelled

            with self.assertRaises(Cancelled):
                logic.process(volume, model=bundle, cancel=cancel)
            self.assertEqual(logic.scene.GetNumberOfNodes(), nodesBefore, "a cancelled run must leave the scene as it was")

            roi = logic.findRegion(volume, model=bundle)
            self.assertEqual(roi.GetName(), ROI_NAME)
            box = _roiVoxelBox(logic, roi, volume)
            inside = np.zeros_like(truth)
            inside[box] = 1
            self.assertEqual(int((truth * (1 - inside)).sum()), 0, "the region must cover the pancreas")

            seg = logic.segmentInRegion(volume, roi, model=bundle)
            self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 1)
            mask = logic.segmentArray(seg, volume)
            self.assertEqual(int((mask != truth).sum()), 0)
            stats = json.loads(seg.GetAttribute(ATTRIBUTE_PREFIX + "statistics"))
            self.assertAlmostEqual(stats["volume_ml"], truth.sum() * voxelMl, places=2)
            self.assertTrue(seg.GetAttribute(ATTRIBUTE_PREFIX + "modelSha256"))

            path = os.path.join(tmp, "pancreas.seg.nrrd")
            logic.saveSegmentation(seg, path)
            reloaded = logic.loadSegmentation(path)
            self.assertEqual(int((logic.segmentArray(reloaded, volume) != mask).sum()), 0)


def _sitkArray(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


def _roiVoxelBox(logic, roiNode, volumeNode):
    """The (k, j, i) slices of the volume's voxels inside an axis-aligned ROI (for checks)."""
    from PancreasC2FLib.processing.geometry import Orientation, box_to_ijk
    from PancreasC2FLib.io.roi import roi_to_box

    image = logic.imageFromVolume(volumeNode)
    orientation = Orientation.of(image)
    box, _ = roi_to_box(image, orientation, logic.roiDictFromNode(roiNode, volumeNode))
    ijk = box_to_ijk(image, orientation, box)
    return tuple(slice(lo, hi) for lo, hi in ijk[::-1])
