"""The pipeline's commands: `ingest`, `worker`, `status`, `search`, `eval` (registered by pipeline/cli.py).

Each command's flags come from config sections (``add_section_flags``) plus a few of its own;
heavy modules are imported inside the command functions so that ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pipeline.config import FbasConfig
from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["register_commands"]

_SERVE_FOR_WORKER = ("triton", "model_name", "ready_timeout", "shared_memory")
_QUEUE_FOR_STATUS = ("broker",)


def _skip(section: Any, keep: tuple[str, ...]) -> tuple[str, ...]:
    import dataclasses

    return tuple(f.name for f in dataclasses.fields(section) if f.name not in keep)


def register_commands(sub: Any, cfg: FbasConfig, add_section_flags: Any) -> None:
    """Add the pipeline commands to the CLI's subparsers."""
    p = sub.add_parser("ingest", help="embed a Parquet corpus into vectors + a FAISS index (local mode without "
                                      "--broker)",
                       description="Read a Parquet corpus (file, folder, glob or URI), validate it, plan token-budget "
                                   "batches, embed them with Celery workers calling Triton, and write OUT/vectors/, "
                                   "OUT/index.faiss and OUT/manifest.json. Without --broker it starts redis-server, "
                                   "tritonserver and workers on loopback ports and stops them at the end (also on "
                                   "Ctrl-C). Rerunning the same command resumes.")
    p.add_argument("corpus", help="Parquet file, folder of Parquet files, glob, or object-store URI")
    for section in ("engine", "runtime", "serve", "queue", "corpus", "output"):
        skip: tuple[str, ...] = ()
        if section == "serve":
            skip = ("model_repository", "host", "grpc_port", "http_port", "metrics_port", "triton")
        add_section_flags(p, cfg, section, skip=skip)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("worker", help="run a Celery worker that embeds batches through Triton (fleet hosts)",
                       description="Consume batch tasks from the broker, tokenize, call Triton at --triton, and "
                                   "write the parts into each job's output folder (which this host must see).")
    add_section_flags(p, cfg, "serve", skip=_skip(cfg.serve, _SERVE_FOR_WORKER))
    add_section_flags(p, cfg, "queue", skip=("queue_depth",))
    add_section_flags(p, cfg, "engine", skip=_skip(cfg.engine, ("target",)))   # sizes the pool (--concurrency 0)
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default: INFO)")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("status", help="show a job's progress (from Redis with --broker, else from the output folder)")
    p.add_argument("out", nargs="?", default=None, help="output folder of the job (default: --out)")
    add_section_flags(p, cfg, "queue", skip=_skip(cfg.queue, _QUEUE_FOR_STATUS))
    add_section_flags(p, cfg, "output", skip=("index",))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("search", help="nearest neighbours of a text (or of every query in a file)",
                       description="Embed the query with the job's own model and search OUT/index.faiss.")
    p.add_argument("out", help="output folder of a finished ingest")
    p.add_argument("text", nargs="?", default=None, help="the query text")
    p.add_argument("-k", type=int, default=10, help="neighbours to return (default: 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per hit: {\"id\": ..., \"score\": ...}")
    p.add_argument("--queries", default=None, help="Parquet or JSONL file with id and text: one JSON line per query "
                                                   "{\"query_id\": ..., \"hits\": [...]}")
    add_section_flags(p, cfg, "runtime", skip=("token_budget", "max_batch_size"))
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("eval", help="nDCG@10 and recall@100 on a BEIR-format query set",
                       description="Search every query of --queries and score the results against --qrels.")
    p.add_argument("out", help="output folder of a finished ingest")
    p.add_argument("--queries", required=True, help="BEIR queries.jsonl (_id, text) or Parquet (id, text)")
    p.add_argument("--qrels", required=True, help="BEIR qrels TSV: query-id, corpus-id, score")
    p.add_argument("--keep-identical-ids", action="store_true",
                   help="keep hits whose id equals the query id (BEIR drops them by default)")
    add_section_flags(p, cfg, "runtime", skip=("token_budget", "max_batch_size"))
    p.set_defaults(func=_cmd_eval)


# Modules the producer needs only once the ids are checked (the broker's client, Celery and what its first
# send loads): with --broker, imported on a thread from the start, beside pipeline.ingest's own imports and the
# id check. Against a running service on the GPU host these imports took 0.9 s between the id check and the
# first batch. Not in local mode: there the first batch waits for tritonserver anyway, whose start follows the
# id check, which the thread would slow down. (Importing workers.app there makes its Celery app that thread's
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
    from pipeline.ingest import ingest

    r = ingest(args.corpus, cfg, progress=False if args.no_progress else None)
    c = r.manifest["counts"]
    rate = c["embedded"] / r.seconds if r.seconds else 0.0
    print(f"ingested {c['input_rows']} rows into {r.out}: {c['embedded']} embedded, {c['quarantined']} quarantined"
          f"{' ' + json.dumps(c['quarantine_reasons']) if c['quarantine_reasons'] else ''}, {c['truncated']} "
          f"truncated; index {r.manifest['index']['type']} ({r.manifest['index']['ntotal']} vectors); "
          f"{r.seconds:.1f}s ({rate:.0f} docs/s){f', resumed {r.resumed_batches} batches' if r.resumed_batches else ''}")
    return 0


def _cmd_worker(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from pipeline.jobstate import redact_url
    from pipeline.local import pool_size
    from workers.app import QUEUE, configure

    if not cfg.queue.broker:
        raise ConfigError("worker needs --broker redis://HOST:PORT/DB (or FBAS_BROKER)")
    app = configure(cfg)
    app.loader.import_default_modules()  # workers.task registers the batch task

    conc = pool_size(cfg)
    print(f"fbas worker: broker {redact_url(cfg.queue.broker)}, Triton {cfg.serve.triton}, {conc} processes",
          file=sys.stderr)
    app.worker_main(["worker", "-Q", QUEUE, "--pool", "prefork", "--concurrency", str(conc), "--prefetch-multiplier",
                     "1", "--loglevel", args.loglevel, "--without-gossip", "--without-mingle", "--without-heartbeat"])
    return 0


def _cmd_status(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from pipeline.jobstate import job_status

    info = job_status(args.out or cfg.output.out, cfg.queue.broker)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    for line in info.get("lines", []):
        print(line)
    return 0


def _cmd_search(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from pipeline.search import Searcher, read_queries, search_many

    if (args.text is None) == (args.queries is None):
        raise ConfigError("give either a query TEXT or --queries FILE")
    s = Searcher(args.out, threads=cfg.runtime.threads)
    if args.queries:
        for qid, hits in search_many(s, read_queries(args.queries), args.k):
            sys.stdout.write(json.dumps({"query_id": qid, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False)
                             + "\n")
        return 0
    hits = s.search([args.text], args.k)[0]
    for rank, h in enumerate(hits, 1):
        if args.json:
            print(json.dumps(h.to_dict(), ensure_ascii=False))
        else:
            print(f"{rank:3d}  {h.score:.4f}  {h.id}")
    return 0


def _cmd_eval(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from pipeline.evaluate import evaluate

    result = evaluate(args.out, args.queries, args.qrels, threads=cfg.runtime.threads,
                      ignore_identical_ids=not args.keep_identical_ids)
    print(json.dumps(result, sort_keys=True))
    return 0
