"""The sweep schema: one-line errors naming the key, search-space checks, overrides, grid order. No Ray."""

import pytest

from spo_ray.config import (ConfigError, apply_overrides, first_point, grid_points, load_yaml, trial_columns,
                            validate_run, validate_sweep)


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_sweep(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests_the_close_one():
    assert error_of({"loss": {"bta": 0.1}}) == "loss.bta: unknown key (did you mean 'loss.beta'?)"
    assert "did you mean 'train'" in error_of({"trian": {"max_steps": 5}})
    assert error_of({"loss": {"zzzzzz": 1}}) == "loss.zzzzzz: unknown key"


def test_wrong_type_names_the_key_and_the_value():
    message = error_of({"train": {"max_steps": "many"}})
    assert message.startswith("train.max_steps:") and "'many'" in message
    assert error_of({"loss": "dpo"}).startswith("loss:")


@pytest.mark.parametrize("raw, key", [
    ({"loss": {"beta": 0}}, "loss.beta"),
    ({"loss": {"spo_lambda": -1}}, "loss.spo_lambda"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"loss": {"name": "dpoo"}}, "loss.name"),
    ({"tune": {"reduction_factor": 1}}, "tune.reduction_factor"),
])
def test_out_of_range_values_are_rejected(raw, key):
    assert error_of(raw).startswith(key + ":")


def test_every_grid_value_is_validated_not_only_the_first():
    assert error_of({"loss": {"beta": {"grid": [0.1, 0.2, -1]}}}).startswith("loss.beta:")
    assert error_of({"loss": {"name": {"grid": ["dpo", "nope"]}}}).startswith("loss.name:")


@pytest.mark.parametrize("space, fragment", [
    ({"grid": []}, "non-empty list"),
    ({"grid": 0.1}, "non-empty list"),
    ({"uniform": [1, 0.5]}, "low < high"),
    ({"loguniform": [0, 1]}, "low > 0"),
    ({"uniform": [0.1]}, "[low, high]"),
])
def test_malformed_search_spaces_are_rejected(space, fragment):
    message = error_of({"loss": {"beta": space}})
    assert message.startswith("loss.beta:") and fragment in message


def test_a_malformed_space_is_reported_even_behind_another_grid():
    raw = {"loss": {"name": {"grid": ["dpo", "spo"]}}, "train": {"max_steps": {"grid": []}}}
    assert error_of(raw) == "train.max_steps: grid needs a non-empty list, got []"


def test_range_bounds_are_validated():
    assert error_of({"loss": {"beta": {"uniform": [-1, 1]}}}).startswith("loss.beta:")
    assert error_of({"train": {"max_steps": {"randint": [0, 10]}}}).startswith("train.max_steps:")


def test_sweep_settings_cannot_be_swept():
    assert "cannot be swept" in error_of({"tune": {"num_samples": {"grid": [1, 2]}}})


def test_valid_sweep_returns_its_first_point_and_spaces():
    raw = {"loss": {"name": {"grid": ["dpo", "spo"]}, "beta": {"loguniform": [0.01, 1]}}}
    sweep, spaces = validate_sweep(raw)
    assert sweep.loss.name == "dpo" and sweep.loss.beta == 0.01
    assert list(spaces) == ["loss.name", "loss.beta"]
    assert first_point(raw)["loss"] == {"name": "dpo", "beta": 0.01}


def test_overrides_take_dotted_keys_and_yaml_values():
    raw = apply_overrides({"loss": {"beta": 0.1}}, ["loss.beta=0.3", "train.seed={grid: [0, 1, 2]}",
                                                    "model.init=sft_long", "tune.max_concurrent_trials=null",
                                                    "scaling.force_ray_train=true"])
    assert raw["loss"]["beta"] == 0.3
    assert raw["train"]["seed"] == {"grid": [0, 1, 2]}
    assert raw["model"]["init"] == "sft_long"
    assert raw["tune"]["max_concurrent_trials"] is None
    assert raw["scaling"]["force_ray_train"] is True
    validate_sweep(raw)


def test_overrides_reject_unknown_keys_and_missing_values():
    with pytest.raises(ConfigError, match=r"--set loss\.bta: unknown key \(did you mean 'loss\.beta'\?\)"):
        apply_overrides({}, ["loss.bta=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["loss.beta"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, ["loss.beta={grid: [1"])


def test_grid_points_cross_the_grids_last_key_fastest():
    raw = {"loss": {"name": {"grid": ["dpo", "spo"]}, "beta": {"grid": [0.05, 0.1, 0.3]}},
           "train": {"seed": {"grid": [0, 1]}}}
    _, spaces = validate_sweep(raw)
    points = grid_points(raw, spaces)
    assert len(points) == 12
    assert points[0] == {"loss.name": "dpo", "loss.beta": 0.05, "train.seed": 0}
    assert points[1] == {"loss.name": "dpo", "loss.beta": 0.05, "train.seed": 1}
    assert points[-1] == {"loss.name": "spo", "loss.beta": 0.3, "train.seed": 1}


def test_grid_points_show_random_spaces_as_text():
    raw = {"loss": {"name": {"grid": ["dpo", "spo"]}, "beta": {"loguniform": [0.01, 1]}}}
    _, spaces = validate_sweep(raw)
    assert grid_points(raw, spaces) == [{"loss.name": "dpo", "loss.beta": "loguniform(0.01, 1)"},
                                        {"loss.name": "spo", "loss.beta": "loguniform(0.01, 1)"}]


def test_trial_columns_always_carry_the_core_parameters_plus_swept_ones():
    config = validate_run({"loss": {"name": "spo", "beta": 0.3}, "train": {"seed": 1, "learning_rate": 1e-3}})
    columns = trial_columns({"train.learning_rate": 1e-3}, config)
    assert columns == {"loss": "spo", "beta": 0.3, "spo_lambda": 1.0, "init": "sft_short", "seed": 1,
                       "learning_rate": 1e-3}


def test_every_shipped_sweep_is_valid():
    from pathlib import Path
    sweeps = sorted(Path(__file__).parent.parent.glob("sweeps/*.yaml"))
    assert {"beta.yaml", "lambda.yaml", "init.yaml", "smoke.yaml"} <= {p.name for p in sweeps}
    for path in sweeps:
        validate_sweep(load_yaml(path))


def test_demo_sweep_has_twelve_trials_on_sft_short():
    from pathlib import Path
    raw = load_yaml(Path(__file__).parent.parent / "sweeps/beta.yaml")
    sweep, spaces = validate_sweep(raw)
    assert sweep.model.init == "sft_short"
    assert len(grid_points(raw, spaces)) * sweep.tune.num_samples == 12


def test_load_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: {name: dpo\n")
    with pytest.raises(ConfigError, match="broken.yaml: line"):
        load_yaml(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(listed)
