"""Model bundles: a folder that describes itself.

    NAME/
      model.json          metadata: pipeline, networks and their arguments, preprocessing,
                          stage settings, presets, training data and license, sha256 of each file
      <stage>.safetensors one weights file per network (never a pickle)

The bundle's identity is ``sha256`` of model.json's canonical form, which includes the weights'
hashes; every output records it. Loading re-hashes every weights file and refuses a mismatch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import ModelError
from ..networks import build_network

FORMAT = "pancreas-c2f-bundle"
FORMAT_VERSION = 1
MODELS_DIR = Path(__file__).parent.parent / "models"
DEFAULT_MODEL = "demo-synthetic"
MODEL_PATH_ENV = "PANCREAS_C2F_MODELS"  # extra folders of named models (os.pathsep-separated)
_MAX_METADATA_BYTES = 1 << 20
_SAFE_FILENAME = re.compile(r"^[A-Za-z0-9_.-]+\.safetensors$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Bundle:
    """A loaded model: metadata plus one network per stage (in eval mode, on the CPU)."""

    path: Path
    metadata: dict
    networks: dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.metadata.get("name", self.path.name)

    @property
    def pipeline(self) -> str:
        return self.metadata["pipeline"]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.metadata)).hexdigest()

    def stage(self, name: str) -> dict:
        return self.metadata["stages"][name]

    def provenance(self) -> dict:
        """What every output records about the model."""
        md = self.metadata
        return {
            "model_name": self.name,
            "model_version": md.get("version"),
            "model_sha256": self.sha256,
            "pipeline": self.pipeline,
            "trained": bool(md.get("trained", False)),
            "license": md.get("license"),
        }


def _stage_files(metadata: dict) -> dict[str, dict]:
    stages = metadata.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ModelError("model.json has no 'stages'")
    return stages


def save_bundle(path: str | Path, networks: dict[str, torch.nn.Module], metadata: dict, weights_dtype: str = "float32") -> Bundle:
    """Write weights (safetensors) and model.json; each stage's ``network`` entry must already
    describe how to rebuild it (``{"arch": ..., "args": {...}}``). ``weights_dtype="float16"``
    stores floating-point weights at half precision (half the size; loading casts them back to the
    network's float32), recorded in model.json."""
    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"weights_dtype must be float32 or float16, not {weights_dtype!r}")
    store = getattr(torch, weights_dtype)
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    md = copy.deepcopy(metadata)
    md.setdefault("format", FORMAT)
    md.setdefault("format_version", FORMAT_VERSION)
    md.setdefault("created_with", {"tool": "PancreasC2F", "version": __version__, "torch": torch.__version__})
    if weights_dtype != "float32":
        md["weights_dtype"] = weights_dtype
    stages = _stage_files(md)
    for stage, net in networks.items():
        if stage not in stages:
            raise ModelError(f"network for unknown stage {stage!r}")
        fname = f"{stage}.safetensors"
        state = {k: (v.to(store) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in net.state_dict().items()}
        tmp = path / (fname + ".tmp")
        save_file(state, str(tmp))
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files: a shared bundle must be readable
        os.replace(tmp, path / fname)
        stages[stage]["weights"] = fname
        stages[stage]["sha256"] = sha256_file(path / fname)
    tmp = path / "model.json.tmp"
    tmp.write_text(json.dumps(md, indent=2, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path / "model.json")
    return Bundle(path, md, {k: v.eval() for k, v in networks.items()})


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify a bundle; any problem is a ModelError with a one-line reason."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file() and path.name == "model.json":
        path = path.parent
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise ModelError(f"not a model bundle (no model.json): {path}")
    if meta_path.stat().st_size > _MAX_METADATA_BYTES:
        raise ModelError(f"model.json is implausibly large: {meta_path}")
    try:
        md = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model.json is not valid JSON: {exc}") from None
    if not isinstance(md, dict) or md.get("format") != FORMAT:
        raise ModelError(f"{meta_path} is not a {FORMAT} file")
    try:
        format_version = int(md.get("format_version", 0))
    except (TypeError, ValueError, OverflowError):  # OverflowError: Infinity
        raise ModelError(f"model.json has an invalid format_version {md.get('format_version')!r}") from None
    if format_version > FORMAT_VERSION:
        raise ModelError(f"bundle format {md.get('format_version')} is newer than this tool supports ({FORMAT_VERSION}); update PancreasC2F")
    if "pipeline" not in md:
        raise ModelError("model.json does not name its pipeline")
    networks = {}
    for stage, spec in _stage_files(md).items():
        if not isinstance(spec, dict):
            raise ModelError(f"stage {stage!r}: its entry in model.json is not an object")
        fname = spec.get("weights", "")
        if not isinstance(fname, str) or not _SAFE_FILENAME.match(fname):
            raise ModelError(f"stage {stage!r}: weights must be a .safetensors file inside the bundle, got {fname!r}")
        wpath = path / fname
        if not wpath.is_file():
            raise ModelError(f"stage {stage!r}: weights file missing: {wpath}")
        if wpath.is_symlink() or wpath.resolve().parent != path.resolve():  # the name alone says nothing
            raise ModelError(f"stage {stage!r}: {fname} is a link; weights must be a plain file inside the bundle")
        digest = sha256_file(wpath)
        if digest != spec.get("sha256"):
            raise ModelError(f"stage {stage!r}: {fname} does not match the sha256 in model.json (tampered or truncated)")
        try:
            state = load_file(str(wpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"stage {stage!r}: cannot read {fname}: {exc}") from None
        netspec = spec.get("network", {})
        try:
            net = build_network(netspec["arch"], dict(netspec.get("args", {})))
            net.load_state_dict(state, strict=True)
        except ModelError:
            raise
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ModelError(f"stage {stage!r}: weights do not fit the network described in model.json: {str(exc).splitlines()[0]}") from None
        networks[stage] = net.eval()
    return Bundle(path, md, networks)


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle folder (it holds a model.json); ``load_bundle`` checks the rest."""
    return (Path(path).expanduser() / "model.json").is_file()


def model_search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p]
    return extra + [Path.home() / ".pancreas-c2f" / "models", MODELS_DIR]


def available_models() -> dict[str, Path]:
    """Named models: folders with a model.json in the search path (earlier folders win)."""
    found: dict[str, Path] = {}
    for root in reversed(model_search_path()):
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if is_bundle(d):
                    found[d.name] = d
    return found


def default_model(pipeline: str | None = None) -> str:
    """The shipped model of a pipeline: ``demo-synthetic`` for ResDSN C2F (and when no pipeline is
    named), ``demo-<pipeline>`` for the others."""
    return DEFAULT_MODEL if pipeline in (None, "resdsn-c2f") else f"demo-{pipeline}"


def resolve_model(name_or_path: str | None, pipeline: str | None = None) -> Path:
    """A bundle folder from a registry name or a path (None: the default model of ``pipeline``)."""
    name_or_path = name_or_path or default_model(pipeline)
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    models = available_models()
    if name_or_path in models:
        return models[name_or_path]
    raise ModelError(f"unknown model {name_or_path!r}: not a folder, and not one of {sorted(models) or 'the (empty) registry'}")
