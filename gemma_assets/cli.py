"""`gemma-assets`: materialise the asset graph of a run config through Dagster, start the UI,
show and validate a run config, rehearse it on slices, export a dictionary, verify a report.
This module parses the command line and dispatches to one handler per command."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

from gemma_assets.commands import export_dictionary, verify_report
from gemma_assets.core import fleet_costs
from gemma_assets.core.config import (
    CONFIG_ENV_VAR,
    SHIPPED_CONFIGS,
    ConfigError,
    RunConfig,
    load_run_config,
    reference_markdown,
    save_resolved,
)
from gemma_assets.core.layout import RunLayout, is_url
from gemma_assets.defs.resources import (
    DASK_CLUSTER_ENV_VAR,
    DASK_WORKERS_ENV_VAR,
    DATA_ROOT_ENV_VAR,
    require_writable,
    resolve_data_root,
)
from gemma_assets.runner import (
    EXIT_INTERRUPTED,
    KNOWN_ERRORS,
    StageFailed,
    ensure_dagster_home,
)
from gemma_assets.runner.errors import disk_full, is_enospc


def _add_config_arguments(command: argparse.ArgumentParser, data_root: bool = True) -> None:
    command.add_argument(
        "--config",
        "--profile",
        dest="config",
        metavar="NAME_OR_PATH",
        help=f"run config: one of {', '.join(SHIPPED_CONFIGS)} or a YAML file (default: ${CONFIG_ENV_VAR} or demo)",
    )
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one value of the run config, e.g. --set model.layer=6 --set clustering.ks=[64,512]",
    )
    if data_root:
        command.add_argument("--data-root", help=f"where outputs go (default: ${DATA_ROOT_ENV_VAR} or ./data)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-assets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    materialize = commands.add_parser("materialize", help="materialise what is not up to date (every partition)")
    ui = commands.add_parser("ui", help="start `dagster dev` on a run config")
    config = commands.add_parser("config", help="show, validate or document run configs")
    actions = config.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the resolved run config (YAML)")
    validate = actions.add_parser(
        "validate", help="validate a run config against its model and SAEs, computing nothing"
    )
    actions.add_parser("reference", help="print the reference of every key (docs/configuration.md)")
    export = commands.add_parser("export", help="write a dictionary of a finished run as an SAELens SAE folder")
    export.add_argument("dictionary", metavar="DICTIONARY_NAME", help="as the report names it, e.g. kmeans-256")
    export.add_argument("--out", type=Path, help="folder to write (default: DATA_ROOT/RUN/exports/DICTIONARY_NAME)")
    verify = commands.add_parser(
        "verify-report",
        help="recompute a report's held-out FVU, L0 and spliced CE here and hold them against the report",
    )
    verify.add_argument("report_dir", type=Path, metavar="REPORT_DIR", help="the folder of report.md and report.json")
    verify.add_argument(
        "--data-root", help=f"where the report's run is stored (default: ${DATA_ROOT_ENV_VAR} or ./data)"
    )
    verify.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    verify.add_argument(
        "--activations-url", default="", help="the activation store's fsspec URL, if not under the data root"
    )
    preflight = commands.add_parser(
        "preflight",
        help="run the whole graph on small slices of the config, measure every asset, estimate the full run",
    )
    preflight.add_argument("--json", type=Path, metavar="PATH", help="also write the measurements and estimate as JSON")
    preflight.add_argument(
        "--points",
        type=int,
        default=2,
        choices=[1, 2, 3],
        help="slices to measure, each with more windows (2: fixed costs such as model loads are told apart "
        "from per-token ones; 1: faster, the estimate is an upper bound)",
    )
    preflight.add_argument(
        "--windows",
        type=int,
        metavar="N",
        help="windows per partition of the first slice (default: enough for the largest k)",
    )
    preflight.add_argument(
        "--offline-standins",
        action="store_true",
        help="rehearse google/gemma-2-2b with Gemma Scope offline: build stand-ins in the real layouts in a "
        "Hugging Face cache under DATA_ROOT/standins and run with HF_HUB_OFFLINE=1",
    )
    fleet = preflight.add_argument_group(
        "over machines",
        "with --workers or --gpus, no slice is run: the run is counted from its config, d_model and the rates below "
        '(docs/scaling_out.md, "The full-Pile plan")',
    )
    fleet.add_argument("--workers", type=int, metavar="M", help="Dask workers the store passes are divided over")
    fleet.add_argument("--gpus", type=int, metavar="N", help="GPUs extraction is divided over")
    fleet.add_argument(
        "--tokens",
        type=lambda text: int(float(text)),
        metavar="T",
        help="sample about T tokens (e.g. 1.26e9): partitions of the config's size, held-out share kept "
        "(default: the config's)",
    )
    fleet.add_argument("--d-model", type=int, metavar="D", help="the model's d_model (default: read from its config)")
    fleet.add_argument(
        "--worker-gflops",
        type=float,
        metavar="G",
        help="float32 GEMM GFLOP/s of one worker (default: measured here on one thread; a dask-cuda worker is a GPU's)",
    )
    fleet.add_argument(
        "--gpu-tokens-per-s",
        type=float,
        default=fleet_costs.H100_EXTRACTION_TOKENS_PER_S,
        metavar="R",
        help="extraction tokens/s of one GPU (default: %(default).0f, measured on an H100)",
    )
    fleet.add_argument(
        "--worker-read-gbps",
        type=float,
        default=fleet_costs.STORE_READ_BYTES_PER_S_PER_THREAD / 1e9,
        metavar="B",
        help="GB/s of bf16 one worker reads and decodes from the store (default: %(default).3g, measured per thread)",
    )
    for command in (materialize, ui, validate, export, preflight):
        _add_config_arguments(command)
    _add_config_arguments(show, data_root=False)
    materialize.add_argument("--force", action="store_true", help="recompute everything, even what is up to date")
    # its own flag, not --force: --force means "recompute what is up to date", and a user who
    # wants that on a roomy disk must not lose the free-space check, nor one who is short of
    # space be made to recompute everything
    materialize.add_argument(
        "--ignore-free-space",
        action="store_true",
        help="start even when the free space is below the estimate",
    )
    materialize.add_argument(
        "--cluster",
        metavar="WHERE",
        help=f"where the passes over the store run: 'local' (a Dask cluster on this machine) or a Dask scheduler's "
        f"address, tcp://HOST:8786 (default: ${DASK_CLUSTER_ENV_VAR}, else in each step's process)",
    )
    materialize.add_argument(
        "--cluster-workers",
        type=int,
        metavar="N",
        help=f"with --cluster local: worker processes (default: ${DASK_WORKERS_ENV_VAR}, else one per core, or per GPU)",
    )
    materialize.add_argument(
        "--no-wait",
        action="store_true",
        help="when another materialize of the run is live, stop at once instead of waiting for it",
    )
    materialize.add_argument(
        "--no-bucket-lock",
        action="store_true",
        help="on an s3:// data root, hold the run's lock on this machine only, not also on the bucket (for stores "
        "without S3's conditional writes): start one materialize of the run at a time yourself",
    )
    for command, level in ((materialize, "INFO"), (preflight, "WARNING")):
        command.add_argument(
            "--log-level",
            default=level,
            type=str.upper,
            choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
            help="Dagster console log level (progress lines are INFO; above INFO the command line prints them itself)",
        )
    materialize.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up when a pool slot (the GPU) stays held by another live run this long (default: wait)",
    )
    for command in (materialize, preflight):
        command.add_argument("--debug", action="store_true", help="print the traceback behind a failure")
    return parser


def _fail(message: str, code: int) -> None:
    print(f"gemma-assets: error: {message}", file=sys.stderr)
    sys.exit(code)


def _materialize(args: argparse.Namespace) -> None:
    from gemma_assets.runner.command import MaterializeOptions, materialize

    run_config, data_root = load_run_config(args.config, args.overrides), resolve_data_root(args.data_root)
    # exported, like --data-root: the definitions the command builds read the compute resource from them
    if args.cluster is not None:
        os.environ[DASK_CLUSTER_ENV_VAR] = args.cluster
    if args.cluster_workers is not None:
        if args.cluster_workers < 0:
            raise ConfigError(f"--cluster-workers is {args.cluster_workers}: pass 1 or more, or 0 for one per core")
        os.environ[DASK_WORKERS_ENV_VAR] = str(args.cluster_workers)
    options = MaterializeOptions(
        args.log_level,
        args.force,
        args.wait_timeout,
        args.debug,
        args.ignore_free_space,
        wait=not args.no_wait,
        bucket_lock=not args.no_bucket_lock,
    )
    materialize(run_config, data_root, options)


def _ui(args: argparse.Namespace) -> None:
    run_config, data_root = load_run_config(args.config, args.overrides), resolve_data_root(args.data_root)
    require_writable(data_root, run_config)
    # the code location reads the resolved file, so the UI shows exactly this config
    os.environ[CONFIG_ENV_VAR] = str(
        save_resolved(run_config, RunLayout.of(data_root, run_config.name).resolved_config_file)
    )
    ensure_dagster_home()
    sys.exit(subprocess.call(["dagster", "dev", "-w", "workspace.yaml"]))


def _config(args: argparse.Namespace) -> None:
    if args.action == "reference":
        print(reference_markdown(), end="")
        return
    run_config = load_run_config(args.config, args.overrides)
    if args.action == "show":
        print(f"# run config {run_config.name}, digest {run_config.digest()}")
        print(run_config.to_yaml(), end="")
        return
    from gemma_assets.core.validation import valid_summary, validate_run

    folder = RunLayout.of(resolve_data_root(args.data_root), run_config.name)
    print(valid_summary(run_config, validate_run(run_config, folder.models_dir), folder.root))


def _export(args: argparse.Namespace) -> None:
    run_config = load_run_config(args.config, args.overrides)
    print(export_dictionary(run_config, resolve_data_root(args.data_root), args.dictionary, args.out))


def _preflight(args: argparse.Namespace) -> None:
    from gemma_assets import preflight

    run_config, chosen_root = load_run_config(args.config, args.overrides), resolve_data_root(args.data_root)
    if is_url(chosen_root):
        raise ConfigError(f"preflight measures the disk of a local data root, not {chosen_root} -> pass a folder")
    data_root = Path(chosen_root)
    if args.workers is not None or args.gpus is not None:
        _fleet_estimate(args, run_config, data_root)
        return
    if args.offline_standins:
        from gemma_assets.core import standins

        location = standins.location(data_root, run_config)  # refuses other models before touching the environment
        os.environ.update(location.environment())  # before the hub client is first imported
        run_config = standins.rehearsal_config(run_config, standins.build(location, run_config))
    require_writable(str(data_root / "preflight"), run_config)
    try:
        preflight.preflight(
            run_config,
            data_root,
            args.points,
            args.windows,
            args.json,
            args.log_level,
            args.debug,
            command=args.typed,
        )
    except StageFailed as error:
        raise StageFailed(f"preflight: {error}", error.code, error.details) from None


def _fleet_estimate(args: argparse.Namespace, run_config: RunConfig, data_root: Path) -> None:
    from gemma_assets import preflight
    from gemma_assets.core import model

    if args.tokens is not None:
        run_config = fleet_costs.at_tokens(run_config, args.tokens)
    d_model = args.d_model or model.architecture(run_config.model, data_root / "models").d_model
    worker_flops = args.worker_gflops * 1e9 if args.worker_gflops else fleet_costs.one_thread_gemm_flops()
    rates = fleet_costs.FleetRates(worker_flops, args.gpu_tokens_per_s, args.worker_read_gbps * 1e9)
    preflight.fleet_estimate(run_config, d_model, args.gpus or 1, args.workers or 1, rates, args.json)


def _verify_report(args: argparse.Namespace) -> None:
    print(verify_report(args.report_dir, resolve_data_root(args.data_root), args.device, args.activations_url))


HANDLERS = {
    "materialize": _materialize,
    "ui": _ui,
    "config": _config,
    "export": _export,
    "preflight": _preflight,
    "verify-report": _verify_report,
}


def main(argv: list[str] | None = None) -> None:
    """Run one command; a known failure ends in one line naming the cause and the fix."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        # each line as it is printed, into a pipe too (`| tee`, CI and pod logs): block buffering
        # held preflight's lines back until it ended
        sys.stdout.reconfigure(line_buffering=True)
    args = _parser().parse_args(argv)
    args.typed = list(sys.argv[1:] if argv is None else argv)  # what preflight's rehearsal command repeats
    try:
        HANDLERS[args.command](args)
    except StageFailed as error:
        if getattr(args, "debug", False) and error.details:
            print(error.details, file=sys.stderr)
        _fail(str(error), error.code)
    except tuple(KNOWN_ERRORS) as error:
        _fail(str(error), KNOWN_ERRORS[type(error)])
    except BrokenPipeError:  # the reader of stdout left (`| head`): no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as error:  # ENOSPC outside a step of any command: its own exit code
        if not is_enospc(error):
            raise
        if getattr(args, "debug", False):
            traceback.print_exc()
        full = disk_full(f"{type(error).__name__}: {error}", resolve_data_root(getattr(args, "data_root", None)))
        _fail(str(full), full.code)
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C); run the same command again to continue", EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
