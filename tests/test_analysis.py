"""Analysis of an experiment directory: statistics against hand-computed values, writers, plots, CLI.

The hand-made sweep: dpo and spo × β ∈ {0.1, 0.3} × seeds {0, 1, 2}, init "base", plus one ERROR trial.
Expected values are literal numbers or plain arithmetic in the test, never the pandas code under test.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from analysis.collect import load_experiment
from analysis.report import write_report
from analysis.tables import (
    before_after,
    best_configs,
    bootstrap_interval,
    paired_differences,
    paired_change_interval,
    paired_runs,
    summary_table,
    to_latex,
    to_markdown,
    write_table,
)

REPO = Path(__file__).resolve().parents[1]

# eval/accuracy per (loss, beta) for seeds 0, 1, 2.
ACCURACY = {
    ("dpo", 0.1): [0.50, 0.60, 0.70],
    ("dpo", 0.3): [0.40, 0.50, 0.60],
    ("spo", 0.1): [0.70, 0.85, 0.90],
    ("spo", 0.3): [0.60, 0.65, 0.80],
}


def write_experiment(directory: Path) -> Path:
    """results.csv + history.parquet + sweep.yaml for the hand-made sweep (and one ERROR trial)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows, history = [], []
    for (loss, beta), accuracies in ACCURACY.items():
        for seed, accuracy in enumerate(accuracies):
            trial_id = f"{loss}_{beta}_{seed}"
            rows.append({
                "trial_id": trial_id, "status": "TERMINATED", "error": "",
                "loss": loss, "beta": beta, "spo_lambda": 1.0 if loss == "spo" else 0.0, "init": "base", "seed": seed,
                "eval/accuracy": accuracy, "eval/chosen_logp_delta": -1.0 if loss == "dpo" else 0.5,
                "eval/rejected_logp_delta": -3.0, "eval/mass_correct": accuracy, "eval/mass_mistake": 1 - accuracy,
                "eval/mass_other": 0.0, "eval/mass_malformed": 0.0, "train/loss": 0.3, "step": 20, "wall_time_s": 5.0,
            })  # fmt: skip
            sign = -1.0 if loss == "dpo" else 1.0
            for step in (0, 10, 20):
                history.append({
                    "trial_id": trial_id, "step": step,
                    "train/chosen_logp_delta": sign * step / 10 * (1 + 0.1 * seed),
                    "train/rejected_logp_delta": -step / 5 * (1 + 0.1 * seed),
                    "eval/accuracy": accuracy if step == 20 else np.nan,
                })  # fmt: skip
    rows.append({"trial_id": "spo_err", "status": "ERROR", "error": "CUDA out of memory", "loss": "spo",
                 "beta": 0.1, "spo_lambda": 1.0, "init": "base", "seed": 3})  # fmt: skip
    history.append({"trial_id": "spo_err", "step": 0, "train/chosen_logp_delta": 99.0})
    pd.DataFrame(rows).to_csv(directory / "results.csv", index=False)
    pd.DataFrame(history).to_parquet(directory / "history.parquet")
    (directory / "sweep.yaml").write_text("name: hand-made\n")
    return directory


@pytest.fixture
def experiment_dir(tmp_path) -> Path:
    return write_experiment(tmp_path / "exp")


@pytest.fixture
def results(experiment_dir) -> pd.DataFrame:
    return load_experiment(experiment_dir).results


# ------------------------------------------------------------------------------------------- collect


def test_load_skips_the_error_trial_and_says_so(experiment_dir):
    exp = load_experiment(experiment_dir)
    assert len(exp.results) == 12 and "spo_err" not in set(exp.results["trial_id"])
    assert len(exp.all_results) == 13
    assert "skipped 1 trial with status ERROR" in exp.skipped
    assert exp.params == ["loss", "beta", "spo_lambda", "init", "seed"]


def test_history_has_params_joined_and_only_kept_trials(experiment_dir):
    history = load_experiment(experiment_dir).history
    assert len(history) == 12 * 3
    assert 99.0 not in set(history["train/chosen_logp_delta"])
    row = history[(history["trial_id"] == "spo_0.3_2") & (history["step"] == 10)].iloc[0]
    assert (row["loss"], row["beta"], row["seed"]) == ("spo", 0.3, 2)
    assert row["train/chosen_logp_delta"] == pytest.approx(1.2)


def test_partial_sweep_without_history_loads_with_notes(tmp_path):
    directory = tmp_path / "partial"
    directory.mkdir()
    pd.DataFrame([
        {"trial_id": "a", "status": "TERMINATED", "error": "", "loss": "dpo", "beta": 0.1, "seed": 0, "eval/accuracy": 0.5},
        {"trial_id": "b", "status": "RUNNING", "error": "", "loss": "spo", "beta": 0.1, "seed": 0},
        {"trial_id": "c", "status": "RUNNING", "error": "", "loss": "spo", "beta": 0.1, "seed": 1},
    ]).to_csv(directory / "results.csv", index=False)  # fmt: skip
    exp = load_experiment(directory)
    assert list(exp.results["trial_id"]) == ["a"]
    assert exp.history.empty
    assert "skipped 2 trials with status RUNNING" in exp.skipped
    assert any("history.parquet" in note for note in exp.skipped)
    table = summary_table(exp.results, ["eval/accuracy", "eval/mass_correct"])
    assert list(table.columns) == ["loss", "beta", "n", "eval/accuracy mean", "eval/accuracy std"]
    assert np.isnan(table.loc[0, "eval/accuracy std"])  # one run: no sample std


def test_missing_directory_or_results_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_experiment(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="results.csv"):
        load_experiment(tmp_path / "empty")


# -------------------------------------------------------------------------------------------- tables


def test_summary_table_mean_std_and_n_over_seeds(results):
    table = summary_table(results, ["eval/accuracy"])
    assert list(table.columns) == ["loss", "beta", "spo_lambda", "init", "n", "eval/accuracy mean", "eval/accuracy std"]
    assert len(table) == 4
    for (loss, beta), values in ACCURACY.items():
        row = table[(table["loss"] == loss) & (table["beta"] == beta)].iloc[0]
        assert row["n"] == 3
        assert row["eval/accuracy mean"] == pytest.approx(sum(values) / 3)
        assert row["eval/accuracy std"] == pytest.approx(statistics.stdev(values))
    spo_03 = table[(table["loss"] == "spo") & (table["beta"] == 0.3)].iloc[0]
    assert spo_03["eval/accuracy mean"] == pytest.approx(0.683333, abs=1e-6)
    assert spo_03["eval/accuracy std"] == pytest.approx(0.104083, abs=1e-6)


def test_best_config_per_loss_ranks_by_mean_over_seeds(results):
    best = best_configs(results, "eval/accuracy")
    assert list(best["loss"]) == ["dpo", "spo"]
    assert list(best["beta"]) == [0.1, 0.1]
    assert best["eval/accuracy mean"].tolist() == pytest.approx([0.6, 0.816667], abs=1e-6)
    lowest = best_configs(results, "eval/accuracy", higher_is_better=False)
    assert list(lowest["beta"]) == [0.3, 0.3]


def test_paired_differences_match_hand_computed_spo_minus_dpo(results):
    pairs = paired_runs(results, "eval/accuracy")
    assert len(pairs) == 6
    assert sorted(np.round(pairs["diff"], 6)) == [0.15, 0.2, 0.2, 0.2, 0.2, 0.25]

    table = paired_differences(results, "eval/accuracy", n_resamples=2000, seed=7)
    assert list(table["beta"]) == [0.1, 0.3, "all"]
    expected = [(0.2 + 0.25 + 0.2) / 3, (0.2 + 0.15 + 0.2) / 3, 1.2 / 6]
    assert table["diff mean"].tolist() == pytest.approx(expected)
    assert table["n_pairs"].tolist() == [3, 3, 6]
    assert table.loc[2, "treatment mean"] - table.loc[2, "control mean"] == pytest.approx(0.2)
    for _, row in table.iterrows():
        assert row["ci low"] <= row["diff mean"] <= row["ci high"]
    # Resampled means of {0.15, 0.2, 0.25} pairs cannot leave the range of the pairs.
    assert 0.15 <= table.loc[2, "ci low"] and table.loc[2, "ci high"] <= 0.25
    again = paired_differences(results, "eval/accuracy", n_resamples=2000, seed=7)
    pd.testing.assert_frame_equal(table, again)


def test_paired_differences_skip_unmatched_runs(results):
    partial = results[~((results["loss"] == "dpo") & (results["seed"] == 2))]
    table = paired_differences(partial, "eval/accuracy", n_resamples=500)
    assert table["n_pairs"].tolist() == [2, 2, 4]
    assert table.loc[0, "diff mean"] == pytest.approx((0.2 + 0.25) / 2)


def test_bootstrap_interval_is_seeded_and_degenerate_for_constant_differences():
    values = np.array([0.1, 0.3, 0.2, 0.5])
    assert bootstrap_interval(values, seed=1) == bootstrap_interval(values, seed=1)
    low, high = bootstrap_interval(values, seed=1)
    assert 0.1 <= low < 0.275 < high <= 0.5
    assert bootstrap_interval(np.array([0.2, 0.2]), n_resamples=100) == pytest.approx((0.2, 0.2))


def parse_markdown(text: str) -> list[dict[str, str]]:
    lines = [line.strip().strip("|") for line in text.strip().splitlines()]
    header = [cell.strip() for cell in lines[0].split("|")]
    assert set(lines[1].replace("|", "").split()) == {"---"}
    return [dict(zip(header, (cell.strip() for cell in line.split("|")))) for line in lines[2:]]


def parse_latex(text: str) -> list[dict[str, str]]:
    lines = text.strip().splitlines()
    assert lines[0].startswith(r"\begin{tabular}") and lines[-1] == r"\end{tabular}"
    body = lines[lines.index(r"\toprule") + 1 : lines.index(r"\bottomrule")]
    body = [line.removesuffix(r" \\") for line in body if line != r"\midrule"]
    rows = [[cell.strip().replace(r"\_", "_") for cell in line.split(" & ")] for line in body]
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def mean_std(cell: str, separator: str) -> tuple[float, float]:
    mean, std = cell.strip("$").split(separator)
    return float(mean), float(std)


def test_the_paired_change_interval_resamples_runs_and_questions_as_a_loop_would():
    changes = np.array([[1, 0, -1, 1, 0], [0, 0, 1, 1, -1], [1, 1, 0, 0, 0]], dtype=float)
    low, high = paired_change_interval(changes, n_resamples=400, seed=3)
    rng = np.random.default_rng(3)  # the same draws, averaged the plain way: rows and columns picked by index
    runs, questions = rng.integers(0, 3, (400, 3)), rng.integers(0, 5, (400, 5))
    means = [changes[np.ix_(r, q)].mean() for r, q in zip(runs, questions)]
    assert (low, high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1e-12)
    assert paired_change_interval(np.full((2, 4), 0.25), n_resamples=50) == (0.25, 0.25)


def test_before_after_pairs_each_run_with_its_step_0_and_each_question_with_itself():
    results = pd.DataFrame([{"trial_id": t, "status": "TERMINATED", "loss": loss, "seed": seed, "eval/accuracy": acc}
                            for t, loss, seed, acc in [("a", "dpo", 0, 0.25), ("b", "dpo", 1, 0.5),
                                                       ("c", "spo", 0, 1.0), ("d", "spo", 1, 0.75)]])
    start = [1, 0, 0, 1]  # the init's outcome on 4 questions: accuracy 0.5
    ends = {"a": [0, 0, 0, 1], "b": [1, 0, 0, 1], "c": [1, 1, 1, 1], "d": [1, 1, 0, 1]}
    history = pd.DataFrame([{"trial_id": t, "step": step, "eval/accuracy": sum(v) / 4 if v else np.nan,
                             "eval/answers_correct": v}  # step 4: a row without an evaluation
                            for t in ends for step, v in ((0, start), (4, None), (8, ends[t]))])
    table = before_after(results, history, by=["loss"], n_resamples=2000)
    dpo, spo = table.to_dict("records")
    assert (dpo["loss"], dpo["n"], dpo["questions"]) == ("dpo", 2, 4)
    assert (dpo["before mean"], dpo["after mean"], dpo["change mean"]) == (0.5, 0.375, -0.125)
    assert (spo["before mean"], spo["after mean"], spo["change mean"]) == (0.5, 0.875, 0.375)
    # SPO's changes are [0, 1, 1, 0] and [0, 1, 0, 0]: every resample lies in [0, 1]; DPO's in [-1, 0].
    assert 0 <= spo["ci low"] <= 0.375 <= spo["ci high"] <= 1 and -1 <= dpo["ci low"] <= -0.125 <= dpo["ci high"] <= 0
    # Without per-question outcomes: runs alone, the usual bootstrap of the mean change over seeds.
    plain = before_after(results, history.drop(columns="eval/answers_correct"), by=["loss"])
    assert plain.loc[1, "change mean"] == 0.375 and np.isnan(plain.loc[1, "questions"])
    assert (plain.loc[1, "ci low"], plain.loc[1, "ci high"]) == bootstrap_interval(np.array([0.5, 0.25]))


def test_markdown_and_latex_tables_parse_back_to_the_numbers(results):
    table = summary_table(results, ["eval/accuracy", "eval/chosen_logp_delta"])
    for text, separator, parse in [(to_markdown(table), " ± ", parse_markdown), (to_latex(table), r" \pm ", parse_latex)]:
        rows = parse(text)
        assert len(rows) == 4
        spo_03 = next(r for r in rows if r["loss"] == "spo" and r["beta"] == "0.3")
        assert spo_03["n"] == "3" and spo_03["init"] == "base" and spo_03["spo_lambda"] == "1"
        assert mean_std(spo_03["eval/accuracy"], separator) == (0.683, 0.104)
        dpo_01 = next(r for r in rows if r["loss"] == "dpo" and r["beta"] == "0.1")
        assert mean_std(dpo_01["eval/accuracy"], separator) == (0.600, 0.100)
        assert mean_std(dpo_01["eval/chosen_logp_delta"], separator) == (-1.0, 0.0)


def test_write_table_writes_markdown_latex_and_full_precision_csv(results, tmp_path):
    table = summary_table(results, ["eval/accuracy"])
    paths = write_table(table, tmp_path / "tables" / "summary", decimals=2)
    assert [p.name for p in paths] == ["summary.md", "summary.tex", "summary.csv"]
    assert "0.68 ± 0.10" in paths[0].read_text()
    back = pd.read_csv(paths[2])
    assert back["eval/accuracy mean"].max() == pytest.approx((0.70 + 0.85 + 0.90) / 3)


# --------------------------------------------------------------------------------------------- plots


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.std() > 0
    rgba = np.ascontiguousarray((image[..., :3] * 255).astype(np.uint8))
    packed = rgba[..., 0].astype(np.uint32) << 16 | rgba[..., 1].astype(np.uint32) << 8 | rgba[..., 2]
    assert len(np.unique(packed)) > 2  # more than background and one ink colour


def rich_results(seed: int = 0) -> pd.DataFrame:
    """A sweep with every axis varied: 2 losses × 2 β × 2 λ (spo) × 2 inits × 2 seeds."""
    rng = np.random.default_rng(seed)
    rows = []
    for loss in ("dpo", "spo"):
        for beta in (0.1, 1.0):
            for lam in (0.5, 2.0) if loss == "spo" else (0.0,):
                for init in ("base", "sft_short"):
                    for s in (0, 1):
                        acc = rng.uniform(0.3, 0.9)
                        rows.append({"trial_id": f"{loss}{beta}{lam}{init}{s}", "loss": loss, "beta": beta,
                                     "spo_lambda": lam, "init": init, "seed": s, "eval/accuracy": acc,
                                     "eval/mass_correct": acc, "eval/mass_mistake": (1 - acc) / 2,
                                     "eval/mass_other": (1 - acc) / 4, "eval/mass_malformed": (1 - acc) / 4})  # fmt: skip
    return pd.DataFrame(rows)


def test_every_plot_is_a_valid_png(experiment_dir, tmp_path):
    exp = load_experiment(experiment_dir)
    rich = rich_results()
    written = [
        plots.plot_logp_evolution(exp.history, tmp_path / "logp.png"),
        plots.plot_accuracy_vs_beta(rich, tmp_path / "beta.png"),
        plots.plot_beta_lambda_heatmap(rich, tmp_path / "heat.png"),
        plots.plot_init_sensitivity(rich, tmp_path / "init.png"),
        plots.plot_mass_split(rich, tmp_path / "mass.png"),
    ]
    for path in written:
        assert path is not None
        assert_valid_png(path)


def test_plots_fall_back_to_eval_logp_and_return_none_when_data_is_missing(tmp_path):
    history = pd.DataFrame({"trial_id": ["a", "a"], "step": [0, 10], "loss": ["dpo", "dpo"],
                            "eval/chosen_logp_delta": [0.0, -1.0], "eval/rejected_logp_delta": [0.0, -2.0]})  # fmt: skip
    assert_valid_png(plots.plot_logp_evolution(history, tmp_path / "eval_logp.png"))

    one_run = rich_results().iloc[:1]
    assert plots.plot_logp_evolution(pd.DataFrame(columns=["trial_id", "step"]), tmp_path / "a.png") is None
    assert plots.plot_accuracy_vs_beta(one_run, tmp_path / "b.png") is None
    assert plots.plot_beta_lambda_heatmap(one_run, tmp_path / "c.png") is None
    one_lambda = rich_results().query("spo_lambda == 0.5 or loss == 'dpo'")  # two β, one λ: the demo's grid
    assert plots.plot_beta_lambda_heatmap(one_lambda, tmp_path / "c.png") is None
    one_beta = rich_results().query("beta == 0.1")  # two λ, one β
    assert plots.plot_beta_lambda_heatmap(one_beta, tmp_path / "c.png") is None
    assert plots.plot_init_sensitivity(one_run, tmp_path / "d.png") is None
    assert plots.plot_mass_split(one_run.drop(columns=[c for c in one_run if "mass" in c]), tmp_path / "e.png") is None
    assert not list(tmp_path.glob("[a-e].png"))


# -------------------------------------------------------------------------------------------- report


def test_write_report_links_existing_plots_and_lists_skipped_trials(experiment_dir):
    report = write_report(experiment_dir)
    text = report.read_text()
    assert "skipped 1 trial with status ERROR" in text
    assert "| loss | beta | spo_lambda | n | eval/accuracy |" in text
    assert "![" in text and "(plots/logp_evolution.png)" in text
    assert "Initialization sensitivity: not drawn" in text
    for stem in ("summary", "best_configs", "paired_spo_dpo"):
        for suffix in ("md", "tex", "csv"):
            assert (experiment_dir / "tables" / f"{stem}.{suffix}").is_file()
    for png in (experiment_dir / "plots").glob("*.png"):
        assert f"(plots/{png.name})" in text
        assert_valid_png(png)


def best_betas(directory: Path) -> dict[str, float]:
    best = pd.read_csv(directory / "tables" / "best_configs.csv")
    return dict(zip(best["loss"], best["beta"]))


def test_the_report_ranks_by_the_sweeps_own_metric_and_mode_and_says_so(experiment_dir):
    import yaml

    # eval/mass_mistake is 1 − accuracy here, so it ranks the β's the other way round from eval/accuracy.
    sweep = experiment_dir / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "hand-made", "tune": {"metric": "eval/mass_mistake", "mode": "max"}}))
    text = write_report(experiment_dir).read_text()
    assert "Main metric: `eval/mass_mistake` (the sweep's tune.metric; higher is better)." in text
    assert best_betas(experiment_dir) == {"dpo": 0.3, "spo": 0.3}  # means 0.5 / 0.317 beat 0.4 / 0.183
    assert "| loss | beta | spo_lambda | n | eval/mass_mistake |" in text

    sweep.write_text(yaml.safe_dump({"tune": {"metric": "eval/mass_mistake", "mode": "min"}}))
    text = write_report(experiment_dir).read_text()
    assert "Main metric: `eval/mass_mistake` (the sweep's tune.metric; lower is better)." in text
    assert best_betas(experiment_dir) == {"dpo": 0.1, "spo": 0.1}

    text = write_report(experiment_dir, metric="eval/accuracy").read_text()  # --metric wins over the sweep's
    assert "Main metric: `eval/accuracy` (--metric; higher is better)." in text
    assert best_betas(experiment_dir) == {"dpo": 0.1, "spo": 0.1}


def test_without_a_tune_metric_the_report_falls_back_to_accuracy(experiment_dir):
    text = write_report(experiment_dir).read_text()  # sweep.yaml: name only
    assert "Main metric: `eval/accuracy` (the default: sweep.yaml names no tune.metric; higher is better)." in text
    assert best_betas(experiment_dir) == {"dpo": 0.1, "spo": 0.1}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_report_cli_writes_report_md(experiment_dir):
    done = run_cli(str(experiment_dir), "--metric", "eval/accuracy")
    assert done.returncode == 0, done.stderr
    assert str(experiment_dir / "report.md") in done.stdout
    text = (experiment_dir / "report.md").read_text()
    assert "0.817 ± 0.104" in text  # spo β=0.1: mean and sample std of 0.70, 0.85, 0.90


def test_report_cli_on_a_missing_directory_exits_2_with_one_line(tmp_path):
    done = run_cli(str(tmp_path / "missing"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "missing") in lines[0]
    assert "Traceback" not in done.stderr


def test_report_metric_that_the_trials_never_reported_is_one_line_naming_the_nearest(experiment_dir, capsys):
    from analysis.report import main

    assert main([str(experiment_dir), "--metric", "eval/acuracy"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: --metric: 'eval/acuracy' is not a metric of ") and "\n" not in line
    assert line.endswith("(did you mean 'eval/accuracy' or 'eval/mass_correct'?)")
    assert not (experiment_dir / "report.md").exists()


def test_accuracy_vs_beta_draws_a_log_beta_axis_and_each_inits_step_0_value(experiment_dir, tmp_path,
                                                                           monkeypatch):
    drawn = {}
    original = plots.plot_accuracy_vs_beta

    def spy(results, path, metric="eval/accuracy", initial=None):
        drawn["initial"] = initial
        return original(results, path, metric, initial)

    monkeypatch.setattr(plots, "plot_accuracy_vs_beta", spy)
    from analysis import report
    exp = load_experiment(experiment_dir)
    report.draw_plots(exp, tmp_path, "eval/accuracy")
    assert drawn["initial"] == {}  # no run evaluated its initial weights
    inits = sorted(exp.history["init"].unique())
    at_start = {init: 0.25 + 0.5 * i for i, init in enumerate(inits)}  # every run from one init starts alike
    step_0 = exp.history["step"] == 0
    exp.history.loc[step_0, "eval/accuracy"] = exp.history.loc[step_0, "init"].map(at_start)
    report.draw_plots(exp, tmp_path, "eval/accuracy")
    assert drawn["initial"] == pytest.approx(at_start)

    from matplotlib.figure import Figure
    saved = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: saved.setdefault("figure", figure) and Path(path))
    rich = rich_results()  # β 0.1 and 1.0
    original(rich, tmp_path / "beta.png", initial={"base": 0.42})
    ax = saved["figure"].axes[0]
    assert isinstance(saved["figure"], Figure) and ax.get_xscale() == "log"
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [0.42]


def test_mass_split_puts_each_inits_step_0_mass_before_the_trained_bars(experiment_dir, tmp_path, monkeypatch):
    from analysis import report
    exp = load_experiment(experiment_dir)
    step_0 = (exp.history["step"] == 0).to_numpy()
    rng = np.random.default_rng(3)
    at_start = rng.dirichlet(np.ones(4), size=step_0.sum())  # each run's step-0 split of the mass: rows sum to 1
    for k, column in enumerate(plots.MASS_COLUMNS):
        exp.history.loc[step_0, column] = at_start[:, k]
    figures = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.setdefault(Path(path).stem, figure) and Path(path))
    report.draw_plots(exp, tmp_path, "eval/accuracy")

    ax = figures["mass_split"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base (step 0)", "dpo", "spo"]
    final = exp.results.groupby("loss")[list(plots.MASS_COLUMNS)].mean()
    for k, (column, bars) in enumerate(zip(plots.MASS_COLUMNS, ax.containers)):
        heights = [bar.get_height() for bar in bars.patches]
        # 12 kept runs, all from `base`: the init's bar is the mean of their step-0 values
        assert heights == pytest.approx([at_start[:, k].mean(), final.loc["dpo", column], final.loc["spo", column]])
        assert [bar.get_hatch() for bar in bars.patches] == ["//", None, None]
    assert sum(bars.patches[0].get_height() for bars in ax.containers) == pytest.approx(1.0)

    figures.clear()
    plain = load_experiment(experiment_dir)  # no step-0 evaluation: no reference bar
    report.draw_plots(plain, tmp_path, "eval/accuracy")
    assert [t.get_text() for t in figures["mass_split"].axes[0].get_xticklabels()] == ["dpo", "spo"]


# --------------------------------------------------------------------------------------------- W&B


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No credentials and no WANDB_MODE (conftest's `disabled` removed), wandb's own folders in tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def same_cell(logged, written) -> bool:
    """A W&B table cell against the CSV's: numbers to float64 rounding, text as text, missing as missing."""
    if logged is None or (isinstance(logged, float) and np.isnan(logged)):
        return pd.isna(written)
    if isinstance(logged, str):
        return logged == str(written)
    return bool(np.isclose(float(logged), float(written), rtol=1e-15, atol=0.0))


def test_the_report_logs_its_tables_and_plots_as_a_report_run_in_the_sweeps_group(experiment_dir, offline_wandb):
    import json

    from conftest import read_wandb_records
    (experiment_dir / "sweep.yaml").write_text("name: hand-made\nwandb: {mode: auto, project: spo-test, tags: [nightly]}\n")
    write_report(experiment_dir, wandb_mode="")  # sweep.yaml's mode: auto, and no key → an offline run
    runs = list((experiment_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = read_wandb_records(next(runs[0].glob("*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type, run.display_name, run.project) == ("hand-made", "report", "hand-made-report",
                                                                           "spo-test")
    assert list(run.tags) == ["nightly", "report"]

    media = runs[0] / "files" / "media"
    stems = sorted(p.stem for p in (experiment_dir / "tables").glob("*.csv"))
    assert {"summary", "mass", "best_configs", "paired_spo_dpo", "status_counts"} <= set(stems)
    for stem in stems:  # every table as the CSV has it: the same columns, rows and values
        written = pd.read_csv(experiment_dir / "tables" / f"{stem}.csv")
        logged_files = list((media / "table" / "tables").glob(f"{stem}_0_*.table.json"))
        if written.empty:
            assert not logged_files
            continue
        logged = json.loads(logged_files[0].read_text())
        assert logged["columns"] == list(written.columns)
        assert len(logged["data"]) == len(written)
        for row, (_, expected) in zip(logged["data"], written.iterrows()):
            assert all(same_cell(a, b) for a, b in zip(row, expected)), (stem, row, list(expected))
    pngs = sorted((experiment_dir / "plots").glob("*.png"))
    assert pngs
    for png in pngs:  # every figure, byte for byte
        (logged,) = (media / "images" / "plots").glob(f"{png.stem}_0_*.png")
        assert logged.read_bytes() == png.read_bytes()


def test_the_reports_wandb_run_follows_wandb_mode_and_never_fails_the_report(experiment_dir, offline_wandb,
                                                                             monkeypatch, capsys):
    import wandb

    init = wandb.init
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: pytest.fail("wandb.init called under WANDB_MODE=disabled"))
    write_report(experiment_dir, wandb_mode="offline")
    assert not (experiment_dir / "wandb").exists()

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.delenv("WANDB_MODE")

    def broken_table(*args, **kwargs):
        raise RuntimeError("no tables today")

    monkeypatch.setattr(wandb, "Table", broken_table)
    report = write_report(experiment_dir, wandb_mode="offline")
    assert report.is_file() and "## Summary" in report.read_text()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wandb: warning")]
    assert warnings == ["wandb: warning: wandb could not take the report, nothing logged: RuntimeError: no tables today"]


def test_report_cli_names_a_wandb_mode_it_does_not_know_and_exits_2(experiment_dir):
    done = run_cli(str(experiment_dir), "--wandb", "sometimes")
    assert done.returncode == 2 and "--wandb: invalid choice: 'sometimes'" in done.stderr
    assert "Traceback" not in done.stderr and not (experiment_dir / "report.md").exists()


# ---------------------------------------------------------------------------------------------------
# Self-training rounds: round 0 is step 0, round r the last evaluated step of round r

# per (loss, seed): each question's outcome (4 questions) at round 0, 1, 2
ROUND_ITEMS = {
    ("dpo", 0): [[1, 0, 0, 1], [1, 1, 0, 1], [0, 1, 0, 0]],
    ("dpo", 1): [[1, 0, 0, 1], [1, 0, 0, 1], [0, 0, 0, 1]],
    ("spo", 0): [[1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 1, 1]],
    ("spo", 1): [[1, 0, 0, 1], [1, 1, 1, 0], [1, 1, 1, 0]],
}


def write_rounds_experiment(directory: Path) -> Path:
    """Two rounds of 4 steps, evaluated at steps 0, 4 and 8 (logged every 2), per loss and seed."""
    directory.mkdir(parents=True, exist_ok=True)
    rows, history = [], []
    for (loss, seed), outcomes in ROUND_ITEMS.items():
        trial_id = f"{loss}_{seed}"
        for step in (0, 2, 4, 6, 8):
            row = {"trial_id": trial_id, "step": step, "round": max(1, (step + 3) // 4), "train/loss": 0.5}
            if step % 4 == 0:
                r = step // 4
                row.update({"eval/accuracy": sum(outcomes[r]) / 4, "eval/answers_correct": outcomes[r],
                            "eval/chosen_logp_delta": -r * (2.0 if loss == "dpo" else 0.5),
                            "eval/rejected_logp_delta": -3.0 * r, "eval/chosen_logps": -10.0 - r * seed,
                            "sampler/sample_accuracy": 0.2 + 0.1 * max(r, 1) + 0.05 * seed,
                            "sampler/pairs": 90.0 - 10 * max(r, 1)})
            history.append(row)
        rows.append({"trial_id": trial_id, "status": "TERMINATED", "error": "", "loss": loss, "beta": 0.1,
                     "seed": seed, "step": 8, "round": 2, "eval/accuracy": sum(outcomes[2]) / 4})
    pd.DataFrame(rows).to_csv(directory / "results.csv", index=False)
    pd.DataFrame(history).to_parquet(directory / "history.parquet")
    return directory


def test_round_ends_take_step_0_and_each_rounds_last_evaluation(tmp_path):
    from analysis.tables import round_ends

    exp = load_experiment(write_rounds_experiment(tmp_path / "rounds"))
    assert exp.history.loc[exp.history["step"] == 2, "round"].tolist() == [1] * 4  # not results.csv's final round
    ends = round_ends(exp.results, exp.history).sort_values(["trial_id", "round"])
    spo1 = ends.loc[ends["trial_id"] == "spo_1"]
    assert spo1["round"].tolist() == [0, 1, 2] and spo1["step"].tolist() == [0, 4, 8]
    assert spo1["eval/accuracy"].tolist() == [0.5, 0.75, 0.75]
    assert spo1["chosen from init"].tolist() == [0.0, -1.0, -2.0]  # eval/chosen_logps - its step-0 value
    assert spo1["samples right"].tolist() == pytest.approx([0.35, 0.35, 0.45])
    assert [list(v) for v in spo1["items"]] == ROUND_ITEMS[("spo", 1)]


def test_per_round_changes_are_paired_with_round_0_run_by_run_and_question_by_question(tmp_path):
    from analysis.tables import per_round, round_differences, round_ends

    exp = load_experiment(write_rounds_experiment(tmp_path / "rounds"))
    ends = round_ends(exp.results, exp.history)
    table = per_round(ends, by=["loss"]).set_index(["loss", "round"])
    # DPO: round 0 0.5 and 0.5; round 2 0.25 and 0.25 → change -0.25; SPO round 2: 1.0 and 0.75 → +0.375
    assert table.loc[("dpo", 2), "change mean"] == pytest.approx(-0.25)
    assert table.loc[("spo", 2), "change mean"] == pytest.approx(0.375)
    assert table.loc[("spo", 1), "eval/accuracy mean"] == pytest.approx(0.75)
    changes = np.array(ROUND_ITEMS[("spo", 0)][2]) - np.array(ROUND_ITEMS[("spo", 0)][0]), \
        np.array(ROUND_ITEMS[("spo", 1)][2]) - np.array(ROUND_ITEMS[("spo", 1)][0])
    low, high = paired_change_interval(np.stack(changes))
    assert (table.loc[("spo", 2), "ci low"], table.loc[("spo", 2), "ci high"]) == (low, high)
    assert np.isnan(table.loc[("spo", 0)].get("change mean", np.nan))
    assert table.loc[("dpo", 2), "chosen Δ mean"] == -4.0 and table.loc[("spo", 2), "chosen Δ mean"] == -1.0
    assert table.loc[("dpo", 2), "pairs mean"] == 70.0
    differences = round_differences(ends, "spo", "dpo").set_index("round")
    # round 2: seed 0 1.0 - 0.25, seed 1 0.75 - 0.25 → 0.625
    assert differences.loc[2, "diff mean"] == pytest.approx(0.625) and differences.loc[2, "n_pairs"] == 2
    assert differences.loc[0, "diff mean"] == 0.0


def test_the_report_has_the_per_round_tables_and_figure(tmp_path):
    directory = write_rounds_experiment(tmp_path / "rounds")
    report = write_report(directory).read_text()
    assert "## Per round (self-training)" in report and "## Per round: SPO − DPO" in report
    assert_valid_png(directory / "plots" / "rounds.png")
    assert "![Self-training rounds](plots/rounds.png)" in report
    one_round = plots.plot_rounds(pd.DataFrame({"round": [0], "eval/accuracy mean": [0.5]}), tmp_path / "x.png")
    assert one_round is None
