"""``gentor-headless``: queue one workflow (``run``) or one prompt per dataset row (``batch``)."""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from . import __version__
from .client import ComfyClient, output_files
from .convert import ui_to_api
from .dataset import Dataset, apply_name_column, load_dataset, missing_column, parse_maps
from .errors import Cancelled, ExecutionFailed, HeadlessError, NoServer, PromptRejected, \
    ServerDown, UsageError, WorkflowError, format_execution_error
from .results import ResultsTable, RowResult
from .files import write_atomic
from .rowjob import RowJob
from .scheduler import BatchOptions, BatchRunner, Summary
from .workflow import Workflow, apply_seed_policy, apply_sets, is_ui_format, load_json, unwrap_api

log = logging.getLogger("gentor_headless")
DEFAULT_SERVER = "http://127.0.0.1:8188"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    """Command-line definition (``run`` and ``batch``)."""
    parser = argparse.ArgumentParser(
        prog="gentor-headless",
        description="Queue ComfyUI workflows through the HTTP API: one run, or one prompt per dataset row "
                    "shared among one or more servers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, many_servers: bool) -> None:
        p.add_argument("workflow", help="workflow .json: API format, or UI format (converted with the "
                                        "server's /object_info)")
        p.add_argument("--server", action="append" if many_servers else "store",
                       help=f"ComfyUI URL (default {DEFAULT_SERVER})"
                            + ("; repeat to share the rows among servers" if many_servers else ""))
        p.add_argument("--out", default="out", help="folder for downloaded outputs (default ./out)")
        p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                       help="override an input (node id or title), e.g. --set 3.steps=20; repeatable")
        p.add_argument("--seed-policy", choices=("fixed", "row", "random"), default="fixed",
                       help="seed/noise_seed inputs: keep the workflow's (fixed), workflow seed + row "
                            "index (row), or a new random one (random); a 'seed' column overrides")
        p.add_argument("--timeout", type=float, default=None, help="seconds one prompt may take")
        p.add_argument("--no-websocket", action="store_true", help="follow prompts by polling /history")
        p.add_argument("-v", "--verbose", action="store_true", help="log protocol details")

    run = sub.add_parser("run", help="queue one workflow and download its outputs")
    common(run, many_servers=False)

    batch = sub.add_parser("batch", help="one prompt per row of a CSV/JSONL dataset")
    common(batch, many_servers=True)
    batch.add_argument("--data", required=True, help="rows.csv (header row) or rows.jsonl")
    batch.add_argument("--map", action="append", default=[], metavar="COLUMN=NODE.INPUT",
                       help="feed a column into a node input, e.g. --map instruction=6.prompt; image "
                            "paths/URLs for LoadImage inputs are uploaded; repeatable")
    batch.add_argument("--name-column", help="column naming each row's outputs (<name>_<index>.png)")
    batch.add_argument("--image-column", action="append", default=[],
                       help="also upload this mapped column's values as images (LoadImage is automatic)")
    batch.add_argument("--results", help="results table (default OUT/results.csv)")
    batch.add_argument("--resume", action="store_true", help="skip rows whose status is ok in results.csv")
    batch.add_argument("--overwrite", action="store_true", help="start again, replacing results.csv")
    batch.add_argument("--retries", type=int, default=1, help="extra attempts for a failed row (default 1)")
    batch.add_argument("--per-server", type=int, default=1,
                       help="prompts in flight per server (default 1)")
    batch.add_argument("--server-wait", type=float, default=60.0,
                       help="seconds to wait when every server is down before giving up (default 60)")
    on_ray = batch.add_argument_group(
        "Ray Data (pip install 'gentor[ray]')",
        "--ray runs the same rows on a Ray cluster: --data may then be a folder or any URI pyarrow reads "
        "(CSV, JSONL, Parquet); results go to OUT/results.parquet (+ results.csv when small)")
    on_ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on Ray: the cluster at ADDRESS (e.g. ray://head:10001 or auto), or "
                             "$RAY_ADDRESS / a new local Ray when no address is given")
    on_ray.add_argument("--rows-per-task", type=int, default=1, metavar="N",
                        help="rows per Ray task (x --per-server; default 1): raise it for rows that take "
                             "well under a second, to spread Ray's per-task cost")
    on_ray.add_argument("--comfyui", metavar="DIR",
                        help="each actor starts its own ComfyUI from DIR on its GPU (instead of --server)")
    on_ray.add_argument("--comfyui-args", default="", metavar="ARGS",
                        help="extra arguments for the actors' ComfyUI, e.g. '--cpu' or '--highvram'")
    on_ray.add_argument("--comfyui-python", metavar="PYTHON",
                        help="Python for the actors' ComfyUI (default: DIR/.venv, DIR/venv, else this one)")
    on_ray.add_argument("--actors", type=int, default=0,
                        help="actors (= servers) with --comfyui (default 1); with --server one per URL")
    on_ray.add_argument("--gpus-per-actor", type=float, default=1.0,
                        help="GPUs each --comfyui actor reserves (default 1; 0 on CPU-only nodes)")
    on_ray.add_argument("--cpus-per-actor", type=float, default=1.0,
                        help="CPUs each --comfyui actor reserves (default 1)")
    return parser


def load_workflow(path: str, servers: list[str], sets: list[str]) -> tuple[Workflow, dict[str, Any] | None]:
    """API prompt from a file (UI format converted with the first answering server), with --set applied."""
    data = load_json(path)
    extra: dict[str, Any] | None = None
    prompt = unwrap_api(data)
    if prompt is None and is_ui_format(data):
        for i, server in enumerate(servers):
            client = ComfyClient(server, use_websocket=False)
            try:
                prompt = ui_to_api(data, client.object_info(), client.url)
                break
            except ServerDown:
                if i == len(servers) - 1:
                    raise
            finally:
                client.close()
        extra = {"extra_pnginfo": {"workflow": data}}
        log.info("converted the UI workflow %s to the API format (%d nodes)", path, len(prompt or {}))
    if prompt is None:
        raise WorkflowError(f"{path} is not a ComfyUI workflow: expected the API format "
                            f'({{"3": {{"class_type": ..., "inputs": {{...}}}}, ...}}, File > Export (API)) '
                            f"or a UI workflow with 'nodes' and 'links'")
    apply_sets(prompt, sets)
    return prompt, extra


class Progress:
    """Progress display of a single run on stderr (a bar when stderr is a terminal)."""

    def __init__(self, prompt: Workflow) -> None:
        self.prompt = prompt
        self.tty = sys.stderr.isatty()
        self.node = ""

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "executing" and data.get("node") is not None:
            node = str(data["node"])
            self.node = f"{node} {self.prompt.get(node, {}).get('class_type', '')}".strip()
            self._show(f"running node {self.node}")
        elif kind == "progress":
            value, total = int(data.get("value", 0)), max(1, int(data.get("max", 1)))
            filled = int(30 * value / total)
            bar = "#" * filled + "-" * (30 - filled)
            if self.tty or value == total:
                self._show(f"node {self.node} [{bar}] {value}/{total}")

    def _show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def cmd_run(args: argparse.Namespace) -> int:
    """Queue one workflow, follow it, download its outputs into --out."""
    server = args.server or DEFAULT_SERVER
    prompt, extra = load_workflow(args.workflow, [server], args.set)
    apply_seed_policy(prompt, args.seed_policy, 0, random.Random())
    client = ComfyClient(server, use_websocket=not args.no_websocket)
    progress = Progress(prompt)
    try:
        prompt_id = client.queue_prompt(prompt, extra)
        print(f"queued prompt {prompt_id} on {client.url}")
        try:
            entry = client.wait(prompt_id, args.timeout, on_event=progress)
        except KeyboardInterrupt:
            client.cancel(prompt_id)
            raise
        finally:
            progress.done()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for item in output_files(entry):
            write_atomic(out / item["filename"], client.view(item["filename"], item["subfolder"], item["type"]))
            print(out / item["filename"])
    except ExecutionFailed as exc:
        text = format_execution_error(exc.details, traceback=True) if exc.details.get("exception_type") \
            else str(exc)
        print(f"ComfyUI reported an error: {text}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.close()
    return EXIT_OK


def print_row(result: RowResult, done: int, total: int) -> None:
    """One line per finished row (total < 0: not known while streaming)."""
    label = f"row {result.row_id}" + (f" ({result.name})" if result.name else "")
    tail = f"-> {result.output_files}" if result.status == "ok" else result.error
    where = f"[{done}/{total}]" if total >= 0 else f"[{done}]"
    print(f"{where} {result.status} {label} {result.seconds}s {result.server} {tail}", flush=True)


def finish(summary: Summary, results: str) -> int:
    """Print the summary; the exit status of a batch run."""
    print(f"{summary.total} rows: {summary.ok} ok, {summary.failed} failed, {summary.interrupted} interrupted, "
          f"{summary.skipped} skipped (already ok) in {summary.seconds:.1f}s; results: {results}")
    if summary.fatal:
        print(summary.fatal, file=sys.stderr)
    if summary.cancelled:
        return EXIT_INTERRUPTED
    if summary.fatal.startswith("ComfyUI rejected"):
        return EXIT_USAGE
    return EXIT_FAILED if summary.failed or summary.fatal else EXIT_OK


def cmd_batch(args: argparse.Namespace) -> int:
    """One prompt per dataset row, shared among the servers; results.csv after every row."""
    if args.retries < 0 or args.per_server < 1:
        raise UsageError("--retries must be >= 0 and --per-server >= 1")
    if args.ray is not None:
        return cmd_batch_ray(args)
    servers = args.server or [DEFAULT_SERVER]
    dataset = load_dataset(args.data)
    apply_name_column(dataset, args.name_column)
    prompt, extra = load_workflow(args.workflow, servers, args.set)
    if not args.map:
        raise UsageError(f"batch needs at least one --map COLUMN=NODE.INPUT; the dataset's columns are: "
                         f"{', '.join(dataset.columns)}")
    mappings = parse_maps(prompt, dataset, args.map, args.image_column)
    out = Path(args.out)
    results = ResultsTable(Path(args.results) if args.results else out / "results.csv",
                           with_name=bool(args.name_column))
    if results.path.exists() and not (args.resume or args.overwrite):
        raise UsageError(f"{results.path} exists from an earlier run; pass --resume to skip its ok rows, "
                         f"or --overwrite to start again")
    if args.resume:
        results.load()
        _check_resume(results, dataset)
    options = BatchOptions(out_dir=out, seed_policy=args.seed_policy, retries=args.retries,
                           per_server=args.per_server, timeout=args.timeout, server_wait=args.server_wait,
                           use_websocket=not args.no_websocket, extra_data=extra)
    runner = BatchRunner(prompt, dataset, mappings, servers, results, options, print_row)
    return finish(runner.run(), str(results.path))


def cmd_batch_ray(args: argparse.Namespace) -> int:
    """The same contract on Ray Data (gentor_headless.ray_runner); imported only here, ray is optional."""
    try:
        from . import ray_data, ray_runner  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(f"--ray needs Ray Data ({exc}); install it with pip install 'gentor[ray]' "
                         f"(or pip install 'ray[data]')") from exc
    if args.comfyui and args.server:
        raise UsageError("--comfyui (actors start their own servers) and --server (attach to running ones) "
                         "exclude each other; pass one of them")
    if args.rows_per_task < 1:
        raise UsageError(f"--rows-per-task must be >= 1 (got {args.rows_per_task})")
    if args.results:
        raise UsageError("--results is not used with --ray: results go to OUT/results.parquet "
                         "(and OUT/results.csv when small)")
    servers = [] if args.comfyui else (args.server or [DEFAULT_SERVER])
    fs, files, kind = ray_data.dataset_files(args.data)
    local = isinstance(fs, ray_data.pa_fs.LocalFileSystem)
    columns = ray_data.dataset_columns(fs, files[0], kind)
    header = Dataset(Path(files[0]) if local else Path(Path(files[0]).name), columns)
    if args.name_column and args.name_column not in columns:
        raise missing_column(header, args.name_column, "--name-column")
    if not servers and is_ui_format(load_json(args.workflow)):
        raise UsageError(f"{args.workflow} is a UI workflow; with --comfyui there is no server to convert it "
                         f"with: export it in the API format (File > Export (API)), or pass --server")
    prompt, extra = load_workflow(args.workflow, servers, args.set)
    if not args.map:
        raise UsageError(f"batch needs at least one --map COLUMN=NODE.INPUT; the dataset's columns are: "
                         f"{', '.join(columns)}")
    mappings = parse_maps(prompt, header, args.map, args.image_column)
    out = Path(args.out).resolve()
    options = ray_runner.RayOptions(
        data=args.data, out_dir=out, servers=servers, comfyui=args.comfyui, comfyui_args=args.comfyui_args,
        comfyui_python=args.comfyui_python, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, per_server=args.per_server, rows_per_task=args.rows_per_task,
        retries=args.retries, server_wait=args.server_wait, use_websocket=not args.no_websocket,
        name_column=args.name_column, resume=args.resume, overwrite=args.overwrite)
    ray_runner.check_out_dir(ray_data.Ledger(out, bool(args.name_column)), options)
    job = RowJob(prompt, tuple(mappings), header.path.parent.resolve() if local else Path.cwd(), out,
                 args.seed_policy, args.timeout, 30.0, extra, "seed" in columns)
    ray_runner.connect(args.ray)
    summary = ray_runner.run_on_ray(job, options, print_row)
    return finish(summary, str(out / ray_data.RESULTS_DIR))


def _check_resume(results: ResultsTable, dataset: Any) -> None:
    by_id = {r.row_id: r for r in dataset.rows}
    for row_id, res in results.rows.items():
        row = by_id.get(row_id)
        if row is None or (res.name and row.name and res.name != row.name):
            raise UsageError(f"{results.path} has row {row_id}" + (f" named {res.name!r}" if res.name else "")
                             + " which the dataset no longer has at that position; the dataset changed "
                               "since that run: use another --out (or --overwrite)")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 rows failed, 2 usage, 3 server, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="gentor-headless: %(levelname)s: %(message)s")
    try:
        return cmd_run(args) if args.command == "run" else cmd_batch(args)
    except PromptRejected as exc:
        print(f"ComfyUI rejected the prompt:\n{exc}", file=sys.stderr)
        if args.verbose:
            print(json.dumps({"error": exc.error, "node_errors": exc.node_errors}, indent=2), file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ServerDown, NoServer) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except (KeyboardInterrupt, Cancelled):
        print("stopped (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except HeadlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
