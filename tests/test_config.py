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


# ------------------------------------------------------------------------------------ the loss family


@pytest.mark.parametrize("loss, expected", [
    # an option of another loss
    ({"name": "dpo", "label_smoothing": 0.2},
     "loss.label_smoothing: not an option of dpo (it is one of cdpo, exo_pair, robust, aot, aot_unpaired)"),
    ({"name": "robust", "discopop_tau": 0.1}, "loss.discopop_tau: not an option of robust (it is one of discopop)"),
    ({"name": "nca_pair", "f_divergence_type": "forward_kl"}, "loss.f_divergence_type: not an option of nca_pair"),
    ({"name": "dpo", "f_alpha_divergence_coef": 0.3},
     "loss.f_alpha_divergence_coef: only f_divergence_type: alpha_divergence reads it"),
    # weights for losses not combined
    ({"name": "dpo", "combine": {"dpo": 1.0, "sft": 1.0}},
     "loss.combine: weights of combined losses, but no loss of this sweep combines (loss.name: dpo)"),
    ({"name": "combine"}, "loss.combine: loss.name combine needs the weights of the losses it adds up"),
    ({"name": "combine", "combine": {"dpo": 1.0, "sfft": 1.0}},
     "loss.combine: unknown loss 'sfft' (did you mean 'sft'?)"),
    ({"name": "combine", "combine": {"dpo": -1.0}}, "loss.combine: the weight of dpo must be finite and >= 0"),
    ({"name": "combine", "combine": {"dpo": 1.0, "nca_pair": 1.0}, "f_divergence_type": "js_divergence"},
     "loss.f_divergence_type: js_divergence needs losses built on the chosen-minus-rejected reward difference"),
    # SPO over what it cannot wrap
    ({"name": "spo", "base": "sft"}, "loss.base: spo cannot wrap sft (SFT on the chosen responses is SPO's lower"),
    ({"name": "spo", "base": "aot"}, "loss.base: spo cannot wrap aot (aot sorts the log-ratios across the batch"),
    ({"name": "spo", "base": "aot_unpaired"}, "loss.base: spo cannot wrap aot_unpaired"),
    ({"name": "spo", "base": "combine", "combine": {"dpo": 1.0, "sft": 1.0}},
     "loss.combine: spo cannot wrap a combination with sft"),
    ({"name": "spo", "base": "combine"}, "loss.combine: loss.base combine needs the weights"),
    # settings that contradict each other
    ({"name": "sigmoid_norm", "average_logps": True}, "loss.average_logps: sigmoid_norm divides by the response"),
    ({"name": "combine", "combine": {"simpo": 1.0, "sft": 1.0}}, "loss.combine: simpo (on length-averaged"),
    ({"name": "exo_pair", "label_smoothing": 0.0}, "loss.label_smoothing: exo_pair needs ε > 0"),
    # LD-DPO on averaged log-probs, WPO over a batch-sorted loss
    ({"name": "dpo", "ld_alpha": 0.5, "average_logps": True},
     "loss.ld_alpha: LD-DPO down-weights the tail of summed log-probs; loss.average_logps averages them"),
    ({"name": "spo", "base": "simpo", "ld_alpha": 0.5}, "loss.ld_alpha: LD-DPO down-weights the tail of summed "
                                                        "log-probs; simpo averages them"),
    ({"name": "dpo", "ld_alpha": 1.5}, "loss.ld_alpha: input should be less than or equal to 1"),
    ({"name": "aot", "use_weighting": True},
     "loss.use_weighting: WPO weights each pair's loss; aot sorts the log-ratios across the batch"),
])
def test_a_loss_setting_that_does_not_apply_is_one_line_naming_the_key(loss, expected):
    assert error_of({"loss": loss}).startswith(expected)


@pytest.mark.parametrize("loss", [
    {"name": {"grid": ["dpo", "cdpo", "robust"]}, "label_smoothing": 0.2},  # taken by some of the sweep's losses
    {"name": {"grid": ["ipo", "spo"]}, "base": "discopop", "discopop_tau": 0.1, "spo_lambda": 2.0},
    {"name": "combine", "combine": {"dpo": 1.0, "sft": {"grid": [0.0, 0.5, 1.0]}}},  # a weight as a grid axis
    {"name": "spo", "base": "combine", "combine": {"robust": 0.5, "nca_pair": 1.0}, "label_smoothing": 0.2},
    {"name": "discopop", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"name": "simpo", "gamma": 1.0, "spo_lambda": 2.0, "base": "dpo"},  # SPO's settings stay when the name changes
    {"name": {"grid": ["exo_pair", "aot", "sft", "sigmoid_norm", "apo_down", "sppo_hard", "bco_pair"]}},
])
def test_every_loss_and_its_own_options_are_accepted(loss):
    validate_sweep({"loss": loss})


@pytest.mark.parametrize("raw, expected", [
    ({"loss": {"name": "simpo"}, "reference": {"sync": True}},
     "reference.sync: loss simpo uses no reference model, so there is none to sync"),
    ({"loss": {"name": "combine", "combine": {"cpo": 1.0, "sft": 1.0}}, "reference": {"sync": True}},
     "reference.sync: loss combine uses no reference model"),
    ({"reference": {"sync": True}, "scaling": {"strategy": "fsdp", "num_workers": 2}},
     "reference.sync: cannot run with scaling.strategy: fsdp yet"),
    ({"reference": {"sync": True, "mixup_alpha": 0.0}}, "reference.mixup_alpha: input should be greater than 0"),
])
def test_a_reference_sync_that_cannot_apply_is_one_line_naming_the_key(raw, expected):
    assert error_of(raw).startswith(expected)


def test_a_reference_sync_over_spo_syncs_the_base_losss_reference_only():
    # SPO's penalty keeps the initial reference under a sync: over a reference-free base nothing would drift.
    assert error_of({"loss": {"name": "spo", "base": "simpo"}, "reference": {"sync": True}}).startswith(
        "reference.sync: loss simpo uses no reference model (SPO's penalty keeps the initial reference)")
    validate_sweep({"loss": {"name": "spo", "base": "robust"}, "reference": {"sync": True, "sync_steps": 4}})


def test_a_loss_option_error_exits_2_before_anything_runs(tmp_path, capsys):
    from spo_ray.train import main
    config = tmp_path / "bad.yaml"
    config.write_text("loss: {name: dpo, discopop_tau: 0.1}\n")
    assert main([str(config), "--output", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: loss.discopop_tau: not an option of dpo (it is one of discopop)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("raw, expected", [
    ({"train": {"optimizer_in_backward": True}},
     "train.max_grad_norm: 1.0 clips by the norm of all gradients together, which never exist at once"),
    ({"train": {"optimizer_in_backward": True, "max_grad_norm": None}, "scaling": {"num_workers": 2}},
     "scaling: the optimizer steps in the backward on one worker only, not 2"),
    ({"train": {"optimizer_in_backward": True, "max_grad_norm": None, "grad_accum_steps": 2, "batch_size": 32}},
     "train.optimizer_in_backward: with grad_accum_steps > 1 every gradient is kept between micro-batches"),
    ({"train": {"optim": "adamw_bnb_8bit"}, "scaling": {"strategy": "fsdp", "num_workers": 2}},
     "train.optim: adamw_bnb_8bit is not tested with scaling.strategy: fsdp"),
    ({"train": {"activation_offloading": True}},
     "train.activation_offloading: moves saved activations from a GPU to host memory"),
    ({"train": {"optim": "adamw_8bit"}}, "train.optim: input should be"),
    ({"train": {"memory_budget": 0}}, "train.memory_budget: input should be greater than 0"),
])
def test_a_memory_lever_that_cannot_apply_is_one_line_naming_the_key(raw, expected):
    assert error_of(raw).startswith(expected)


def test_memory_levers_that_apply_are_accepted():
    validate_sweep({"train": {"optimizer_in_backward": True, "max_grad_norm": None, "optim": "adamw_bnb_8bit",
                              "memory_budget": 6.5}})
    validate_sweep({"train": {"activation_offloading": True}, "scaling": {"use_gpu": True}})
