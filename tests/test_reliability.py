"""Reliability: bad input, failing trials, crashed workers, interrupted sweeps (docs/reliability.md).

Fast: every kind of bad input (config, search space, override, path, data) through the real CLIs is one
`error:` line on stderr naming the key, file or row, exit code 2, no traceback, and Ray never starts.
Slow (Ray): trials that diverge or raise are recorded while the others run on, a SIGTERM stops the sweep
and `--resume` finishes it; a worker killed mid-trial restarts from its checkpoint and finishes. Failures
are injected with the test-only `SPO_RAY_FAULT` variable (`spo_ray.trainer.injected_faults`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "sweeps" / "smoke.yaml")
#: The smoke sweep from an untrained tiny model: no init to build, trials of seconds.
TINY = ["model.init=scratch", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2"]


def run_module(module: str, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def the_error_line(stderr: str) -> str:
    """The one line a user error prints (and nothing else on stderr)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def text_pairs(n: int = 20) -> list[dict]:
    """Pairs of n distinct prompts, in characters the arithmetic tokenizer knows."""
    return [{"prompt": f"Q:{i}+1=?", "chosen": f"A:{i + 1}", "rejected": f"A:{i + 2}"} for i in range(n)]


def jsonl(rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A local tokenizer folder to stand for `model.init` with data.source files (no download)."""
    from spo_ray.tasks.arithmetic import make_tokenizer
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before Ray

@dataclass
class Case:
    """A bad input: `args` to the CLI ({tmp}: the test's folder) after writing `files` into {tmp};
    `says`: what the error line must contain (the key, file or row)."""
    args: list[str]
    says: str
    files: dict[str, str | bytes] = field(default_factory=dict)

    def prepare(self, tmp_path: Path, tokenizer_dir: Path, storage: bool = True) -> list[str]:
        """Write the files; the arguments, storing under tmp_path (the sweep command's --storage-path)."""
        for name, content in self.files.items():
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        fill = lambda text: text.replace("{tmp}", str(tmp_path)).replace("{tokenizer}", str(tokenizer_dir))
        return [fill(a) for a in self.args] + (["--storage-path", str(tmp_path / "results")] if storage else [])


def on_files(path: str, *sets: str) -> list[str]:
    """The smoke sweep on a pair file, with the tokenizer folder as the model."""
    return [SMOKE, "--set", "data.source=files", f"data.path={{tmp}}/{path}", "model.init={tokenizer}", *sets]


#: The smoke sweep under Optuna (one loss, β searched) and under PBT (its smoke-sized settings, one loss).
OPTUNA = [SMOKE, "--set", "tune.search=optuna", "loss.name=spo", "loss.beta={loguniform: [0.01, 1]}"]
PBT = [SMOKE, "--set", "tune.scheduler=pbt", "tune.perturbation_interval=3", "train.checkpoint_every=3",
       "tune.mutations={loss.beta: {loguniform: [0.01, 1]}}", "tune.max_concurrent_trials=null"]

SWEEP_CASES = {
    # the sweep file
    "missing sweep file": Case(["{tmp}/missing.yaml"], "missing.yaml: no such file"),
    "invalid YAML names its line": Case(["{tmp}/broken.yaml"], "broken.yaml: line 3:",
                                        files={"broken.yaml": "loss:\n  name: dpo\n  beta: 0.1: 2\n"}),
    "unreadable sweep file": Case(["{tmp}/binary.yaml"], "binary.yaml: cannot read",
                                  files={"binary.yaml": b"loss: \xff\xfe\x00\n"}),
    "sweep file not a mapping": Case(["{tmp}/list.yaml"], "list.yaml: must hold a mapping", files={"list.yaml": "- a\n"}),
    "empty sweep file": Case(["{tmp}/empty.yaml"], "empty.yaml: holds no keys", files={"empty.yaml": "# only a comment\n"}),
    "sweep file of an empty mapping": Case(["{tmp}/braces.yaml"], "braces.yaml: holds no keys", files={"braces.yaml": "{}\n"}),
    # keys
    "unknown key with a suggestion": Case(["{tmp}/typo.yaml"], "loss.bta: unknown key (did you mean 'loss.beta'?)",
                                          files={"typo.yaml": "loss: {bta: 0.1}\n"}),
    "unknown section with a suggestion": Case(["{tmp}/trian.yaml"], "trian: unknown key (did you mean 'train'?)",
                                              files={"trian.yaml": "trian: {max_steps: 5}\n"}),
    "unknown --set key with a suggestion": Case([SMOKE, "--set", "train.max_step=5"],
                                                "--set train.max_step: unknown key (did you mean 'train.max_steps'?)"),
    "--set without a value": Case([SMOKE, "--set", "loss.beta"], "--set loss.beta: expected KEY=VALUE"),
    "--set value not YAML": Case([SMOKE, "--set", "loss.beta={grid: [1"], "--set loss.beta: value"),
    # types and ranges
    "wrong type": Case([SMOKE, "--set", "train.max_steps=many"], "train.max_steps:"),
    "section given a value": Case([SMOKE, "--set", "loss=dpo"], "loss: must be a mapping"),
    "beta zero": Case([SMOKE, "--set", "loss.beta=0"], "loss.beta:"),
    "lambda negative": Case([SMOKE, "--set", "loss.spo_lambda=-0.5"], "loss.spo_lambda:"),
    "batch size zero": Case([SMOKE, "--set", "train.batch_size=0"], "train.batch_size:"),
    "batch not divisible by the workers": Case([SMOKE, "--set", "scaling.num_workers=3"],
                                               "train.batch_size: 16 is not divisible by num_workers"),
    "unknown loss": Case([SMOKE, "--set", "loss.name=dpoo"], "loss.name:"),
    "unknown estimator": Case([SMOKE, "--set", "loss.spo_estimator=two_step"], "loss.spo_estimator:"),
    # search spaces
    "empty grid": Case([SMOKE, "--set", "train.seed={grid: []}"], "train.seed: grid needs a non-empty list"),
    "bad value behind a good one in a grid": Case([SMOKE, "--set", "loss.beta={grid: [0.1, -1]}"], "loss.beta:"),
    "loguniform from zero": Case([SMOKE, "--set", "loss.beta={loguniform: [0, 1]}"], "loss.beta: loguniform needs low > 0"),
    "sweeping a sweep setting": Case([SMOKE, "--set", "tune.num_samples={grid: [1, 2]}"],
                                     "tune.num_samples: cannot be swept"),
    # searchers and PBT (tune.search, tune.scheduler: pbt): checked before Ray, whose errors are traces
    "searcher with a grid axis": Case([SMOKE, "--set", "tune.search=optuna", "loss.beta={loguniform: [0.01, 1]}"],
                                      "loss.name: tune.search: optuna cannot take a grid axis"),
    "searcher searching the seed": Case(OPTUNA + ["train.seed={randint: [0, 10]}"],
                                        "train.seed: a searcher must not search the seed"),
    "searcher with nothing to search": Case([SMOKE, "--set", "tune.search=optuna", "loss.name=spo"],
                                            "tune.search: optuna needs a search space"),
    "searcher point outside its space": Case(OPTUNA + ["tune.points_to_evaluate=[{loss.beta: 5}]"],
                                             "tune.points_to_evaluate[0].loss.beta: 5 is outside its search space"),
    "searcher point missing a key": Case(OPTUNA + ["tune.points_to_evaluate=[{}]"],
                                         "tune.points_to_evaluate[0]: gives no value for loss.beta"),
    "points without a searcher": Case([SMOKE, "--set", "tune.points_to_evaluate=[{loss.beta: 0.1}]"],
                                      "tune.points_to_evaluate: only tune.search: optuna"),
    "PBT without checkpoints": Case(PBT + ["train.checkpoint_every=0"],
                                    "train.checkpoint_every: PBT copies a trial's checkpoint"),
    "PBT mutating a non-numeric key": Case(PBT + ["tune.mutations={loss.name: {choice: [dpo, spo]}}"],
                                           "tune.mutations.loss.name: cannot be mutated"),
    "PBT mutating a typo'd key": Case(PBT + ["tune.mutations={loss.bta: {uniform: [0.1, 1]}}"],
                                      "tune.mutations.loss.bta: unknown key (did you mean 'loss.beta'?)"),
    "PBT mutation out of range": Case(PBT + ["tune.mutations={loss.beta: {uniform: [0, 1]}}"],
                                      "tune.mutations.loss.beta: 0 is out of range"),
    "PBT mutation that is a grid": Case(PBT + ["tune.mutations={loss.beta: {grid: [0.1, 1]}}"],
                                        "tune.mutations.loss.beta: a mutation is"),
    "PBT comparing between evaluations": Case(PBT + ["tune.perturbation_interval=2", "train.checkpoint_every=2"],
                                              "tune.perturbation_interval: 2 is not a multiple of train.eval_every"),
    "PBT never perturbing": Case(PBT + ["tune.perturbation_interval=6"],
                                 "tune.perturbation_interval: 6 steps is not below train.max_steps"),
    "PBT with Ray Train trials": Case(PBT + ["scaling.num_workers=2"],
                                      "tune.scheduler: pbt cannot run Ray Train trials"),
    "PBT with a concurrency limit": Case(PBT + ["tune.max_concurrent_trials=2"],
                                         "tune.max_concurrent_trials: PBT needs its whole population"),
    "PBT with a searcher": Case(PBT + ["tune.search=optuna", "loss.name=spo", "loss.beta={loguniform: [0.01, 1]}"],
                                "tune.scheduler: pbt cannot run with tune.search: optuna"),
    "mutations without PBT": Case([SMOKE, "--set", "tune.mutations={loss.beta: {uniform: [0.1, 1]}}"],
                                  "tune.mutations: only tune.scheduler: pbt perturbs trials"),
    "schedule of a key a run cannot change": Case([SMOKE, "--set", "schedule={loss.name: [[0, 1]]}"],
                                                  "schedule: loss.name cannot change during a run"),
    # paths and the experiment directory
    "name with a slash": Case([SMOKE, "--name", "a/b"], "name: 'a/b' must be a plain folder name"),
    "resume of nothing": Case([SMOKE, "--resume"], "holds no sweep to resume"),
    "experiment exists": Case([SMOKE], "this experiment exists; pass --resume",
                              files={"results/smoke/results.csv": "trial_id,status\n"}),
    # pair data (read by the driver before Ray starts)
    "data file missing": Case(on_files("nope.jsonl"), "nope.jsonl: no such file"),
    "data file of unknown type": Case(on_files("pairs.txt"), "pairs.txt: unknown file type '.txt'",
                                      files={"pairs.txt": "x"}),
    "data path not given": Case([SMOKE, "--set", "data.source=files", "model.init={tokenizer}"],
                                "data.path: required for data.source files"),
    "malformed JSON row": Case(on_files("pairs.jsonl"), "pairs.jsonl line 2: malformed JSON",
                               files={"pairs.jsonl": jsonl([text_pairs(1)[0], "{not json"])}),
    "missing column": Case(on_files("pairs.jsonl"), "pairs.jsonl line 1: missing column(s) 'rejected'",
                           files={"pairs.jsonl": jsonl({"prompt": p["prompt"], "chosen": p["chosen"]}
                                                       for p in text_pairs())}),
    "cell of the wrong type": Case(on_files("pairs.jsonl"), "pairs.jsonl line 3 column chosen: expected text",
                                   files={"pairs.jsonl": jsonl(text_pairs(2) + [{**text_pairs(1)[0], "chosen": 7}])}),
    "unknown data.columns key": Case(on_files("pairs.jsonl", "data.columns={reward: x}"), "data.columns.reward:",
                                     files={"pairs.jsonl": jsonl(text_pairs())}),
    "nothing left after filtering": Case(on_files("pairs.jsonl"), "pairs.jsonl: no training pairs left after filtering",
                                         files={"pairs.jsonl": jsonl({**p, "rejected": p["chosen"]}
                                                                     for p in text_pairs())}),
    "batch larger than the pairs": Case(on_files("pairs.jsonl", "train.batch_size=64"),
                                        "train.batch_size: 64 is larger than the 18 training pairs",
                                        files={"pairs.jsonl": jsonl(text_pairs())}),
    "built-in init with a pair file": Case(on_files("pairs.jsonl", "model.init=sft_short"),
                                           "model.init: 'sft_short' is a built-in init",
                                           files={"pairs.jsonl": jsonl(text_pairs())}),
    "hub dataset missing a column": Case([SMOKE, "--set", "data.source=hub", "data.path={tmp}/dataset",
                                          "model.init={tokenizer}"], "missing column(s) 'rejected'",
                                         files={"dataset/train.jsonl": jsonl({"prompt": p["prompt"], "chosen": p["chosen"]}
                                                                             for p in text_pairs())}),
    "model without a tokenizer": Case(on_files("pairs.jsonl", "model.init={tmp}/no_model"),
                                      "model.init: cannot load a tokenizer", files={"pairs.jsonl": jsonl(text_pairs())}),
    # sampled pairs
    "sampled pairs from prompts without answers": Case(on_files("pairs.jsonl", "data.sampled_pairs={}"),
                                                       "pairs.jsonl line 1: missing column(s) 'answer'",
                                                       files={"pairs.jsonl": jsonl(text_pairs())}),
    "sft on samples without sampled pairs": Case([SMOKE, "--set", "model.sft_steps=4"],
                                                 "model.sft_steps: SFT on the sampler's own correct answers needs "
                                                 "data.sampled_pairs"),
    "sampler samples too few": Case([SMOKE, "--set", "data.sampled_pairs={samples_per_prompt: 1}"],
                                    "data.sampled_pairs.samples_per_prompt:"),
    "chat arithmetic operands the wrong way round": Case([SMOKE, "--set", "data.source=chat_arithmetic",
                                                          "data.chat_arithmetic.operands=[9, 2]"],
                                                         "data.chat_arithmetic.operands: needs [low, high]"),
}


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """Bad input must be found before Ray starts: make starting it fail the test."""
    import spo_ray.sweep

    def start_ray():
        raise AssertionError("Ray was started for bad input")
    monkeypatch.setattr(spo_ray.sweep, "start_ray", start_ray)


@pytest.mark.parametrize("case", list(SWEEP_CASES.values()), ids=list(SWEEP_CASES))
def test_bad_sweep_input_is_one_line_naming_the_culprit_and_exit_2(case, tmp_path, tokenizer_dir, capsys,
                                                                    ray_must_not_start):
    from spo_ray.sweep import main
    assert main(case.prepare(tmp_path, tokenizer_dir)) == 2
    assert case.says in the_error_line(capsys.readouterr().err)


def test_a_sampler_that_gives_no_pairs_stops_the_sweep_before_any_trial(tmp_path, capsys, monkeypatch):
    """The driver samples every table before the first trial (here in-process instead of on Ray's workers) and
    builds the pairs: none (an untrained model is never right, and no gold fallback) is one line, exit 2."""
    import spo_ray.distributed
    import spo_ray.sweep
    from spo_ray.sampling import write_samples, table_path

    def sample_here(job, directory, sweep):
        write_samples(table_path(directory, job.key), *job.generate())
    monkeypatch.setattr(spo_ray.sweep, "start_ray", lambda: None)
    monkeypatch.setattr(spo_ray.sweep, "start_build_locks", lambda: None)
    monkeypatch.setattr(spo_ray.sweep, "stop_on_sigterm", lambda: None)
    monkeypatch.setattr(spo_ray.distributed, "sample_on_cluster", sample_here)
    monkeypatch.setattr(spo_ray.sweep, "build_tuner", lambda *args: pytest.fail("a trial was about to start"))
    code = spo_ray.sweep.main([SMOKE, "--storage-path", str(tmp_path), "--set", *TINY,
                               "data.sampled_pairs={samples_per_prompt: 2, prompts: 6, gold_fallback: false, "
                               "max_new_tokens: 4}"])
    assert code == 2
    stderr = capsys.readouterr().err  # after the model's loading bars (the sampler ran): the one error line
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(
        "error: data.sampled_pairs: the sampler gave no pairs: 0 of 12 samples correct over 6 prompts (0 prompts "
        "always right, 6 never right)")


def check_through_the_command(module: str, cases: dict[str, Case], tmp_path: Path, tokenizer_dir: Path) -> None:
    """Each case as `python -m <module>`: exit code 2 and the one error line, as a shell sees them. The
    processes run at once (each pays Python's and torch's start-up)."""
    runs = {}
    for name, case in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        if module == "spo_ray.sweep":
            args = case.prepare(folder, tokenizer_dir)
        else:  # one run: its output folder instead of a storage path
            args = case.prepare(folder, tokenizer_dir, storage=False) + ["--output", str(folder / "run"),
                                                                         "--no-progress"]
        runs[name] = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                                      env={**os.environ, "WANDB_MODE": "disabled"},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, process in runs.items():
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 2, (name, stderr)
        assert cases[name].says in the_error_line(stderr), name
        if module == "spo_ray.train":  # a run that never started leaves no output folder behind
            assert not (tmp_path / name.replace(" ", "_") / "run").exists(), name


def test_bad_input_through_the_sweep_command(tmp_path, tokenizer_dir):
    names = ["invalid YAML names its line", "empty sweep file", "unknown key with a suggestion", "beta zero",
             "resume of nothing", "missing column"]
    check_through_the_command("spo_ray.sweep", {name: SWEEP_CASES[name] for name in names}, tmp_path, tokenizer_dir)


TRAIN_CASES = {
    "unknown key": Case([SMOKE, "--set", "loss.name=dpo", "loss.bta=1"], "--set loss.bta: unknown key"),
    "data file missing": Case(on_files("nope.jsonl", "loss.name=dpo"), "nope.jsonl: no such file"),
    "missing column": Case(on_files("pairs.jsonl", "loss.name=dpo"), "pairs.jsonl line 1: missing column(s) 'rejected'",
                           files={"pairs.jsonl": jsonl({"prompt": p["prompt"], "chosen": p["chosen"]}
                                                       for p in text_pairs())}),
    "batch larger than the pairs": Case(on_files("pairs.jsonl", "loss.name=dpo", "train.batch_size=64"),
                                        "train.batch_size: 64 is larger than the 18 training pairs",
                                        files={"pairs.jsonl": jsonl(text_pairs())}),
}


def test_bad_input_through_the_train_command(tmp_path, tokenizer_dir):
    """`python -m spo_ray.train` (one run, no Ray) reports the same errors the same way."""
    check_through_the_command("spo_ray.train", TRAIN_CASES, tmp_path, tokenizer_dir)


def test_fault_injection_is_inert_unless_set(monkeypatch, tmp_path):
    from spo_ray.config import validate_run
    from spo_ray.trainer import FAULT_ENV, injected_faults
    config = validate_run({"loss": {"name": "spo"}}).run_config()
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert injected_faults(config, str(tmp_path)) is None
    monkeypatch.setenv(FAULT_ENV, "diverge_at=3@loss.name=dpo")  # another trial's fault
    assert injected_faults(config, str(tmp_path)) is None
    monkeypatch.setenv(FAULT_ENV, "diverge_at=3@loss.name=spo; raise_at=5; crash_worker_at=9:once")
    fault = injected_faults(config, str(tmp_path))
    assert [fault(step) for step in (1, 2, 3, 4)] == [False, False, True, False]
    with pytest.raises(RuntimeError, match="injected fault at step 5"):
        fault(5)
    monkeypatch.setenv(FAULT_ENV, "explode_at=2")
    with pytest.raises(ValueError, match="cannot parse"):
        injected_faults(config, str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# Slow: failing trials, interrupted sweeps, crashed workers (Ray)

def results_of(directory: Path) -> pd.DataFrame:
    """results.csv indexed by loss; numbers as numbers (NaN where a trial has none), errors as text."""
    return pd.read_csv(directory / "results.csv").fillna({"error": ""}).set_index("loss")


@pytest.mark.slow
def test_failed_trials_are_recorded_while_the_rest_run_on_and_sigterm_then_resume_finishes_them(tmp_path):
    """spo diverges at step 12 and ipo raises at step 5 while dpo trains; a SIGTERM stops the sweep (exit
    130) with what finished saved; `--resume` runs dpo to the end and the sweep exits 1 with the count.
    Before the resume, dpo's checkpoints but the oldest are deleted, as a store that went down between Tune
    deleting an old checkpoint and saving its state leaves them: dpo resumes from the oldest, with a warning."""
    max_steps = 600
    args = [SMOKE, "--storage-path", tmp_path, "--name", "failing", "--set", *TINY,
            "loss.name={grid: [spo, ipo, dpo]}", f"train.max_steps={max_steps}", "train.log_every=10",
            "train.eval_every=200", "train.probe_every=200", "train.checkpoint_every=50", "tune.max_failures=0",
            "tune.keep_checkpoints=2"]
    env = {**os.environ, "WANDB_MODE": "disabled",
           "SPO_RAY_FAULT": "diverge_at=12@loss.name=spo; raise_at=5@loss.name=ipo"}
    directory = tmp_path / "failing"
    process = subprocess.Popen([sys.executable, "-m", "spo_ray.sweep", *map(str, args)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, running = time.time() + 180, False
    while time.time() < deadline and process.poll() is None and not running:
        if (directory / "results.csv").exists():
            results = results_of(directory)
            running = (set(results.index) == {"spo", "ipo", "dpo"} and results.loc["spo", "status"] == "DIVERGED"
                       and results.loc["ipo", "status"] == "ERROR" and results.loc["dpo", "status"] == "RUNNING"
                       and results.loc["dpo", "step"] > 100)  # dpo's checkpoints of steps 50 and 100 registered
        time.sleep(0.2)
    assert running, "the failing trials did not end while dpo was training"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    interrupted = results_of(directory)
    assert interrupted.loc["dpo", "status"] != "TERMINATED", "dpo finished before the SIGTERM"
    assert "--resume" in output

    import torch
    [dpo_folder] = directory.glob(f"run_trial_{interrupted.loc['dpo', 'trial_id']}_*")
    oldest, *newer = sorted(dpo_folder.glob("checkpoint_*"))
    assert newer, "dpo had one checkpoint"
    for folder in newer:
        shutil.rmtree(folder)
    step = torch.load(oldest / "trainer_state.pt", weights_only=True)["step"]
    resumed = run_module("spo_ray.sweep", *args, "--resume", env=env, timeout=240)
    assert resumed.returncode == 1, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"is not in the store; it resumes from {oldest}" in resumed.stderr
    assert f"resuming from the checkpoint of step {step} (" in resumed.stdout + resumed.stderr
    assert "2 of 3 trials failed" in resumed.stderr
    results = results_of(directory)
    assert len(results) == 3 and results["trial_id"].is_unique
    diverged, errored, finished = results.loc["spo"], results.loc["ipo"], results.loc["dpo"]
    assert (diverged["status"], diverged["error"]) == ("DIVERGED", "loss is not finite at step 12")
    assert diverged["step"] == 10 and float(diverged["train/loss"]) > 0  # the last finite row
    assert errored["status"] == "ERROR" and errored["error"] == "RuntimeError: injected fault at step 5"
    assert (finished["status"], finished["error"], finished["step"]) == ("TERMINATED", "", max_steps)
    history = pd.read_parquet(directory / "history.parquet")
    assert not history.duplicated(["trial_id", "step"]).any()
    assert history.groupby("trial_id")["step"].max().to_dict() == {
        diverged["trial_id"]: 10, finished["trial_id"]: max_steps}


def reported_rows(directory: Path) -> list[dict]:
    """Every row the one trial reported to Tune, in order (its result.json: after a restart from a checkpoint
    it may also hold rows the failed attempt reported past that checkpoint)."""
    [result_file] = directory.glob("*/result.json")
    return [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("ray_train", [True, False], ids=["ray_train", "in_process"])
def test_a_worker_killed_mid_trial_restarts_from_its_checkpoint_and_finishes(tmp_path, ray_train):
    """The worker dies (os._exit) before step 7, once; Ray Train (or Tune, in-process) restarts it from
    the step-4 checkpoint, so steps 5 and 6 are trained twice but recorded once, and the trial finishes."""
    args = [SMOKE, "--storage-path", tmp_path, "--name", "crash", "--set", *TINY, "loss.name=dpo",
            "train.max_steps=8", "train.log_every=1", "train.eval_every=8", "train.probe_every=8",
            "train.checkpoint_every=4", "tune.max_failures=1", f"scaling.force_ray_train={str(ray_train).lower()}"]
    result = run_module("spo_ray.sweep", *args, env={"SPO_RAY_FAULT": "crash_worker_at=7:once"}, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    directory = tmp_path / "crash"
    assert list(directory.glob("reference_cache/.fault-crash_worker_at-7-*")), "the worker was never killed"
    rows = reported_rows(directory)
    steps = [row["step"] for row in rows]  # 1-4, maybe 5-6 (rows in flight may be lost), then 5-8
    assert [steps.count(step) for step in (1, 2, 3, 4)] == [1, 1, 1, 1]  # not restarted from the start...
    assert steps[-4:] == [5, 6, 7, 8]                                      # ...but from the step-4 checkpoint
    if not ray_train:  # Tune restarted the trial's process (a Ray Train trial's own process lives on);
        # the first process's rows of steps 5-6 may or may not have reached Tune before it died.
        assert rows[3]["pid"] != rows[-1]["pid"]
    results = pd.read_csv(directory / "results.csv", keep_default_na=False)
    assert list(results["status"]) == ["TERMINATED"] and list(results["step"]) == [8]
    history = pd.read_parquet(directory / "history.parquet")
    assert list(history["step"]) == [1, 2, 3, 4, 5, 6, 7, 8]
