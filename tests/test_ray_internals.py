"""The guards on Ray's private API (spo_ray.ray_internals): on the installed Ray every guarded attribute is
there; where one is missing (a Ray that moved it), one line names the package, its version, the attribute
and the range the code was written for — before a sweep starts, and from each helper."""

import pytest
import ray

from spo_ray import ray_internals
from spo_ray.cli import EXIT_BAD_INPUT
from spo_ray.config import ConfigError


def test_the_installed_ray_has_every_private_attribute_spo_ray_uses():
    ray_internals.check()


class Bare:
    """An object of a Ray that renamed everything."""


@pytest.mark.parametrize("call, what, missing", [
    (lambda: ray_internals.set_checkpoint_results(Bare(), []), "Train's checkpoint manager", "_checkpoint_results"),
    (lambda: ray_internals.check_pbt(Bare()), "Tune's PopulationBasedTraining", "_trial_state"),
    (lambda: ray_internals.invalidate_run_metadata(type("Trial", (), {"run_metadata": Bare()})()),
     "Tune's trial run metadata", "invalidate_cache"),
])
def test_a_moved_attribute_is_one_line_naming_ray_its_version_and_the_tested_range(call, what, missing):
    with pytest.raises(ConfigError) as error:  # ConfigError: the sweep CLI prints it as one line, exit 2
        call()
    assert str(error.value) == (f"ray {ray.__version__}: {what} has no {missing}; spo-ray's use of it was written "
                                f"for {ray_internals.WRITTEN_FOR} (install the tested versions: make venv, "
                                f"constraints.txt)")


def test_a_sweep_on_a_ray_without_them_stops_before_starting_anything(tmp_path, monkeypatch, capsys):
    from conftest import tiny_run
    import yaml
    from spo_ray import sweep

    monkeypatch.setattr(ray_internals, "CHECKPOINT_MANAGER_FIELDS", ("_checkpoints_renamed",))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**tiny_run(), "name": "s", "storage_path": str(tmp_path / "results")}))
    assert sweep.main([str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: ray {ray.__version__}: Train's checkpoint manager has no _checkpoints_renamed; spo-ray's "
                   f"use of it was written for {ray_internals.WRITTEN_FOR} (install the tested versions: make venv, "
                   f"constraints.txt)"]
    assert not (tmp_path / "results").exists()  # nothing started, nothing written
