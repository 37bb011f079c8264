"""Config validation: a bad key or value fails before any job starts, naming the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sar3d.config import ConfigError, load_config, tracking_uri, validate_config
from sar3d.data.cubes import cubes_per_volume
from sar3d.data.splits import round_half_up

REPO = Path(__file__).resolve().parents[1]


def test_default_config_is_valid_and_defaults_are_filled() -> None:
    config = load_config(REPO / "config.yaml")
    assert config["pretrain"]["methods"]["sar"]["loss_weights"] == {"adversarial": 1.0, "scale": 1.0,
                                                                    "restoration": 10.0}
    assert config["cubes"]["ratio"] == [1, 1, 2]
    # a default that config.yaml does not spell out is filled from the schema
    assert config["evaluate"]["overlap"] == 0.25


def test_paper_overlay_restores_the_papers_settings() -> None:
    """config/paper.yaml on top of the demo config gives the paper's protocol (docs/deviations.md)."""
    overlay = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    config = load_config(REPO / "config.yaml", overrides=overlay)
    assert config["pretrain"]["optimizer"]["lr"] == 1.0
    assert config["pretrain"]["methods"]["sar"]["lr"] == {"scale_head": 0.1, "discriminator": 0.001}
    assert {"sa", "mial", "sar_s2", "sar_s4", "sar_s8"} <= set(config["pretrain"]["methods"])
    demo = load_config(REPO / "config.yaml")["pretrain"]["methods"]
    adversarial = [name for name, block in demo.items() if block["kind"] == "sar" and block["adversarial"]]
    assert {demo[name]["discriminator_optimizer"] for name in adversarial} == {"adam"}  # the demo's deviation
    assert {config["pretrain"]["methods"][name]["discriminator_optimizer"] for name in adversarial} == {"sgd"}
    assert config["preprocess"]["spacing"] == [1.0, 1.0, 1.0]
    assert config["pretrain"]["width"] == 1.0
    assert config["cubes"]["per_volume"] == 64
    assert config["finetune"]["label_ratios"] == [1, 0.5, 0.2, 0.1, 0.05, 0.02]
    assert config["tasks"]["brain_tumour"]["split"]["n"] == 5 and config["tasks"]["pancreas"]["split"]["n"] == 5
    # and the schema defaults are the paper's values where the demo departs from them
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    del raw["pretrain"]["optimizer"]
    assert validate_config(raw)["pretrain"]["optimizer"]["lr"] == 1.0


def test_paper_overlay_cube_counts_and_epochs_follow_table_1() -> None:
    """Cubes per volume per dataset as Table 1, and one pre-training epoch = one pass over its cubes."""
    overlay = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    config = load_config(REPO / "config.yaml", overrides=overlay)
    cubes, pretrain = config["cubes"], config["pretrain"]
    # Table 1: cases (volumes per case) and sub-volume numbers (sum over the three scales)
    table1 = {"luna16": (623, 1, 39872), "lits": (111, 1, 14208), "brats": (190, 4, 48640), "heart": (30, 1, 3840)}
    n_train = n_val = 0
    for dataset, (cases, channels, total) in table1.items():
        per_volume = cubes_per_volume(cubes, dataset)
        assert cases * channels * per_volume == total, dataset
        val_cases = round_half_up(cubes["val_fraction"] * cases)  # the cube stage's case-level split
        n_val += val_cases * channels * per_volume
        n_train += (cases - val_cases) * channels * per_volume
    assert pretrain["steps_per_epoch"] == n_train // pretrain["batch_size"]
    assert pretrain["val_steps"] == n_val // pretrain["batch_size"]
    assert pretrain["early_stopping_patience"] < pretrain["epochs"]
    assert pretrain["plateau"]["patience"] < pretrain["early_stopping_patience"]
    assert config["finetune"]["plateau"]["patience"] < config["finetune"]["early_stopping_patience"]


def test_null_entries_of_an_overlay_remove_what_config_yaml_defines() -> None:
    """The evidence overlay leaves out a task, its dataset and pre-training methods by setting them to null."""
    overlay = yaml.safe_load((REPO / "config" / "evidence.yaml").read_text())
    config = load_config(REPO / "config.yaml", overlay)
    assert list(config["tasks"]) == ["brain_tumour"] and "pancreas" not in config["datasets"]
    assert list(config["pretrain"]["methods"]) == ["genesis", "sar"]
    assert config["datasets"]["brats"]["n_cases"] == overlay["datasets"]["brats"]["n_cases"]
    # null stays an error where it removes nothing: a key, not a catalogue entry
    with pytest.raises(ConfigError, match="config key 'seed'"):
        load_config(REPO / "config.yaml", {"seed": None})
    # removing a dataset a task still needs is named like any missing dataset
    with pytest.raises(ConfigError, match=re.escape("'tasks.pancreas.dataset': no dataset 'pancreas'")):
        load_config(REPO / "config.yaml", {"datasets": {"pancreas": None}})


def test_probe_inits_and_curve_ratios_are_checked() -> None:
    named = "'probe.inits': 'nope' is neither 'scratch' nor in 'pretrain.methods'"
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(REPO / "config.yaml", {"probe": {"inits": ["scratch", "nope"]}})
    named = "'report.loss_curve_ratios': 0.5 is not in 'finetune.label_ratios'"
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(REPO / "config.yaml", {"report": {"loss_curve_ratios": [0.5]}})


def test_unknown_key_is_named(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["pretrain"]["learning_rate"] = 0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"pretrain.*learning_rate"):
        load_config(path)


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("cubes", "size", [64, 64], "cubes.size"),
        ("pretrain", "transforms", {"flip_rate": 1.5}, "pretrain.transforms.flip_rate"),
        ("finetune", "inits", ["scratch", "rotation"], "finetune.inits"),
    ],
)
def test_bad_values_are_named(section: str, key: str, value: object, named: str) -> None:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw[section][key] = value
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        validate_config(raw)


def test_task_must_reference_a_known_dataset() -> None:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["tasks"]["pancreas"]["dataset"] = "kidney"
    with pytest.raises(ConfigError, match=r"tasks\.pancreas\.dataset"):
        validate_config(raw)


def test_tracking_uri_defaults_to_sqlite_under_results(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "res")
    assert tracking_uri(validate_config(raw)) == f"sqlite:///{tmp_path / 'res' / 'mlflow.db'}"


def test_cli_reports_bad_key_and_exits_nonzero(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["bogus_key"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "sar3d.cli", "check-config", "--config", str(path)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "bogus_key" in proc.stderr
    assert str(path) in proc.stderr
