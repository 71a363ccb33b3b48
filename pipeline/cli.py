"""`fbas-pipeline`: the command line, every subcommand in this one module.

    build   checkpoint -> built model folder          embed   texts -> .npy, in process
    serve   tritonserver on a model repository        ingest  corpus -> vectors + index (local mode
    worker  Celery worker for fleet hosts                     without --broker)
    status  a job's progress                          search  nearest neighbours     eval  BEIR scores

Flags are built from the config fields (``core/config.py``); every flag can also be given as
``FBAS_<FIELD>`` in the environment, and the flag wins. Each command is thin: it parses, calls one
function of a lower layer, and prints. Heavy modules are imported inside the commands so that
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.config import FbasConfig, apply_env, set_field
from core.envs import env_name, read_env
from core.errors import ConfigError, FbasError

logger = logging.getLogger("fbas")

Subparsers = Any  # argparse's _SubParsersAction, which it does not export

_SERVE_FOR_WORKER = ("triton", "model_name", "ready_timeout", "shared_memory")
_QUEUE_FOR_STATUS = ("broker",)


def _skip(section: Any, keep: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(section) if f.name not in keep)


def add_section_flags(p: argparse.ArgumentParser, cfg: FbasConfig, section_name: str, skip: Sequence[str] = ()) -> None:
    section = getattr(cfg, section_name)
    group = p.add_argument_group(f"{section_name} options")
    for f in dataclasses.fields(section):
        if f.name in skip or f.metadata.get("secret"):  # secrets come from the environment only (ps shows argv)
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(section, f.name)
        text = f.metadata.get("help", "")
        shown = "" if default is None or "default" in text else f"default: {default}; "  # the help says it
        help_text = f"{text} ({shown}env {env_name(f.name)})"
        kwargs: dict[str, Any] = {
            "dest": f"{section_name}.{f.name}",
            "default": argparse.SUPPRESS,
            "help": help_text.replace("%", "%%"),
        }
        if "bool" in str(f.type):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        group.add_argument(flag, **kwargs)


def _config_from_args(ns: argparse.Namespace) -> FbasConfig:
    cfg = apply_env(FbasConfig(), read_env())
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            set_field(getattr(cfg, section), name, value)
    return cfg.validate()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faster-bert-as-service")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    cfg = FbasConfig()
    parser = argparse.ArgumentParser(
        prog="fbas-pipeline",
        description="faster-bert-as-service: turn a text corpus into BERT embeddings and a searchable index.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quick start:\n  fbas-pipeline build --out models/minilm\n"
        "  fbas-pipeline embed --model-dir models/minilm texts.txt --out vectors.npy\n"
        "  fbas-pipeline ingest corpus.parquet --out out/\n"
        '  fbas-pipeline search out/ "a question" -k 10',
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for add in (_add_build, _add_embed, _add_serve, _add_ingest, _add_worker, _add_status, _add_search, _add_eval):
        add(sub, cfg)
    return parser


def _add_build(sub: Subparsers, cfg: FbasConfig) -> None:
    p = sub.add_parser(
        "build",
        help="turn a checkpoint into a built model folder (ONNX fp32/int8, or GPU)",
        description="Build an engine from a Hugging Face or Google TF BERT checkpoint into a model "
        "folder that `embed`, `serve` and `ingest` load.",
    )
    add_section_flags(p, cfg, "engine")
    p.add_argument("--out", required=True, help="model folder to write (replaced if it is a built model folder)")
    p.add_argument(
        "--fusions",
        default="all",
        help="ONNX Runtime fused ops to use: all | none | comma list of embed_layernorm, attention, "
        "skip_layernorm, bias_gelu (default: all, the fastest on CPU; see BENCHMARKS.md)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="int8: text file (one text per line) of real text from your corpus to calibrate on "
        "(default: a bundled English + Chinese sample)",
    )
    p.add_argument("--calibration-size", type=int, default=256, help="int8: texts used for calibration (default: 256)")
    p.add_argument(
        "--int8-target",
        type=float,
        default=0.995,
        help="int8: min cosine to fp32 the calibration sample must reach; more sensitive layers stay "
        "in float until it does (default: 0.995)",
    )
    add_section_flags(p, cfg, "runtime", skip=("token_budget", "max_batch_size"))
    p.add_argument(
        "--model-repository",
        dest="serve.model_repository",
        default=argparse.SUPPRESS,
        help="also write the Triton model repository entry (config.pbtxt + model.py) here "
        f"(env {env_name('model_repository')}; default: none)",
    )
    p.set_defaults(func=_cmd_build)


def _add_embed(sub: Subparsers, cfg: FbasConfig) -> None:
    p = sub.add_parser(
        "embed",
        help="embed texts in-process with a built model folder (no server)",
        description="Embed a text file (one text per line), a Parquet file or JSONL with a text "
        "column, in input order, into a float32 .npy of shape [n, dim].",
    )
    p.add_argument("input", help="texts: .txt (one per line), .csv/.tsv with a header, .parquet or .jsonl")
    p.add_argument("--model-dir", required=True, help="built model folder (from `fbas-pipeline build`)")
    p.add_argument("--out", required=True, help="output .npy file, float32 [n, dim]")
    p.add_argument(
        "--text-column", default="text", help="column holding the text in CSV/TSV/Parquet/JSONL (default: text)"
    )
    add_section_flags(p, cfg, "runtime")
    p.set_defaults(func=_cmd_embed)


def _add_serve(sub: Subparsers, cfg: FbasConfig) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository with tritonserver (loopback by default)",
        description="Start tritonserver on --model-repository (model control mode none, loopback "
        "unless --host says otherwise), wait until the model is ready, and serve until "
        "Ctrl-C or SIGTERM. With --model-dir, first (re)write the repository entry from "
        "that built model folder.",
    )
    p.add_argument(
        "--model-dir",
        default=None,
        help="built model folder (from `fbas-pipeline build`) to write into the repository first",
    )
    add_section_flags(p, cfg, "serve", skip=("triton",))
    p.set_defaults(func=_cmd_serve)


def _add_ingest(sub: Subparsers, cfg: FbasConfig) -> None:
    p = sub.add_parser(
        "ingest",
        help="embed a Parquet corpus into vectors + a FAISS index (local mode without --broker)",
        description="Read a Parquet corpus (file, folder, glob or URI), validate it, plan token-budget "
        "batches, embed them with Celery workers calling Triton, and write OUT/vectors/, "
        "OUT/index.faiss and OUT/manifest.json. Without --broker it starts redis-server, "
        "tritonserver and workers on loopback ports and stops them at the end (also on "
        "Ctrl-C). Rerunning the same command resumes.",
    )
    p.add_argument("corpus", help="Parquet file, folder of Parquet files, glob, or object-store URI")
    for section in ("engine", "runtime", "serve", "queue", "corpus", "output"):
        skip: tuple[str, ...] = ()
        if section == "serve":
            skip = ("model_repository", "host", "grpc_port", "http_port", "metrics_port", "triton")
        elif section == "queue":
            skip = ("out_root", "worker_metrics_port", "worker_metrics_host")  # the workers' settings
        add_section_flags(p, cfg, section, skip=skip)
    p.add_argument(
        "--model-dir",
        default=None,
        help="a model folder built already (`fbas-pipeline build`, e.g. a calibrated int8 one), used as it is: "
        "its engine settings replace --target/--precision (default: build from --model, once per setting)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (default: a bar on a terminal, a plain line every 10 s otherwise)",
    )
    p.set_defaults(func=_cmd_ingest)


def _add_worker(sub: Subparsers, cfg: FbasConfig) -> None:
    p = sub.add_parser(
        "worker",
        help="run a Celery worker that embeds batches through Triton (fleet hosts)",
        description="Consume batch tasks from the broker, tokenize, call Triton at --triton, and "
        "write the parts into each job's output folder (which this host must see).",
    )
    add_section_flags(p, cfg, "serve", skip=_skip(cfg.serve, _SERVE_FOR_WORKER))
    add_section_flags(p, cfg, "queue", skip=("queue_depth", "worker_metrics_port", "worker_metrics_host"))
    add_section_flags(p, cfg, "engine", skip=_skip(cfg.engine, ("target",)))  # sizes the pool (--concurrency 0)
    metrics = p.add_argument_group("metrics options")
    metrics.add_argument(
        "--metrics-port",
        dest="queue.worker_metrics_port",
        default=argparse.SUPPRESS,
        metavar="PORT",
        help=f"port of the worker's Prometheus endpoint, /metrics; 0 = none (default: {cfg.queue.worker_metrics_port}; "
        f"env {env_name('worker_metrics_port')})",
    )
    metrics.add_argument(
        "--metrics-host",
        dest="queue.worker_metrics_host",
        default=argparse.SUPPRESS,
        metavar="ADDRESS",
        help=f"address it listens on (default: {cfg.queue.worker_metrics_host}, loopback; 0.0.0.0 for every "
        f"interface; env {env_name('worker_metrics_host')})",
    )
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default: INFO)")
    p.set_defaults(func=_cmd_worker)


def _add_status(sub: Subparsers, cfg: FbasConfig) -> None:
    p = sub.add_parser("status", help="show a job's progress (from Redis with --broker, else from the output folder)")
    p.add_argument("out", nargs="?", default=None, help="output folder of the job (default: --out)")
    add_section_flags(p, cfg, "queue", skip=_skip(cfg.queue, _QUEUE_FOR_STATUS))
    add_section_flags(p, cfg, "output", skip=("index",))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_status)


def _add_search(sub: Subparsers, cfg: FbasConfig) -> None:
    p = sub.add_parser(
        "search",
        help="nearest neighbours of a text (or of every query in a file)",
        description="Embed the query with the job's own model and search OUT/index.faiss.",
    )
    p.add_argument("out", help="output folder of a finished ingest")
    p.add_argument("text", nargs="?", default=None, help="the query text")
    p.add_argument("-k", type=int, default=10, help="neighbours to return (default: 10)")
    p.add_argument(
        "--json", action="store_true", help='one JSON object per hit: {"id": ..., "score": ..., "text": ...}'
    )
    p.add_argument(
        "--queries",
        default=None,
        help='Parquet or JSONL file with id and text: one JSON line per query {"query_id": ..., "hits": [...]}',
    )
    p.add_argument(
        "--columns",
        default=None,
        help="more corpus columns to show with each hit, comma-separated (e.g. title,url); default: the text only",
    )
    p.add_argument(
        "--no-text",
        action="store_true",
        help="ids and scores only: do not read the hits' texts back from the corpus (default: read them)",
    )
    p.add_argument(
        "--by",
        choices=("doc", "chunk"),
        default="doc",
        help="for a job ingested with --chunk: doc returns documents, each scored by its best chunk (whose spans "
        "it shows); chunk returns chunks, with their token and character spans and their own text (default: doc)",
    )
    add_section_flags(p, cfg, "runtime", skip=("token_budget", "max_batch_size"))
    p.set_defaults(func=_cmd_search)


def _add_eval(sub: Subparsers, cfg: FbasConfig) -> None:
    p = sub.add_parser(
        "eval",
        help="nDCG@10 and recall@100 on a BEIR-format query set",
        description="Search every query of --queries and score the results against --qrels.",
    )
    p.add_argument("out", help="output folder of a finished ingest")
    p.add_argument("--queries", required=True, help="BEIR queries.jsonl (_id, text) or Parquet (id, text)")
    p.add_argument("--qrels", required=True, help="BEIR qrels TSV: query-id, corpus-id, score")
    p.add_argument(
        "--keep-identical-ids",
        action="store_true",
        help="keep hits whose id equals the query id (BEIR drops them by default)",
    )
    add_section_flags(p, cfg, "runtime", skip=("token_budget", "max_batch_size"))
    p.set_defaults(func=_cmd_eval)


def _cmd_build(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from engine.build import build_model
    from pipeline.ingest.progress import progress_bar

    with progress_bar(
        total=None, desc="calibrating int8 (layers)", unit="layer", disable=cfg.engine.precision != "int8"
    ) as bar:

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out = build_model(
            cfg.engine,
            args.out,
            fusions=args.fusions,
            threads=cfg.runtime.threads,
            calibration=args.calibration,
            calibration_size=args.calibration_size,
            int8_target=args.int8_target,
            progress=report,
        )
    from engine.model_dir import read_meta

    meta = read_meta(out)
    print(
        f"built {meta.name} -> {out} (target {meta.target}, {meta.precision}, dim {meta.dim}, pooling "
        f"{meta.pooling}, normalize {meta.normalize}, max_seq_len {meta.max_seq_len}, fingerprint {meta.fingerprint})"
    )
    if "serve.model_repository" in vars(args):
        from services.repository import write_model_repository

        entry = write_model_repository(out, cfg.serve.model_repository, cfg)
        print(f"wrote the Triton model repository entry {entry}")
    return 0


def _cmd_embed(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from pipeline.ingest.embed_file import embed_file

    n, dim = embed_file(args.input, args.model_dir, args.out, cfg.runtime, text_column=args.text_column)
    print(f"wrote {n} x {dim} float32 embeddings to {args.out}")
    return 0


def _cmd_serve(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from services.repository import write_model_repository
    from services.serve import run_serve

    if args.model_dir:
        write_model_repository(args.model_dir, cfg.serve.model_repository, cfg)
    return run_serve(cfg)


# Modules the producer needs only once the ids are checked (the broker's client, Celery and what its first
# send loads): with --broker, imported on a thread from the start, beside pipeline.ingest's own imports and the
# id check, so that against a running service they do not hold up the first batch after the id check. Not in
# local mode: there the first batch waits for tritonserver anyway, whose start follows the id check, which the
# thread would slow down. (Importing workers.app there makes its Celery app that thread's
# "current app"; the producer uses its own app, never current_app.)
_PRODUCER_MODULES = ("redis", "workers.app", "kombu.transport.redis", "celery.app.amqp", "celery.app.routes")


def _import_ahead(names: tuple[str, ...]) -> None:
    import importlib
    import threading

    def run() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the real import, later, reports it
                return

    threading.Thread(target=run, name="import-ahead", daemon=True).start()


def _cmd_ingest(args: argparse.Namespace, cfg: FbasConfig) -> int:
    if cfg.queue.broker:
        _import_ahead(_PRODUCER_MODULES)
    from core.processes import fixed_mmap_threshold
    from pipeline.ingest.run import ingest

    fixed_mmap_threshold()  # this process is the job's: its heap does not grow with the row count
    r = ingest(args.corpus, cfg, progress=False if args.no_progress else None, model_dir=args.model_dir)
    c, tm = r.manifest["counts"], r.manifest.get("timings", {})
    unit = "docs"
    if "chunks" in c:  # a chunked job: embedded, quarantined and truncated count chunks
        unit = "chunks"
        print(f"cut {c['documents']} documents into {c['chunks']} chunks ({r.manifest['settings']['chunk']})")
    print(
        f"ingested {c['input_rows']} rows into {r.out}: {c['embedded']} {'chunks ' if unit == 'chunks' else ''}"
        f"embedded, {c['quarantined']} quarantined"
        f"{' ' + json.dumps(c['quarantine_reasons']) if c['quarantine_reasons'] else ''}, {c['truncated']} "
        f"truncated; index {r.manifest['index']['type']} ({r.manifest['index']['ntotal']} vectors)"
    )
    resumed = f"; {r.resumed_batches} batches were committed by an earlier run" if r.resumed_batches else ""
    if r.docs_this_run and tm.get("embed_s"):
        print(
            f"{r.seconds:.1f}s in all: {tm.get('ready_s', 0):.1f}s to start (model {tm.get('model_s', 0):.1f}s, "
            f"services), then {r.docs_this_run} {unit} in {tm['embed_s']:.1f}s "
            f"({r.docs_this_run / tm['embed_s']:.0f} {unit}/s){resumed}"
        )
    else:
        print(f"{r.seconds:.1f}s: nothing was left to embed{resumed}")
    return 0


def _cmd_worker(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from core.redact import redact_url
    from services.worker import pool_size, run_worker

    if not cfg.queue.broker:
        raise ConfigError("worker needs a broker: set FBAS_BROKER=redis://HOST:PORT/DB (or pass --broker)")
    if not cfg.queue.task_key:
        raise ConfigError(
            "worker needs the fleet's task key to check that tasks come from its producers: set FBAS_TASK_KEY "
            "(the same secret on every producer and worker) in the environment"
        )
    q = cfg.queue
    metrics = (
        f"metrics on http://{q.worker_metrics_host}:{q.worker_metrics_port}/metrics"
        if q.worker_metrics_port
        else "no metrics"
    )
    print(
        f"fbas worker: broker {redact_url(cfg.queue.broker)}, Triton {cfg.serve.triton}, {pool_size(cfg)} processes, "
        f"writes inside {cfg.queue.out_root or os.getcwd()}, {metrics}",
        file=sys.stderr,
        flush=True,
    )
    return run_worker(cfg, args.loglevel)


def _cmd_status(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from output.status import job_status

    out = args.out or cfg.output.out
    if not Path(out).is_dir():
        if args.out or not cfg.queue.broker:
            raise ConfigError(f"{out} does not exist: give the output folder of a job (`ingest --out`)")
        out = None  # --broker alone: every job Redis knows
    info = job_status(out, cfg.queue.broker)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
    else:
        for line in info.get("lines", []):
            print(line)
    return 0 if info.get("folder") or info.get("jobs") or not out else 1


def _cmd_search(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from output.search import Searcher, read_queries, search_many

    if (args.text is None) == (args.queries is None):
        raise ConfigError("give either a query TEXT or --queries FILE")
    s = Searcher(args.out, threads=cfg.runtime.threads)
    columns = [c.strip() for c in (args.columns or "").split(",") if c.strip()]

    def readable(hits: list) -> list:
        return hits if args.no_text else s.with_text(hits, columns, args.by)

    if args.queries:
        for qid, hits in search_many(s, read_queries(args.queries), args.k, by=args.by):
            hits = readable([hits])[0]
            line = {"query_id": qid, "hits": [h.to_dict() for h in hits]}
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        return 0
    hits = readable(s.search([args.text], args.k, args.by))[0]
    width = shutil.get_terminal_size((120, 24)).columns
    for rank, h in enumerate(hits, 1):
        if args.json:
            print(json.dumps(h.to_dict(), ensure_ascii=False))
            continue
        head = f"{rank:3d}  {h.score:.4f}  {h.id}"
        if h.chunk is not None:
            head += f"  #{h.chunk['chunk']} [{h.chunk['char_start']}:{h.chunk['char_end']}]"
        extra = "  ".join(f"{c}={h.fields[c]}" for c in columns if c in h.fields)
        text = " ".join(str(h.fields.get("text", "")).split())
        rest = "  ".join(x for x in (extra, text) if x)
        room = max(10, width - len(head) - 2)
        print(f"{head}  {rest[: room - 1] + '…' if len(rest) > room else rest}" if rest else head)
    return 0


def _cmd_eval(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from output.evaluate import evaluate

    result = evaluate(
        args.out,
        args.queries,
        args.qrels,
        threads=cfg.runtime.threads,
        ignore_identical_ids=not args.keep_identical_ids,
    )
    print(json.dumps(result, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        cfg = _config_from_args(args)
        return int(args.func(args, cfg) or 0)
    except FbasError as e:
        print(f"fbas-pipeline {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fbas-pipeline {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
