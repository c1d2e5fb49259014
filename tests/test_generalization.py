"""trainers.generalization: the CNA study's correlations, subsets and bootstrap, and its page.

The statistics are pinned on hand-worked points; the page is made from a real tiny grid of
networks with checkpoints, audited for real, and drawn by headless Chromium.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trainers.generalization import PREDICTORS, Point, build, correlate, in_subset, pearson, point_of_row, tau_b
from trainers.stats import kendall_tau


def point(network: str, x: float, y: float, *, noise: float = 0.0, epoch: int = 1, final: bool = True, data="mnist"):
    return Point(
        network=network,
        dataset=data,
        label_noise=noise,
        label_noise_kind="shuffled" if noise else "random",
        epoch=epoch,
        final=final,
        test_accuracy=1 - y,
        gap=y,
        predictors={**dict.fromkeys(key for key, _, _ in PREDICTORS), "cna_margin_max": x, "cna_train": x},
    )


def test_pearson_and_tau_on_hand_worked_points():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 8.0])
    assert pearson(x, y) == pytest.approx(1.0) and tau_b(x, y) == pytest.approx(1.0)
    assert pearson(x, -y) == pytest.approx(-1.0) and tau_b(x, -y) == pytest.approx(-1.0)
    # (1,1) (2,3) (3,2): pairs 12 +, 13 +, 23 −  → τ = 1/3; r = 0.5
    assert tau_b(np.array([1.0, 2, 3]), np.array([1.0, 3, 2])) == pytest.approx(1 / 3)
    assert pearson(np.array([1.0, 2, 3]), np.array([1.0, 3, 2])) == pytest.approx(0.5)
    assert pearson(x, np.ones(4)) is None and tau_b(x, np.ones(4)) is None
    assert pearson(x, np.full(4, 0.1075)) is None  # a constant side, whatever its mean's rounding


def test_tau_in_blocks_equals_the_exact_tau_b_with_ties():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 20, 700).astype(float), rng.integers(0, 30, 700).astype(float)
    y += 0.3 * x
    assert tau_b(x, y) == pytest.approx(kendall_tau(list(x), list(y)).tau, abs=1e-12)


def test_bootstrap_resamples_networks_with_their_checkpoints():
    # three networks, two checkpoints each; the gap rises with x inside and across networks
    points = [point(f"n{i}", i + c / 10, i + c / 5, epoch=c + 1, final=c == 1) for i in range(3) for c in range(2)]
    rng = np.random.default_rng(0)
    n, networks, r, tau, p_value = correlate(points, "cna_margin_max", "gap", 200, rng)
    assert (n, networks) == (6, 3)
    assert tau.value == pytest.approx(1.0) and tau.low == pytest.approx(1.0) and tau.high == pytest.approx(1.0)
    assert r.low <= r.value <= r.high and r.resamples <= 200 and p_value < 0.05
    again = correlate(points, "cna_margin_max", "gap", 200, np.random.default_rng(0))
    assert again[2] == r  # the seed fixes the interval


def test_subsets_follow_figure_3():
    clean_checkpoint = point("a", 1, 1, final=False)
    noisy_final = point("b", 1, 1, noise=0.3)
    noisy_checkpoint = point("b", 1, 1, noise=0.3, final=False)
    assert [in_subset(p, "clean") for p in (clean_checkpoint, noisy_final, noisy_checkpoint)] == [True, False, False]
    assert [in_subset(p, "3C") for p in (clean_checkpoint, noisy_final, noisy_checkpoint)] == [True, True, False]
    assert all(in_subset(p, "all") for p in (clean_checkpoint, noisy_final, noisy_checkpoint))
    noise_data = point("c", 1, 1, data="gaussian-noise", final=False)  # random labels by construction
    assert not in_subset(noise_data, "clean") and not in_subset(noise_data, "3C") and in_subset(noise_data, "all")


def test_the_study_is_per_data_set_and_pooled_with_notes_for_what_is_missing():
    points = [point(f"{d}{i}", i, i * i, data=d) for d in ("mnist", "fashion-mnist") for i in range(4)]
    study = build(points, bootstrap=50)
    datasets = {c.dataset for c in study.correlations}
    assert datasets == {"mnist", "fashion-mnist", "all data sets"}
    assert [t.name for t in study.tables] == ["cna_study", "cna_points"]
    assert any("label noise" in note for note in study.notes) and any("path norm" in note for note in study.notes)
    rows = study.tables[0].to_json()["rows"]
    assert {row["predictor"] for row in rows} == {"CNA (train)", "CNA-Margin (margin_max)"}
    pooled = next(
        r for r in rows if r["dataset"] == "all data sets" and r["subset"] == "all" and r["target"] != "test accuracy"
    )
    assert pooled["points"] == 8 and pooled["networks"] == 8 and pooled["tau"] == pytest.approx(1.0)
    json.dumps(study.tables[0].to_json(), allow_nan=False)
    assert [point_of_row(row) for row in study.tables[1].to_json()["rows"]] == points  # cna_points reads back
    same_names = [point(f"s{i}", i, i * i, data=d) for d in ("mnist", "fashion-mnist") for i in range(4)]
    pooled = next(c for c in build(same_names, bootstrap=10).correlations if c.dataset == "all data sets")
    assert pooled.networks == 8  # seed s0 on MNIST and seed s0 on Fashion-MNIST are two networks


@pytest.mark.slow
def test_report_writes_the_cna_study_and_chromium_draws_its_scatters(tmp_path: Path, capsys):
    pytest.importorskip("torch", reason="the trainer needs the 'train' extra")
    from test_trainers import rendered

    from trainers.cli import main

    nets, out = tmp_path / "nets", tmp_path / "report"
    argv = ["grid", "--arch", "lenet-300-100", "--widths", "8", "--randomize-labels", "0,0.5"]
    argv += ["--label-noise", "shuffled", "--replicates", "2", "--max-epochs", "2", "--checkpoint-every", "1"]
    assert main([*argv, "--limit", "300", "--out", str(nets)]) == 0
    assert main(["report", str(nets), "--limit", "300", "--bootstrap", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CNA study" in printed and "4 checkpoint(s) are left out of these tables" in printed
    study = json.loads((out / "cna_study.json").read_text())
    assert {row["subset"] for row in study["rows"]} == {"clean", "3C", "all"}
    frobenius = next(r for r in study["rows"] if r["subset"] == "all" and r["predictor"] == "log10 Π‖W‖_F")
    assert frobenius["points"] == 8 and frobenius["networks"] == 4 and not math.isnan(frobenius["tau"])
    points = json.loads((out / "cna_points.json").read_text())["rows"]
    assert sorted(p["epoch"] for p in points) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert all(p["log_path_norm"] is not None for p in points)
    dom, images = rendered(out / "cna_study.html", tmp_path / "chromium")
    assert len(images) == 7 and "broken" not in images
    assert all(int(size.split("x")[0]) > 300 for size in images)
    assert 'data-name="cna_study"' in dom and 'data-name="cna_points"' in dom
