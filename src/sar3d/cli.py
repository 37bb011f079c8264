"""``sar3d <stage>``: every stage of the study as a command, with or without Snakemake.

The Snakemake rules call exactly these commands; each takes the study config and
explicit input/output paths, so a stage can be rerun by hand for debugging.
Imports are lazy so ``sar3d --help`` and light stages start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sar3d.config import ConfigError, load_config
from sar3d.data.layouts import LAYOUTS
from sar3d.io import InputDataError


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="study config (YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sar3d", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("check-config", help="validate a study config and print it with defaults filled")
    _add_common(p)

    p = sub.add_parser("tracking-init", help="create the MLflow store and experiment before jobs fan out")
    _add_common(p)

    p = sub.add_parser("download", help="fetch or generate one dataset into an MSD-style folder")
    _add_common(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("normalise", help="resample and normalise a dataset for pre-training or a task")
    _add_common(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--dataset", help="normalise for pre-training (clip, scale to [0, 1])")
    target.add_argument("--task", help="normalise for a downstream task (its own normalisation)")
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("split", help="train/val/test splits of a task, one file per fold or trial")
    _add_common(p)
    p.add_argument("--task", required=True)
    p.add_argument("--data", type=Path, required=True, help="the task's preprocessed folder")
    p.add_argument("--out-dir", type=Path, required=True)

    p = sub.add_parser("cubes", help="cut multi-scale cubes of one pre-training dataset into shards")
    _add_common(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data", type=Path, required=True, help="the dataset's preprocessed folder")
    p.add_argument("--heldout", type=Path, nargs="*", default=[], help="heldout.json files of the tasks")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("pretrain", help="self-supervised pre-training of one pretrain.methods block")
    _add_common(p)
    p.add_argument("--method", required=True, help="a block name of pretrain.methods")
    p.add_argument("--cubes", type=Path, nargs="+", required=True, help="cube shards (they fix every case's split)")
    p.add_argument("--volumes", type=Path, nargs="*", default=[], help="normalised volumes (volume methods)")
    p.add_argument("--artefact", action="append", default=[], metavar="NAME=DIR",
                   help="a folder of a declared artefact (repeat per artefact and dataset)")
    p.add_argument("--out", type=Path, required=True, help="exported U-Net weights (state dict)")
    p.add_argument("--checkpoint", type=Path, required=True, help="full resumable state")

    p = sub.add_parser("artefact", help="a pre-training method's cached per-volume artefact of one dataset")
    _add_common(p)
    p.add_argument("--method", required=True, help="a block name of pretrain.methods")
    p.add_argument("--artefact", required=True, help="one of the method's declared artefacts")
    p.add_argument("--volumes", type=Path, required=True, help="the dataset's normalised pre-training folder")
    p.add_argument("--out", type=Path, required=True)

    for stage in ("finetune", "evaluate", "probe"):
        p = sub.add_parser(stage, help=f"{stage} one (task, init, ratio, fold)")
        _add_common(p)
        p.add_argument("--task", required=True)
        p.add_argument("--init", required=True)
        p.add_argument("--ratio", type=float, default=1.0)
        p.add_argument("--fold", type=int, required=True)
        p.add_argument("--split", type=Path, required=True)
        p.add_argument("--data", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        if stage != "evaluate":
            p.add_argument("--pretrained", type=Path, default=None)
        if stage == "finetune":
            p.add_argument("--checkpoint", type=Path, required=True)
        elif stage == "evaluate":
            p.add_argument("--model", type=Path, required=True)
            p.add_argument("--predictions", type=Path, default=None,
                           help="folder for the first test cases' predicted masks (evaluate.save_predictions)")

    p = sub.add_parser("report", help="one of the paper's tables (2, 3, 4) from evaluation files")
    _add_common(p)
    p.add_argument("--table", default="table2", choices=["table2", "table2_hd95", "table3", "table4", "probe"])
    p.add_argument("--evaluations", type=Path, nargs="*", default=None,
                   help="evaluation CSVs, for 'probe' the probe CSVs (default: whichever files of the config's "
                        "grid exist)")
    p.add_argument("--out-csv", type=Path, default=None, help="default: results/tables/<table>.csv")
    p.add_argument("--out-md", type=Path, default=None, help="default: results/tables/<table>.md")
    p.add_argument("--out-figure", type=Path, nargs="*", default=[], help="table4: figure files (.png, .svg)")

    p = sub.add_parser("report-all", help="every table and figure from whichever evaluations exist (partial grids)")
    _add_common(p)

    p = sub.add_parser("figure", help="a figure: fine-tuning loss curves (Fig. 3), qualitative predictions or "
                                      "restorations of the pre-trained models")
    _add_common(p)
    p.add_argument("--kind", required=True, choices=["loss", "qualitative", "restoration"])
    p.add_argument("--task", help="loss, qualitative: the task")
    p.add_argument("--ratio", type=float, default=1.0, help="loss: the label ratio")
    p.add_argument("--out", type=Path, nargs="+", required=True, help="figure files (.png, .svg)")
    p.add_argument("--data", type=Path, help="qualitative: the task's preprocessed folder")
    p.add_argument("--split", type=Path, help="qualitative: the split whose first test cases are shown")
    p.add_argument("--prediction", nargs=2, action="append", default=[], metavar=("INIT", "FOLDER"),
                   help="qualitative: an init's saved predictions (repeat per init)")
    p.add_argument("--model", nargs=2, action="append", default=[], metavar=("METHOD", "FILE"),
                   help="restoration: a restoration method's model.pt (repeat per method, in column order)")
    p.add_argument("--cubes", type=Path, nargs="*", default=[],
                   help="restoration: the pre-training datasets' cube folders (their validation cubes are shown)")

    p = sub.add_parser("inspect", help="recognise a dataset folder's layout, summarise it, list every problem")
    p.add_argument("path", type=Path, help="an MSD, BraTS2018, LUNA16 or LiTS folder")
    p.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS],
                   help="the layout to read it as (default: recognise it)")
    p.add_argument("--json", type=Path, default=None, help="also write the full report, case by case, as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("compare", help="the study's runs side by side from MLflow (latest run per job)")
    _add_common(p)
    p.add_argument("--stages", nargs="*", default=[], help="only these stages (e.g. evaluate finetune)")
    p.add_argument("--metrics", nargs="*", default=[], help="metric name globs (e.g. 'dice/*' 'final/*')")
    p.add_argument("--mean", action="store_true", help="mean and std over folds")
    p.add_argument("--all-runs", action="store_true", help="keep every run, not only each job's latest")
    p.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    return parser


def inspect(args: argparse.Namespace) -> int:
    """Print what the folder holds; exit status 1 when the data stage would stop on it."""
    from sar3d.data.inspection import format_report, inspect_folder, write_report_json

    report = inspect_folder(args.path, args.layout, progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        write_report_json(report, args.json)
    return 1 if report.problems else 0


def artefact_dirs(pairs: Sequence[str]) -> dict[str, tuple[Path, ...]]:
    """``["regions=a", "regions=b"]`` -> ``{"regions": (a, b)}``."""
    out: dict[str, list[Path]] = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--artefact expects NAME=DIR, got '{pair}'")
        out.setdefault(name, []).append(Path(folder))
    return {k: tuple(v) for k, v in out.items()}


def run(args: argparse.Namespace) -> int:
    if args.stage == "inspect":  # a folder, not a study: no config
        return inspect(args)
    config = load_config(args.config)
    stage = args.stage
    if stage == "check-config":
        import yaml

        print(yaml.safe_dump(config, sort_keys=False))
    elif stage == "tracking-init":
        from sar3d.tracking import init_tracking

        print(init_tracking(config))
    elif stage == "download":
        from sar3d.data.download import run_download

        run_download(config, args.dataset, args.out)
    elif stage == "normalise":
        from sar3d.data.normalise import run_normalise_pretrain, run_normalise_task

        if args.dataset:
            run_normalise_pretrain(config, args.dataset, args.raw, args.out)
        else:
            run_normalise_task(config, args.task, args.raw, args.out)
    elif stage == "split":
        from sar3d.data.splits import run_split

        run_split(config, args.task, args.data, args.out_dir)
    elif stage == "cubes":
        from sar3d.data.cubes import run_cubes

        run_cubes(config, args.dataset, args.data, args.heldout, args.out)
    elif stage == "pretrain":
        from sar3d.pretraining.base import PretrainJob
        from sar3d.pretraining.run import run_pretrain

        run_pretrain(config, PretrainJob(
            args.method, tuple(args.cubes), args.out, args.checkpoint, volumes=tuple(args.volumes),
            artefacts=artefact_dirs(args.artefact),
        ))
    elif stage == "artefact":
        from sar3d.pretraining import registry

        registry.method_class(config, args.method).make_artefact(config, args.method, args.artefact,
                                                                 args.volumes, args.out)
    elif stage == "finetune":
        from sar3d.finetuning.run import run_finetune

        run_finetune(
            config, args.task, args.init, args.ratio, args.fold, args.split, args.data,
            args.pretrained, args.out, args.checkpoint,
        )
    elif stage == "evaluate":
        from sar3d.evaluation.run import run_evaluate

        run_evaluate(
            config, args.task, args.init, args.ratio, args.fold, args.split, args.data, args.model, args.out,
            args.predictions,
        )
    elif stage == "probe":
        from sar3d.evaluation.probe import run_probe

        run_probe(config, args.task, args.init, args.ratio, args.fold, args.split, args.data, args.pretrained,
                  args.out)
    elif stage == "report" and args.table == "probe":
        from sar3d.reporting.probe import run_probe_report

        run_probe_report(config, args.evaluations, args.out_csv, args.out_md)
    elif stage == "report":
        from sar3d.reporting.report import run_report

        run_report(config, args.evaluations, args.out_csv, args.out_md, args.table, args.out_figure)
    elif stage == "report-all":
        from sar3d.reporting.report import run_report_all

        for written in run_report_all(config):
            print(written)
    elif stage == "figure":
        from sar3d.reporting import figures

        if args.kind == "restoration":
            from sar3d.reporting.restoration import plot_restoration

            if not args.model or not args.cubes:
                raise SystemExit("sar3d figure --kind restoration needs --model and --cubes")
            plot_restoration(config, {method: Path(file) for method, file in args.model}, args.cubes, args.out)
        elif args.task is None:
            raise SystemExit(f"sar3d figure --kind {args.kind} needs --task")
        elif args.kind == "loss":
            figures.plot_loss_curves(config, args.task, args.out, args.ratio)
        else:
            if args.data is None or args.split is None:
                raise SystemExit("sar3d figure --kind qualitative needs --data and --split")
            predictions = {init: Path(folder) for init, folder in args.prediction}
            figures.plot_qualitative(config, args.task, args.data, args.split, predictions, args.out)
    elif stage == "compare":
        from sar3d.reporting.compare import run_compare

        run_compare(config, args.stages, args.metrics, args.mean, args.all_runs, args.csv)
    else:  # pragma: no cover - argparse restricts the choices
        raise SystemExit(f"unknown stage {stage}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, InputDataError) as err:
        print(f"sar3d {args.stage}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
