"""The study grid: which (task, init, ratio, fold) jobs run, and which table reads which."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sar3d.config import ConfigError, load_config
from sar3d.grid import FinetuneJob, all_inits, configured_tables, finetune_jobs, table2_inits, table_jobs
from tinystudy import REPO, unit_config

# Table 2's rows in the paper's order (config/paper.yaml lists them so)
PAPER_MAIN = ["scratch", "genesis", "rpl", "jigsaw", "rotation", "cpc", "vectorpose", "separeg", "mial", "sa", "sar"]


def paper_config(tmp_path: Path) -> dict:
    overlay = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    return unit_config(tmp_path, "grid", overlay)


def test_paper_grid_crosses_main_inits_with_ratios_and_ablations_with_the_brain_task(tmp_path: Path) -> None:
    config = paper_config(tmp_path)
    jobs = finetune_jobs(config)
    main = [j for j in jobs if j.init in PAPER_MAIN]
    ablation = [j for j in jobs if j.init.startswith("sar_s")]
    # 11 inits x 6 ratios x (5 brain trials + 5 pancreas folds); 3 ablations x 5 brain trials at ratio 1
    assert len(main) == 11 * 6 * 10 and len(ablation) == 3 * 5 and len(jobs) == 660 + 15
    assert {(j.task, j.ratio) for j in ablation} == {("brain_tumour", "1")}
    assert len(set(jobs)) == len(jobs) and jobs == sorted(jobs)
    assert all_inits(config) == [*PAPER_MAIN, "sar_s2", "sar_s4", "sar_s8"]


def test_each_table_reads_its_own_slice_of_the_grid(tmp_path: Path) -> None:
    config = paper_config(tmp_path)
    assert configured_tables(config) == ["table2", "table2_hd95", "table3", "table4"]
    t2 = table_jobs(config, "table2")
    assert {j.ratio for j in t2} == {"1"} and {j.init for j in t2} == set(PAPER_MAIN)
    assert len(t2) == 11 * 10
    assert table2_inits(config) == PAPER_MAIN  # the paper's row order
    t3 = table_jobs(config, "table3")
    assert {j.init for j in t3} == {"sar_s2", "sar_s4", "sar_s8", "sar"}
    assert {j.task for j in t3} == {"brain_tumour"} and {j.ratio for j in t3} == {"1"} and len(t3) == 4 * 5
    t4 = table_jobs(config, "table4")
    assert {j.ratio for j in t4} == {"1", "0.5", "0.2", "0.1", "0.05", "0.02"}
    assert not any(j.init.startswith("sar_s") for j in t4)
    # every job feeds some table, so the default target builds the whole grid and nothing more
    assert set(t2) | set(t3) | set(t4) == set(finetune_jobs(config))


def test_default_study_builds_every_table(tmp_path: Path) -> None:
    config = unit_config(tmp_path, "grid", {})
    assert configured_tables(config) == ["table2", "table2_hd95", "table3", "table4"]
    assert len(config["finetune"]["label_ratios"]) >= 2, "Table 4 needs more than the full-label column"
    assert FinetuneJob("brain_tumour", "sar_s4", "1", 0) in finetune_jobs(config)
    assert not [j for j in finetune_jobs(config) if j.init.startswith("sar_s") and j.task == "pancreas"]


def test_without_ablations_there_is_no_table3(tmp_path: Path) -> None:
    config = unit_config(tmp_path, "grid", {"finetune": {"ablation_inits": []}})
    assert "table3" not in configured_tables(config)
    assert table_jobs(config, "table3") == []


@pytest.mark.parametrize(
    ("finetune", "report", "message"),
    [
        ({"label_ratios": [0.5, 0.2]}, {}, "finetune.label_ratios': must contain 1"),
        ({"ablation_inits": ["sar_s16"]}, {}, "finetune.ablation_inits': 'sar_s16' is neither"),
        ({"inits": ["scratch", "genesis"]}, {}, "report.reference': Table 3 compares"),
    ],
)
def test_grid_config_errors_name_the_key(tmp_path: Path, finetune: dict, report: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "config.yaml", {"finetune": finetune, "report": report})
