"""Tests of the experiments: the command line (errors are one line, no traceback), the
statistics helpers, and an end-to-end run of all seven experiments on a tiny budget whose
report, figures and metrics must exist and agree with each other."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("mnist1d")
pytest.importorskip("tqdm")

from fastbn.experiments import EXPERIMENTS, get_experiment
from fastbn.experiments.__main__ import main
from fastbn.experiments._common import compare
from fastbn.experiments.report import VERDICT_TEXT, unbacked_numbers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cupy_usable():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


BAD_CONFIGS = [
    (["--only", "nope"], "unknown experiment 'nope'"),
    (["--only", "convergence,bogus"], "unknown experiment 'bogus'"),
    (["--lr", "-0.1"], "--lr must be a positive"),
    (["--lr", "nan"], "--lr must be a positive"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dataset", "cifar10"], "unknown dataset 'cifar10'"),
    (["--seeds", "1"], "--seeds must be at least 2"),
    (["--quick", "--full"], "not allowed with argument"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--batch-size", "many"], "invalid int value"),
]
if not _cupy_usable():
    BAD_CONFIGS.append((["--device", "gpu"], "device 'gpu' needs CuPy"))


@pytest.mark.parametrize("argv,message", BAD_CONFIGS, ids=[" ".join(a) for a, _ in BAD_CONFIGS])
def test_bad_configuration_is_one_line(argv, message, capsys, tmp_path):
    code = main([*argv, "--tiny", "--out", str(tmp_path / "r")] if "--full" not in argv else
                [*argv, "--out", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fastbn-experiments: error: ")
    assert message in lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "r").exists()  # nothing ran, nothing written


def test_console_entry_point_in_a_fresh_process():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fastbn.experiments", "--only", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fastbn-experiments: error: unknown experiment 'nope' (choose from {', '.join(EXPERIMENTS)})"]


def test_compare_rule():
    # clear effect: means 0.8 vs 0.5, spreads 0.01 -> better
    assert compare([0.79, 0.81], [0.49, 0.51])["outcome"] == "better"
    assert compare([0.49, 0.51], [0.79, 0.81])["outcome"] == "worse"
    # the difference (0.02) is inside two standard errors (~0.14) -> no clear difference
    assert compare([0.6, 0.8], [0.58, 0.78])["outcome"] == "no clear difference"
    # lower is better
    assert compare([1.0, 1.1], [5.0, 5.2], higher_is_better=False)["outcome"] == "better"
    # tiny but consistent differences below min_effect do not count
    assert compare([0.501, 0.501], [0.5, 0.5], min_effect=0.01)["outcome"] == "no clear difference"


def test_unbacked_numbers_flags_invented_values():
    metrics = {"acc": 0.6734, "lr": 0.02, "steps": [300], "ratio": -5.81}
    assert unbacked_numbers("accuracy 67.3% at lr 0.02 after 300 steps; ratio -5.8", metrics) == []
    assert unbacked_numbers("accuracy 68.3% at lr 0.03", metrics) == ["68.3%", "0.03"]


def test_every_experiment_has_sizes_for_every_tier():
    for name in EXPERIMENTS:
        mod = get_experiment(name)
        assert set(mod.SIZES) == {"tiny", "quick", "full"}, name
        assert mod.NAME == name and mod.CLAIM and mod.TITLE
    with pytest.raises(ValueError, match="unknown experiment"):
        get_experiment("nope")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["--tiny", "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    return out


def test_report_files_exist(tiny_report):
    for name in ("report.html", "report.md", "metrics.json"):
        assert (tiny_report / name).stat().st_size > 0
    for name in EXPERIMENTS:
        png = (tiny_report / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC)


def test_html_is_self_contained_and_embeds_every_figure(tiny_report):
    html = (tiny_report / "report.html").read_text()
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(embedded) == len(EXPERIMENTS)
    for b64, name in zip(embedded, EXPERIMENTS):
        assert base64.b64decode(b64) == (tiny_report / "figures" / f"{name}.png").read_bytes()
    assert "http://" not in html and "https://" not in html  # nothing fetched when opened


def test_metrics_are_strict_json_and_match_summary(tiny_report):
    m = json.loads((tiny_report / "metrics.json").read_text(),
                   parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert [row["experiment"] for row in m["summary"]] == list(EXPERIMENTS)
    assert list(m["experiments"]) == list(EXPERIMENTS)
    assert m["meta"]["tier"] == "tiny" and m["meta"]["seeds"] == [3, 4]
    counts = m["meta"]["verdict_counts"]
    assert sum(counts.values()) == len(EXPERIMENTS)
    for row in m["summary"]:
        e = m["experiments"][row["experiment"]]
        assert row["verdict"] in VERDICT_TEXT and row["verdict"] == e["verdict"]
        assert row["measured"] == e["measured"]
        assert e["metrics"]["seeds"] == [3, 4]


def test_every_number_in_findings_is_in_metrics(tiny_report):
    m = json.loads((tiny_report / "metrics.json").read_text())
    for name, e in m["experiments"].items():
        text = " ".join(e["findings"]) + " " + e["measured"]
        assert unbacked_numbers(text, e["metrics"]) == [], name


def test_every_number_in_report_md_is_in_metrics(tiny_report):
    m = json.loads((tiny_report / "metrics.json").read_text())
    md = (tiny_report / "report.md").read_text()
    assert unbacked_numbers(md, m) == []
    for name in EXPERIMENTS:
        assert f"figures/{name}.png" in md


def test_metrics_are_internally_consistent(tiny_report):
    m = json.loads((tiny_report / "metrics.json").read_text())
    ex = m["experiments"]
    for arm in ("plain", "bn"):
        lr = ex["lr_tolerance"]["metrics"][arm]
        np.testing.assert_allclose(lr["mean_test_acc"], np.mean(lr["test_acc"], axis=1))
        assert lr["num_good_lrs"] == len(lr["good_lrs"])
        conv = ex["convergence"]["metrics"][arm]
        assert conv["runs_reaching_target"] == sum(s is not None for s in conv["steps_to_target"])
        init = ex["init_robustness"]["metrics"][arm]
        assert math.isclose(init["acc_range"], max(init["mean_test_acc"]) - min(init["mean_test_acc"]),
                            abs_tol=1e-12)
    for arm in ex["regularization"]["metrics"]["arms"].values():
        np.testing.assert_allclose(arm["gap"], np.subtract(arm["final_train_acc"], arm["final_test_acc"]))
        assert all(0 <= a <= 1 for a in arm["final_test_acc"])


def test_same_seed_same_numbers(tiny_report, tmp_path):
    assert main(["--tiny", "--seed", "3", "--only", "convergence", "--out", str(tmp_path)]) == 0
    a = json.loads((tiny_report / "metrics.json").read_text())["experiments"]["convergence"]["metrics"]
    b = json.loads((tmp_path / "metrics.json").read_text())["experiments"]["convergence"]["metrics"]
    for arm in ("plain", "bn"):
        a[arm].pop("seconds_per_step"), b[arm].pop("seconds_per_step")
    for d in (a, b):
        d.pop("compare_time")
        d.pop("time_cost_per_step")
    assert a == b
