"""Where one Triton request's time goes, against the engine alone on the same request.

    python benchmarks/bench_triton_path.py --tokenizer MINILM_DIR [--shape wide] [--rows 1024] [--requests 30]

One tritonserver per variant (one instance, the model on this host's target), one request in flight at a time,
every request the same ``--rows`` documents of real STS-B sentences. Per request, in ms (medians are not
available from Triton's counters, so these are means over ``--requests``):

* **client**: the worker's ``TritonEncoder.embed`` round trip (validation, encoding, gRPC, decoding);
* **triton compute**: Triton's ``compute_input + compute_infer + compute_output`` for the request;
* **execute**: the model's own seconds in ``execute`` (``model_repository/model.py``'s counter);
* **embed**: inside it, the engine's ``embed``;
* **engine alone**: the same request through the same built engine in this process.

Differences: client - triton compute = gRPC, queue and the client's own work; triton compute - execute = the
Python backend's hand-over (inputs and outputs through the stub's shared memory, its IPC); execute - embed =
the model file's Python (validation, concatenation, the response). Variants: ``fp32`` (default outputs),
``fp16`` (``output_dtype: fp16``), ``shm`` (system shared memory between client and Triton), ``fp16+shm``.

``--shape wide`` is MiniLM's width with one thin layer (hidden 384, so outputs are MiniLM's 384 floats a
document, at a fraction of its compute) so that a CPU host shows the serving's cost at MiniLM's output size;
``minilm`` is the model itself (on a GPU host).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gpu import stsb_sentences  # noqa: E402
from bench_gpu_ingest import random_model  # noqa: E402
from bench_ingest import warm_model  # noqa: E402


def one_variant(built: Path, work: Path, name: str, ids: np.ndarray, lens: np.ndarray, requests: int) -> dict:
    from services.repository import ModelEntryOptions, write_model_repository
    from services.triton import TritonProcess
    from workers.triton_client import ClientOptions, TritonEncoder

    opts = ModelEntryOptions(
        output_dtype="fp16" if "fp16" in name else "fp32", instance_count=1, max_docs_per_request=len(lens)
    )
    repo = work / f"repo-{name.replace('+', '-')}"
    write_model_repository(built, repo, options=opts)
    with TritonProcess(repo, model_name=opts.model_name, log_file=work / f"triton-{name}.log") as triton:
        triton.wait_ready(300.0)
        copts = ClientOptions(url=triton.grpc_url, model_name=opts.model_name, shared_memory="shm" in name)
        with TritonEncoder(copts) as enc:
            for _ in range(3):  # warm: the first requests open the channel and the shared-memory regions
                enc.embed(ids, lens)
            time.sleep(1.0)  # the model's counters reach the metrics endpoint a moment after its execute
            before = triton.model_stats()
            walls = []
            for _ in range(requests):
                t0 = time.perf_counter()
                enc.embed(ids, lens)
                walls.append(time.perf_counter() - t0)
            time.sleep(1.0)
            after = triton.model_stats()
    d = {k: after[k] - before[k] for k in after if k in before}
    n = d["engine_requests"]
    ms = {
        "client": 1e3 * float(np.mean(walls)),
        "triton_compute": 1e3 * (d["engine_input_s"] + d["engine_compute_s"] + d["engine_output_s"]) / n,
        "triton_queue": 1e3 * d["engine_queue_s"] / n,
    }
    if "model_execute_s" in d:
        ms["execute"] = 1e3 * d["model_execute_s"] / n
        ms["embed"] = 1e3 * d["model_embed_s"] / n
    return {
        "variant": name,
        "requests": n,
        "executions": d["engine_executions"],
        **{k: round(v, 2) for k, v in ms.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, type=Path, help="all-MiniLM-L6-v2 folder (tokenizer + config)")
    ap.add_argument("--data", type=Path, default=ROOT / "tests" / "data")
    ap.add_argument("--shape", default="wide", help="wide (hidden 384, one thin layer), tiny, or minilm")
    ap.add_argument("--target", default="onnx")
    ap.add_argument("--precision", default=None, help="default: fp16 on gpu, fp32 otherwise")
    ap.add_argument("--rows", type=int, default=1024, help="documents a request")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--variants", default="fp32,fp16,shm,fp16+shm")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    precision = args.precision or ("fp16" if args.target == "gpu" else "fp32")

    from engine.model_dir import load_engine, load_tokenizer

    res: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "shape": args.shape,
        "rows": args.rows,
        "requests": args.requests,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="fbas-bench-path-") as tmp:
        work = Path(tmp)
        model = random_model(args.tokenizer, work / f"model-{args.shape}", args.shape)
        built = warm_model(work, precision, model=str(model), target=args.target, max_seq_len=128)
        texts = stsb_sentences(args.data / "stsb_multi_mt")
        enc = load_tokenizer(built).encode([texts[i % len(texts)] for i in range(args.rows)])
        ids, lens = enc.token_ids, enc.lengths
        res["tokens_per_request"] = int(lens.sum())
        engine = load_engine(built)
        engine.embed(ids, lens)
        t0 = time.perf_counter()
        for _ in range(args.requests):
            engine.embed(ids, lens)
        res["engine_alone_ms"] = round(1e3 * (time.perf_counter() - t0) / args.requests, 2)
        del engine
        print(f"engine alone: {res['engine_alone_ms']} ms a request of {args.rows} docs", flush=True)
        for name in args.variants.split(","):
            got = one_variant(built, work, name, ids, lens, args.requests)
            print(json.dumps(got), flush=True)
            res["runs"].append(got)
    print(f"{'variant':<10} {'client':>8} {'compute':>8} {'execute':>8} {'embed':>8} {'alone':>8}  (ms a request)")
    for r in res["runs"]:
        print(
            f"{r['variant']:<10} {r['client']:>8} {r['triton_compute']:>8} {r.get('execute', '-'):>8} "
            f"{r.get('embed', '-'):>8} {res['engine_alone_ms']:>8}"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
