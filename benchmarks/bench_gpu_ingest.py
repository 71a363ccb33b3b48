"""Whole ingest on one GPU host: end-to-end docs/s vs the GPU engine's own docs/s, same corpus, same run.

    python benchmarks/bench_gpu_ingest.py --tokenizer MINILM_DIR --data DATA_DIR --json results.json

Both sides use the same built ``--target gpu`` model (fp16) on the same card:

* **fbas**: ``fbas-pipeline ingest CORPUS --out OUT --target gpu ...`` in local mode, exactly as a
  user runs it in a fresh output folder: redis-server, tritonserver with the model on the GPU
  (``KIND_GPU``), a Celery worker with ``--concurrency`` processes tokenizing on the host's cores,
  Parquet parts, the merge and the checks. Wall time of the whole command.
* **engine**: the same built folder loaded in-process (``load_engine(folder, device="cuda:0")``),
  ``embed(token_ids, lengths)`` on the whole pre-tokenized corpus, after one untimed pass that
  captures its CUDA graphs (a long-running Triton instance has them too).

* **fbas, running service** (``--service``): the same ingest submitted with ``--broker`` to services
  that are already up (redis-server, tritonserver with the model loaded, the Celery worker; started
  once by ``services.local.LocalCluster`` with the same settings, as ``fbas-pipeline serve`` +
  ``worker`` run on a fleet host): what a user of a running fbas service waits for. The engine side
  excludes its load and warm-up in both cases.

Efficiency = fbas docs/s / engine docs/s (start-up, tokenization, queues, Triton, writing, merging and
shut-down all included); the steady-state efficiency uses the embedding phase only (manifest
``timings.embed_s``).

Cases (``--cases``):
  minilm-stsb  all-MiniLM-L6-v2's shape and tokenizer (random weights: speed does not depend on
               their values), every distinct STS-B English sentence repeated ``--stsb-repeat`` times
               (about 15 tokens a document), max_seq_len 256.
  base-long    BERT-base (12 x 768, vocab 30522, random weights), ``--long-docs`` documents of
               consecutive STS-B sentences, length uniform in 16..512 tokens, max_seq_len 512.
The tokenizer folder is an all-MiniLM-L6-v2 checkpoint folder; its weights are not read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ingest import make_corpus, run_engine, run_fbas, warm_model  # noqa: E402

from services.worker import default_concurrency

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# MiniLM's config with these fields changed: a model whose engine costs little next to the pipeline around it, so
# that a CPU host measures what the pipeline costs per document (bench_scale.py --shape tiny)
SHAPES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 256},
    # MiniLM's width (384-d vectors) with one thin layer: the serving's cost at MiniLM's output size on a CPU
    "wide": {"hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 6, "intermediate_size": 384},
}


def random_model(tokenizer_dir: Path, dest: Path, shape: str) -> Path:
    """A Hugging Face BERT folder with random weights: MiniLM's shape (its config.json), BERT-base's, or MiniLM's
    with a ``SHAPES`` entry's changes."""
    import torch
    from bench_gpu import random_bert

    if not dest.exists():
        config = tokenizer_dir / "config.json" if shape == "minilm" else None
        if shape in SHAPES:
            dest.parent.mkdir(parents=True, exist_ok=True)
            config = dest.parent / f"config-{shape}.json"
            config.write_text(json.dumps({**json.loads((tokenizer_dir / "config.json").read_text()), **SHAPES[shape]}))
        with torch.device("cpu"):
            random_bert(30522, seed=3, config=config).save_pretrained(dest, safe_serialization=True)
        for f in TOKENIZER_FILES:
            if (tokenizer_dir / f).exists():
                shutil.copy(tokenizer_dir / f, dest / f)
    return dest


@contextmanager
def running_service(
    built: Path,
    state: Path,
    args: argparse.Namespace,
    max_len: int,
    instances: int,
    concurrency: int,
    settings: dict[str, str] | None = None,
):
    """redis-server + tritonserver (model loaded, ``instances`` instances) + a Celery worker, up until the
    block ends; yields the cluster (``broker_url`` to pass to ``ingest --broker``, ``engine_stats()``).
    ``settings``: config fields by name (``output_dtype``: ``fp16``), applied last."""
    from core.config import FbasConfig, apply_env
    from core.envs import read_env
    from services.local import LocalCluster

    cfg = apply_env(FbasConfig(), read_env())  # FBAS_TRITONSERVER and the like, as the CLI reads them
    cfg.engine.target, cfg.engine.precision, cfg.engine.max_seq_len = args.target, args.precision, max_len
    cfg.serve.instance_count, cfg.serve.max_docs_per_request = instances, args.batch_rows
    cfg.queue.concurrency = concurrency
    if settings:
        cfg = apply_env(cfg, settings)
    cluster = LocalCluster(built, state, cfg, out_roots=[state.parent])  # the runs' outputs sit beside it
    try:
        cluster.start()
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def worker_stages(cluster, out: Path, since: dict | None = None) -> dict:
    """Seconds the running service's worker spent in each stage (``workers.metrics``: read, tokenize, infer,
    write, and the whole ``task``) on the job in ``out``, summed over its pool processes, with batch counts;
    read from the pool's metrics files (the service's worker serves no endpoint). ``since``: an earlier
    ``all_worker_stages`` to subtract (a rerun of the same corpus is the same job: its counters go on)."""
    job = json.loads((out / "manifest.json").read_text())["job"]
    got = all_worker_stages(cluster).get(job, {})
    before = (since or {}).get(job, {})
    return {
        stage: {k: round(v - before.get(stage, {}).get(k, 0.0), 3) for k, v in kinds.items()}
        for stage, kinds in got.items()
    }


def all_worker_stages(cluster) -> dict:
    """``{job: {stage: {"s": seconds, "batches": n}}}`` for every job the running service's worker has seen."""
    from prometheus_client import CollectorRegistry, multiprocess

    from workers.metrics import MULTIPROC_ENV

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=cluster.worker.env[MULTIPROC_ENV])
    got: dict = {}
    for metric in registry.collect():
        if metric.name != "fbas_stage_seconds":
            continue
        for sample in metric.samples:
            if not sample.name.endswith(("_sum", "_count")):
                continue
            kind = "s" if sample.name.endswith("_sum") else "batches"
            stages = got.setdefault(sample.labels.get("job_id"), {})
            stages.setdefault(sample.labels["stage"], {})[kind] = round(sample.value, 3)
    return got


@contextmanager
def gpu_trace(into: dict, bin_s: float = 0.5):
    """Samples the GPU's utilization (``nvidia-smi``, every 100 ms) while the block runs; afterwards
    ``into["gpu_util"]`` holds the mean % per ``bin_s`` seconds from the block's start (nothing without
    nvidia-smi). Kernel-busy time, as the driver counts it: a coarse picture of when the GPU waited."""
    import subprocess
    from datetime import datetime

    if not shutil.which("nvidia-smi"):
        yield
        return
    start = time.time()
    proc = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield
    finally:
        proc.terminate()
        lines = proc.communicate()[0].splitlines()
        bins: dict[int, list[int]] = {}
        for line in lines:
            try:
                ts, util = (x.strip() for x in line.split(","))
                t = datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp() - start
                bins.setdefault(int(t // bin_s), []).append(int(util))
            except ValueError:
                continue
        into["gpu_util"] = [round(sum(v) / len(v)) for _, v in sorted(bins.items()) if _ >= 0]
        into["gpu_util_bin_s"] = bin_s


def long_corpus(data: Path, tokenizer_dir: Path, n_docs: int, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_gpu import long_mix, stsb_sentences

    from core.tokenize import Tokenizer

    tok = Tokenizer.from_file(tokenizer_dir / "tokenizer.json", 512)
    docs = long_mix(stsb_sentences(data / "stsb_multi_mt"), tok, n_docs)
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(docs))], "text": docs}), path)
    return len(docs)


def bench_env() -> dict[str, str]:
    """The environment the benchmarks' child processes run with: this checkout first on the path, no hub."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def result_header(gpu: bool) -> dict:
    """What every result file starts with: date, host, cores, the command and, on a GPU, the card."""
    res: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "command": " ".join(sys.argv),
    }
    if gpu:
        import torch

        res["gpu"] = torch.cuda.get_device_name()
    return res


def _checkout_env(env: dict, root: Path) -> dict:
    """``env`` with ``root`` (a checkout whose producer runs) first on PYTHONPATH."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(root), env["PYTHONPATH"]])}


def _key(mode: str, modes: list[str], name: str) -> str:
    """A result's name: ``name``, prefixed with ``lengths=MODE`` when several modes run."""
    return name if len(modes) == 1 else f"lengths={mode} {name}"


def _variants(spec: str) -> list[tuple[str, dict[str, str]]]:
    """``--service-variants`` as (name, config fields); ``[("", {})]`` when none are given."""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, fields = item.partition("=")
        out.append((f"variant={name}", dict(f.split(":", 1) for f in filter(None, fields.split("+")))))
    return out or [("", {})]


def _summary(runs: list[dict], n: int, engine_s: float) -> dict:
    if not runs:
        return {}
    wall = statistics.median(x["wall_s"] for x in runs)
    embed = statistics.median(x["embed_s"] for x in runs)
    return {
        "fbas_docs_per_s": round(n / wall, 1),
        "efficiency": round(engine_s / wall, 3),
        "steady_state_efficiency": round(engine_s / embed, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, type=Path, help="all-MiniLM-L6-v2 folder (tokenizer + config)")
    ap.add_argument(
        "--data", default=str(ROOT / "tests" / "data"), type=Path, help="evaluation data folder (holds stsb_multi_mt/)"
    )
    ap.add_argument("--cases", default="minilm-stsb,base-long", help="comma list: minilm-stsb, base-long")
    ap.add_argument("--stsb-repeat", type=int, default=40, help="times the STS-B sentences repeat (minilm-stsb)")
    ap.add_argument("--long-docs", type=int, default=100_000, help="documents of the long mix (base-long)")
    ap.add_argument("--runs", type=int, default=1, help="fbas runs per case; the median counts")
    ap.add_argument("--target", default="gpu", help="engine target (onnx: dry run of this script on a CPU)")
    ap.add_argument("--precision", default=None, help="engine precision (default: fp16 on gpu, fp32 on onnx)")
    ap.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="Celery worker processes (default 0: local mode's sizing, the cores + 4 for a GPU)",
    )
    ap.add_argument("--batch-tokens", type=int, default=65536, help="token budget of one queued batch")
    ap.add_argument("--batch-rows", type=int, default=4096, help="most rows in one queued batch")
    ap.add_argument(
        "--instance-counts",
        default="2",
        help="Triton model instances on the GPU, comma list: "
        "one fbas run set per count (2: one instance's host work overlaps the other's GPU work)",
    )
    ap.add_argument(
        "--service", action="store_true", help="also time the ingest against services already running (ingest --broker)"
    )
    ap.add_argument(
        "--service-concurrency",
        default=None,
        help="comma list of worker processes for the running service, one service per value (default: --concurrency)",
    )
    ap.add_argument(
        "--service-variants",
        default="",
        help="comma list of NAME=FIELD:VALUE[+FIELD:VALUE], e.g. fp16=output_dtype:fp16,shm=shared_memory:true: "
        "one running service per variant, its config fields set so (default: one service, as configured)",
    )
    ap.add_argument("--local-runs", type=int, default=None, help="local-mode runs per case (default: --runs)")
    ap.add_argument(
        "--cold-run",
        action="store_true",
        help="one local run before the timed ones, reported apart: the first local run of this "
        "benchmark (on a fresh host its start is cold; after the in-process engine run, which "
        "compiles the kernels of its own shapes)",
    )
    ap.add_argument(
        "--lengths",
        default="auto",
        help="comma list of `ingest --lengths` modes (auto, exact, estimate): one fbas run set per mode, "
        "the runs of the modes alternating",
    )
    ap.add_argument(
        "--fbas-root",
        type=Path,
        default=None,
        help="also time this other checkout's ingest (a baseline commit, same run): in local mode, "
        "and with --service its producer against the same running service, runs alternating",
    )
    ap.add_argument(
        "--service-roots",
        default=None,
        help="comma list of NAME=CHECKOUT: other checkouts' producers, run against the same running "
        "service, alternating with this one (variants of a change, same run)",
    )
    ap.add_argument(
        "--log-lines",
        type=int,
        default=0,
        help="keep the first N lines of each local run's and the first service run's `ingest -v` log "
        "in the results (local runs also keep tritonserver's and the worker's start lines)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()

    device = "cuda:0" if args.target == "gpu" else None
    args.precision = args.precision or ("fp16" if device else "fp32")
    args.concurrency = args.concurrency or default_concurrency(gpu=device is not None)
    env = bench_env()
    res: dict = {**result_header(gpu=device is not None), "cases": {}}
    print(json.dumps(res), flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="fbas-bench-gpu-ingest-"))
    cold_done = False
    work.mkdir(parents=True, exist_ok=True)
    try:
        for case in args.cases.split(","):
            shape, mix = case.split("-")
            model = random_model(args.tokenizer, work / f"model-{shape}", shape)
            corpus = work / f"{case}.parquet"
            if mix == "stsb":
                n, max_len = make_corpus(args.data, args.stsb_repeat, corpus), 256
            else:
                n, max_len = long_corpus(args.data, args.tokenizer, args.long_docs, corpus), 512
            engine_spec = {
                "model": str(model),
                "target": args.target,
                "max_seq_len": max_len,
                "pooling": "mean",
                "normalize": True,
            }
            built = warm_model(work / case, args.precision, **engine_spec)
            flags = (
                "--model",
                str(model),
                "--target",
                args.target,
                "--max-seq-len",
                str(max_len),
                "--pooling",
                "mean",
                "--normalize",
                "--concurrency",
                str(args.concurrency),
                "--batch-tokens",
                str(args.batch_tokens),
                "--batch-rows",
                str(args.batch_rows),
                "--max-docs-per-request",
                str(args.batch_rows),
            )
            r: dict = {"docs": n, "engine": run_engine(corpus, built, 0, device=device), "fbas": {}}
            print(case, "engine", r["engine"], flush=True)
            eng = r["engine"]["model_s"]
            r["summary"] = {
                "tokens": r["engine"]["tokens"],
                "engine_docs_per_s": round(n / eng, 1),
                "engine_with_tokenize_docs_per_s": round(n / (eng + r["engine"]["tokenize_s"]), 1),
            }
            modes = args.lengths.split(",")
            for ic in args.instance_counts.split(","):
                local = {m: r["fbas"].setdefault(_key(m, modes, f"instances={ic}"), []) for m in modes}
                n_local = args.runs if args.local_runs is None else args.local_runs
                base = r["fbas"].setdefault(f"baseline instances={ic}", []) if args.fbas_root else None
                if args.cold_run and n_local and not cold_done:  # the host's first start (caches cold), kept apart
                    cold_done = True
                    cold = r["fbas"][f"cold instances={ic}"] = [
                        run_fbas(
                            corpus,
                            work / f"cold-{case}-{ic}",
                            env,
                            args.precision,
                            flags + ("--instance-count", ic),
                            log_lines=args.log_lines,
                        )
                    ]
                    print(case, "fbas cold", cold[-1], flush=True)
                for k in range(n_local):
                    for m, runs in local.items():
                        runs.append(
                            run_fbas(
                                corpus,
                                work / f"out-{case}-{ic}-{m}-{k}",
                                env,
                                args.precision,
                                flags + ("--instance-count", ic, "--lengths", m),
                                log_lines=args.log_lines,
                            )
                        )
                        print(case, "fbas", _key(m, modes, f"instances={ic}"), runs[-1], flush=True)
                    if base is not None:  # alternating with this checkout's runs, so a drifting host hits both
                        base.append(
                            run_fbas(
                                corpus,
                                work / f"base-{case}-{ic}-{k}",
                                _checkout_env(env, args.fbas_root),
                                args.precision,
                                flags + ("--instance-count", ic),
                                log_lines=args.log_lines,
                                root=args.fbas_root,
                            )
                        )
                        print(case, f"baseline instances={ic}", base[-1], flush=True)
                    if args.json:
                        args.json.write_text(json.dumps({**res, "cases": {**res["cases"], case: r}}, indent=2))
                for m, runs in local.items():
                    if runs:
                        r["summary"][_key(m, modes, f"instances={ic}")] = _summary(runs, n, eng)
                if base:
                    r["summary"][f"baseline instances={ic}"] = _summary(base, n, eng)
                variants = _variants(args.service_variants)
                for conc, (vname, settings) in (
                    [(c, v) for c in (args.service_concurrency or str(args.concurrency)).split(",") for v in variants]
                    if args.service
                    else []
                ):
                    name = f"service instances={ic}" + (f" concurrency={conc}" if args.service_concurrency else "")
                    name += f" {vname}" if vname else ""
                    svc = {m: r["fbas"].setdefault(_key(m, modes, name), []) for m in modes}
                    roots = dict(x.split("=", 1) for x in args.service_roots.split(",")) if args.service_roots else {}
                    if args.fbas_root:  # the baseline checkout's producer, against the same running service
                        roots["baseline"] = str(args.fbas_root)
                    for label in roots:
                        svc[label] = r["fbas"].setdefault(f"{label} {name}", [])
                    with running_service(
                        built, work / f"svc-{case}-{ic}-{conc}{vname}", args, max_len, int(ic), int(conc), settings
                    ) as svc_cluster:
                        broker = svc_cluster.broker_url
                        for k in range(args.runs):
                            for m, runs in svc.items():
                                root = Path(roots[m]) if m in roots else ROOT
                                extra = ("--broker", broker) + (() if m in roots else ("--lengths", m))
                                trace: dict = {}
                                before, stages0 = svc_cluster.engine_stats(), all_worker_stages(svc_cluster)
                                with gpu_trace(trace):
                                    got = run_fbas(
                                        corpus,
                                        work / f"svc-out-{case}-{ic}-{conc}{vname}-{m}-{k}",
                                        {**_checkout_env(env, root), "FBAS_TASK_KEY": svc_cluster.task_key},
                                        args.precision,
                                        flags + extra,
                                        log_lines=args.log_lines if k == 0 else 0,
                                        root=root,
                                    )
                                after = svc_cluster.engine_stats()  # Triton's account of this run
                                trace["triton"] = {k: round(after[k] - before[k], 3) for k in after if k in before}
                                trace["worker_stages"] = worker_stages(
                                    svc_cluster, work / f"svc-out-{case}-{ic}-{conc}{vname}-{m}-{k}", since=stages0
                                )
                                runs.append({**got, **trace})
                                label = f"{m} {name}" if m in roots else _key(m, modes, name)
                                print(case, label, runs[-1], flush=True)
                                r["summary"][label] = _summary(runs, n, eng)
                                if args.json:  # after every run: a run cut short keeps what it measured
                                    args.json.write_text(
                                        json.dumps({**res, "cases": {**res["cases"], case: r}}, indent=2)
                                    )
            print(case, "summary", r["summary"], flush=True)
            res["cases"][case] = r
            if args.json:
                args.json.write_text(json.dumps(res, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({c: v["summary"] for c, v in res["cases"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
