"""The demo recipes of the four other pipelines (Training/demo_variants.py) and the side-by-side
table (Training/pipelines_table.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from Training import demo_variants
from Training.pipelines_table import combined_table, installed_models, stage_verdict

MODELS = Path(__file__).resolve().parent.parent / "PancreasC2FLib" / "models"


def _summary(model, pipeline, mean, mn, s1_mean, s1_min):
    return {"model": model, "pipeline": pipeline, "mean_dsc": mean, "std_dsc": 1.0, "min_dsc": mn, "max_dsc": 99.0,
            "stage1_mean_dsc": s1_mean, "stage1_min_dsc": s1_min, "mean_precision": 33.3, "seconds_per_case": 2.0}


def test_stage_verdict_needs_mean_and_minimum():
    assert stage_verdict(_summary("a", "zhao-two-stage", 85, 70, 80, 60)) == "yes"
    assert stage_verdict(_summary("a", "zhao-two-stage", 85, 50, 80, 60)) == "no"  # the minimum got worse
    assert stage_verdict(_summary("a", "zhao-two-stage", 75, 70, 80, 60)) == "no"  # the mean got worse
    assert stage_verdict(_summary("g", "fang-ggpfn", 75, 70, math.nan, math.nan)) == "one stage"


def test_combined_table_puts_real_ct_beside_synthetic():
    synthetic = [_summary("demo-x", "roth-cascade", 81.0, 70.0, 40.0, 20.0), _summary("demo-g", "fang-ggpfn", 60.0, 50.0, math.nan, math.nan)]
    real = [{**_summary("demo-x", "roth-cascade", 42.5, 42.5, 10.0, 10.0)}]
    table = combined_table(synthetic, real, 5, 1)
    rows = table.splitlines()
    assert "Real CT DSC (1 case) | Real CT precision |" in rows[0] and len(rows) == 4
    assert "Roth et al. 2018" in rows[2] and "81.0 ± 1.0" in rows[2] and "| yes |" in rows[2] and rows[2].endswith("| 42.5 | 33.3 | 10.0 |")
    assert rows[3].endswith("| n/a | n/a | n/a |") and "| one stage |" in rows[3]
    assert "Real CT" not in combined_table(synthetic, None, 5, 0)


def test_installed_models_skips_missing_ones():
    assert installed_models(["demo-synthetic", "demo-does-not-exist"]) == ["demo-synthetic"]


def test_jobs_start_from_the_bundle_of_the_same_name(tmp_path):
    """--init-from FOLDER: each stage starts from FOLDER/<demo name>, when there is one."""
    start = tmp_path / "v1"
    start.mkdir()
    shutil.copytree(MODELS / "demo-zhao-two-stage", start / "demo-zhao-two-stage")
    zhao = demo_variants.jobs_for("zhao-two-stage", tmp_path / "work", tmp_path / "data", str(tmp_path / "cache"), 1, 0.01, init_from=start)
    assert {j.init_from for j in zhao.values()} == {str(start / "demo-zhao-two-stage")}
    roth = demo_variants.jobs_for("roth-cascade", tmp_path / "work", tmp_path / "data", str(tmp_path / "cache"), 1, 0.01, init_from=start)
    assert all(j.init_from is None for j in roth.values())
    # Roth's stage 2 is trained on the trained stage 1's candidate regions (the paper's way)
    assert roth["stage2"].settings["stage1"] == str(tmp_path / "work" / "roth-cascade" / "stage1")


def test_stage2_alone_takes_stage1_from_the_init_bundle(tmp_path):
    """--init-from FOLDER --stages stage2 with no stage-1 run in WORK: the candidate regions and the
    exported stage 1 come from the bundle; once stage 1 has a checkpoint (or is trained), its own."""
    start = tmp_path / "v5"
    shutil.copytree(MODELS / "demo-roth-cascade", start / "demo-roth-cascade")
    bundle = str(start / "demo-roth-cascade")
    jobs = demo_variants.jobs_for("roth-cascade", tmp_path / "work", tmp_path / "data", str(tmp_path / "cache"), 1, 0.01, init_from=start)
    demo_variants.untrained_stage1_from_init(jobs, None)  # both stages trained: stage 1's own run
    assert jobs["stage2"].settings["stage1"] == jobs["stage1"].out
    demo_variants.untrained_stage1_from_init(jobs, ["stage2"])
    assert jobs["stage2"].settings["stage1"] == bundle
    assert demo_variants.stage_source(jobs["stage1"]) == Path(bundle)
    # A stage-1 checkpoint in WORK wins over the bundle.
    jobs = demo_variants.jobs_for("roth-cascade", tmp_path / "work", tmp_path / "data", str(tmp_path / "cache"), 1, 0.01, init_from=start)
    Path(jobs["stage1"].out).mkdir(parents=True)
    (Path(jobs["stage1"].out) / "final.pt").write_bytes(b"")
    demo_variants.untrained_stage1_from_init(jobs, ["stage2"])
    assert jobs["stage2"].settings["stage1"] == jobs["stage1"].out
    # Without a bundle to fall back on, a missing checkpoint is still an error.
    bare = demo_variants.jobs_for("roth-cascade", tmp_path / "other", tmp_path / "data", str(tmp_path / "cache"), 1, 0.01)
    with pytest.raises(demo_variants.DatasetError, match="no stage-1 checkpoint"):
        demo_variants.stage_source(bare["stage1"])


def test_demo_cases_use_the_realism_generator(tmp_path, monkeypatch):
    """The training and held-out cases come from the same generator version as the shipped ResDSN model."""
    from PancreasC2FLib.synthetic import GENERATOR_VERSION

    assert demo_variants.GENERATOR_VERSION == GENERATOR_VERSION == 2
    made = []

    class Fake:
        def __init__(self, seed):
            import SimpleITK as sitk

            self.image = sitk.Image(4, 4, 4, sitk.sitkInt16)
            self.label = sitk.Image(4, 4, 4, sitk.sitkUInt8)

    def fake_generate(seed, version):
        made.append((seed, version))
        return Fake(seed)

    monkeypatch.setattr("PancreasC2FLib.synthetic.generate_case", fake_generate)
    images, labels = demo_variants.export_cases(tmp_path, "test", 2)
    assert made == [(900000, 2), (900001, 2)]
    assert sorted(p.name for p in Path(labels).iterdir()) == ["synthetic_900000.nii.gz", "synthetic_900001.nii.gz"]
    demo_variants.export_cases(tmp_path, "test", 2)  # already written: nothing generated again
    assert len(made) == 2
    # --train-cases N: N training seeds from 3000 on, the validation seeds after them, unchanged.
    assert demo_variants.parts(3)["trainval"] == [(3000, 3), (510000, 2)] and demo_variants.parts()["trainval"] == [(3000, 16), (510000, 2)]
    demo_variants.export_cases(tmp_path, "trainval", train_cases=3)
    assert made[2:] == [(s, 2) for s in (3000, 3001, 3002, 510000, 510001)]
    with pytest.raises(SystemExit):
        demo_variants.main(["--train-cases", "0", "--data-dir", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    # --generator-version 3: those cases, in a folder of their own (the default holds version 2's)
    demo_variants.export_cases(tmp_path / "v3", "trainval", train_cases=1, version=3)
    assert made[7:] == [(s, 3) for s in (3000, 510000, 510001)]
    with pytest.raises(SystemExit):
        demo_variants.main(["--generator-version", "3", "--prepare-only"])


def test_seed_and_generator_version_reach_the_training(tmp_path, monkeypatch):
    """--seed repeats a run with another seed; --generator-version writes and records those cases."""
    seen = {}
    monkeypatch.setattr(demo_variants, "export_cases", lambda *a, **k: seen.update(written=k["version"]))
    monkeypatch.setattr(demo_variants, "prepare_data", lambda *a, **k: None)

    def fake_train(pipeline, jobs, out, work, **k):
        seen.update(seeds={s: j.config.seed for s, j in jobs.items()}, recorded=k["generator_version"])

    monkeypatch.setattr(demo_variants, "train_pipeline", fake_train)
    args = ["--pipelines", "fang-ggpfn", "--data-dir", str(tmp_path / "v3"), "--work", str(tmp_path / "w"), "--models", str(tmp_path / "m")]
    assert demo_variants.main([*args, "--seed", "3", "--generator-version", "3"]) == 0
    assert seen == {"written": 3, "seeds": {"ggpfn": 3}, "recorded": 3}
    assert demo_variants.main(args) == 0
    assert seen == {"written": 2, "seeds": {"ggpfn": demo_variants.TRAIN["seed"]}, "recorded": 2}


@pytest.mark.parametrize("pipeline", sorted(demo_variants.DEMOS))
def test_every_recipe_names_its_bundle_and_stages(pipeline):
    demo = demo_variants.DEMOS[pipeline]
    assert demo["name"].startswith("demo-") and demo["stages"] and demo["description"]


def test_set_reaches_only_the_stages_trained(tmp_path):
    from PancreasC2FLib.errors import InputError
    from Training.demo_variants import apply_settings
    from Training.train import setting_values

    values = setting_values(["init=runs/x/axial", "dsc_over=batch", "margin=12", "spacing=[2, 2, 2]"])
    assert values == {"init": "runs/x/axial", "dsc_over": "batch", "margin": 12, "spacing": [2, 2, 2]}
    with pytest.raises(InputError, match="KEY=VALUE"):
        setting_values(["margin"])
    jobs = demo_variants.jobs_for("zhao-two-stage", tmp_path / "work", tmp_path / "data", str(tmp_path / "cache"), 1, 1.0)
    apply_settings(jobs, {"margin": 12}, ["stage2"])
    assert jobs["stage2"].settings["margin"] == 12 and "margin" not in jobs["stage1"].settings
    apply_settings(jobs, {"threshold": 0.4})
    assert jobs["stage1"].settings["threshold"] == jobs["stage2"].settings["threshold"] == 0.4


def test_malformed_set_is_one_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        demo_variants.main(["--set", "margin", "--data-dir", str(tmp_path / "data"), "--work", str(tmp_path / "work")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--set expects KEY=VALUE" in err[-1] and "Traceback" not in "\n".join(err)
    assert not any(tmp_path.iterdir())


def test_export_overrides_merge_the_recipe_and_the_chosen_threshold():
    roth = demo_variants.DEMOS["roth-cascade"]
    assert demo_variants.export_overrides(roth) == {"stage2": {"coverage": 8}}  # the provisional bundle
    assert demo_variants.export_overrides(roth, {"stage2": 0.6}) == {"stage2": {"coverage": 8, "threshold": 0.6}}
    assert roth["inference"] == {"stage2": {"coverage": 8}}  # not changed by the merge
    assert demo_variants.export_overrides(demo_variants.DEMOS["yu-rstn"]) is None
    assert demo_variants.export_overrides(demo_variants.DEMOS["zhao-two-stage"], {"stage2": 0.5}) == {"stage2": {"threshold": 0.5}}


@pytest.mark.parametrize("pipeline", [p for p, d in demo_variants.DEMOS.items() if d.get("inference")])
def test_shipped_bundles_carry_their_recipes_inference_settings(pipeline):
    bundle = MODELS / demo_variants.DEMOS[pipeline]["name"] / "model.json"  # shipped in the repository
    stages = json.loads(bundle.read_text(encoding="utf-8"))["stages"]
    for stage, settings in demo_variants.DEMOS[pipeline]["inference"].items():
        assert {k: stages[stage][k] for k in settings} == settings


def test_comparison_keeps_models_of_one_name_apart():
    """Two seeds (or versions) of demo-yu-rstn compared side by side: two summaries, not one mean."""
    from Training.compare import distinct_names, summarize

    models = [{"name": "demo-yu-rstn", "pipeline": "yu-rstn", "sha256": sha * 8} for sha in ("aa", "bb", "aa")] + [{"name": "other", "pipeline": "yu-rstn", "sha256": "cc" * 8}]
    distinct_names(models)
    assert [m["name"] for m in models] == ["demo-yu-rstn (#1)", "demo-yu-rstn (bbbbbbbb)", "demo-yu-rstn (#3)", "other"]
    rows = [{"model": m["name"], "dsc": d, "stage1_dsc": d, "seconds": 1.0, "precision": d, "note": ""} for m, d in zip(models, (0.5, 0.9, 0.5, 0.7))]
    assert [round(s["mean_dsc"]) for s in summarize(rows, models)] == [50, 90, 50, 70]


def test_comparison_reports_precision_and_recall():
    """What a DSC alone hides: a mask beside the pancreas (precision 0) and one that finds half of it."""
    from Training.compare import overlap_figures

    truth = np.zeros((4, 4, 4), bool)
    truth[0, :2] = True  # 8 voxels
    beside = np.zeros_like(truth)
    beside[3] = True
    half = np.zeros_like(truth)
    half[0, 0] = True  # 4 of the pancreas
    half[3, 0] = True  # 4 elsewhere
    assert overlap_figures(beside, truth) == {"precision": 0.0, "recall": 0.0}
    assert overlap_figures(half, truth) == {"precision": 0.5, "recall": 0.5}
    empty = overlap_figures(np.zeros_like(truth), truth)
    assert np.isnan(empty["precision"]) and empty["recall"] == 0.0
