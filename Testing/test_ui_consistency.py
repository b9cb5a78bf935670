"""The module's Qt Designer file agrees with its code: it parses, every ``self.ui.NAME`` the
module uses exists, every ``SlicerParameterName`` is a field of the parameter node (with a
widget type its connector accepts), and every parameter has a widget."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "PancreasC2F"
MODULE_FILE = MODULE_DIR / "PancreasC2F.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "PancreasC2F.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "PancreasC2F.png"

# parameter type -> widget classes the parameter node wrapper can connect to it
ACCEPTED = {
    "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
    "vtkMRMLMarkupsROINode": {"qMRMLNodeComboBox"},
    "vtkMRMLSegmentationNode": {"qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget"},
    "str": {"QLineEdit", "QComboBox"},
    "int": {"QSpinBox", "ctkSliderWidget", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "qMRMLSliderWidget"},
    "bool": {"QCheckBox", "QPushButton"},
}


@pytest.fixture(scope="module")
def ui_tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def widgets(root: ET.Element) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in root.iter("widget")}


def parameter_fields() -> dict[str, str]:
    """name -> base type of the fields of the @parameterNodeWrapper class."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            fields = {}
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    ann = stmt.annotation
                    if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", None) == "Annotated":
                        ann = ann.slice.elts[0]
                    fields[stmt.target.id] = ast.unparse(ann)
            return fields
    raise AssertionError("no @parameterNodeWrapper class in the module")


def test_ui_parses_and_root_is_the_module_widget(ui_tree):
    assert ui_tree.tag == "ui"
    assert ui_tree.find("class").text == "PancreasC2F"
    root_widget = ui_tree.find("widget")
    assert root_widget.get("class") == "qMRMLWidget" and root_widget.get("name") == "PancreasC2F"
    names = [w.get("name") for w in ui_tree.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_every_ui_name_used_by_the_code_exists(ui_tree):
    used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the widget should use self.ui"
    missing = used - set(widgets(ui_tree))
    assert not missing, f"used in PancreasC2F.py but not in the .ui file: {sorted(missing)}"


def test_parameter_names_refer_to_parameter_node_fields(ui_tree):
    fields = parameter_fields()
    bound = {}
    for name, w in widgets(ui_tree).items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                value = prop.find("string").text
                assert value in fields, f"{name}: SlicerParameterName {value!r} is not a parameter node field"
                assert w.get("class") in ACCEPTED[fields[value]], f"{name} ({w.get('class')}) cannot show a {fields[value]}"
                assert value not in bound, f"{value!r} is bound to two widgets"
                bound[value] = name
    assert set(bound) == set(fields), f"parameters without a widget: {sorted(set(fields) - set(bound))}"


def test_connections_and_custom_widgets_are_declared(ui_tree):
    names = set(widgets(ui_tree))
    for c in ui_tree.iter("connection"):
        assert c.find("sender").text in names and c.find("receiver").text in names
    used_classes = {w.get("class") for w in ui_tree.iter("widget")}
    declared = {c.find("class").text for c in ui_tree.iter("customwidget")}
    custom = {c for c in used_classes if not c.startswith("Q")}
    assert custom <= declared, f"custom widgets not declared: {sorted(custom - declared)}"
    # every MRML node selector gets the scene
    selectors = {n for n, w in widgets(ui_tree).items() if w.get("class") == "qMRMLNodeComboBox"}
    receivers = {c.find("receiver").text for c in ui_tree.iter("connection") if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors <= receivers


def test_icon_is_a_128_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def test_cmake_packages_the_module_library_and_resources():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert resource in text
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "PancreasC2F")).is_file()
    assert "PancreasC2FLib/*.py" in text and "PancreasC2FLib/models/*" in text and "batch.py" in text
    top = (MODULE_DIR.parent / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("project(PancreasC2F)", "EXTENSION_CATEGORY \"Segmentation\"", "EXTENSION_DEPENDS \"PyTorch\"", "add_subdirectory(PancreasC2F)", "Slicer_EXTENSION_CPACK"):
        assert key in top
