"""CPU engine benchmark: fbas ONNX (fp32, int8) vs sentence-transformers fp32, same texts, same run.

docs/s include tokenization for both sides. Both use the same thread count. Texts: STS-B
sentences (short, ~15 tokens) and long texts (256+ tokens, truncated at max_seq_len 256).
Each configuration is timed ``--repeats`` times after a warm-up; the best time counts.

    .venv/bin/python benchmarks/bench_engine.py --threads 2 --json out/bench_engine.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_texts(data: Path, n_short: int, n_long: int) -> dict[str, list[str]]:
    rows = list(csv.reader(open(data / "stsb_multi_mt" / "stsb-en-test.csv", encoding="utf-8")))
    sents = [r[0] for r in rows] + [r[1] for r in rows]
    short = sents[:n_short]
    long = [" ".join(sents[i : i + 25]) for i in range(0, 25 * n_long, 25)]
    return {"stsb_sentences": short, "long_256": long}


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both engines")
    ap.add_argument("--data", default=str(ROOT / "tests" / "data"), help="evaluation data folder (default: tests/data)")
    ap.add_argument("--n-short", type=int, default=2000)
    ap.add_argument("--n-long", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fusions", default="attention,all,none", help="fusion variants to time (';'-free labels)")
    ap.add_argument("--token-budgets", default="1024,2048,4096")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from core.config import EngineSpec
    from engine.build import build_model
    from engine.model_dir import load_engine, load_tokenizer, read_meta
    from pipeline.ingest.embed_file import embed_texts

    torch.set_num_threads(args.threads)
    texts = load_texts(Path(args.data), args.n_short, args.n_long)
    tmp = Path(tempfile.mkdtemp(prefix="fbas-bench-"))
    folders = {}
    for fu in args.fusions.split(","):
        folders[("fp32", fu)] = build_model(EngineSpec(), tmp / f"fp32-{fu}", fusions=fu, threads=args.threads)
    folders[("int8", "attention")] = build_model(
        EngineSpec(precision="int8"), tmp / "int8", fusions="attention", threads=args.threads
    )
    st = SentenceTransformer(str(read_meta(folders[("fp32", "attention")]).source), device="cpu")
    results = []
    for name, tx in texts.items():
        t_st = best_time(lambda: st.encode(tx, batch_size=32, convert_to_numpy=True), args.repeats)
        ref = st.encode(tx, batch_size=32, convert_to_numpy=True)
        row = {"texts": name, "n": len(tx), "sentence_transformers_docs_s": len(tx) / t_st, "fbas": []}
        print(f"{name}: sentence-transformers fp32 {len(tx) / t_st:8.1f} docs/s")
        for (prec, fu), folder in folders.items():
            tok = load_tokenizer(folder)
            for budget in [int(b) for b in args.token_budgets.split(",")]:
                eng = load_engine(folder, threads=args.threads, token_budget=budget)
                t = best_time(lambda: embed_texts(tx, eng, tok), args.repeats)
                got = embed_texts(tx, eng, tok)
                cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
                r = {
                    "precision": prec,
                    "fusions": fu,
                    "token_budget": budget,
                    "docs_s": len(tx) / t,
                    "ratio_vs_st": t_st / t,
                    "min_cos_vs_st": float(cos.min()),
                }
                row["fbas"].append(r)
                print(
                    f"  fbas {prec} fusions={fu:<10} budget={budget:5d} {len(tx) / t:8.1f} docs/s  "
                    f"x{t_st / t:4.2f}  min cos {cos.min():.6f}"
                )
        results.append(row)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "threads": args.threads,
        "command": " ".join(sys.argv),
        "onnxruntime": __import__("onnxruntime").__version__,
        "torch": torch.__version__,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
