"""Tokenization speed: HF ``tokenizers`` (``core.tokenize.Tokenizer.encode``) vs the C WordPiece tokenizer
(``dll.wordpiece.FastTokenizer``, 1 thread and N threads), same corpus, same run, same machine.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_tokenize.py [--threads N] [--repeats 3] [--json out.json]

Corpora (tests/data): STS-B English sentences (test + dev of stsb_multi_mt, both of each pair, repeated to
``--short-docs``) and SciFact abstracts with their titles (all 5,183, long: many past 256 tokens), both with
all-MiniLM-L6-v2's tokenizer truncating at 256. Each side encodes the whole corpus in batches of
``--batch`` texts (the worker's unit) and returns the same ``Encoded`` (packed ids, lengths, truncation).
The sides take turns in each of ``--repeats`` rounds, and each side's best round is reported as docs/s and
tokens/s (tokens after truncation). HF runs as the pipeline runs it in one process: ``encode_batch_fast``
with its own Rayon threads (``TOKENIZERS_PARALLELISM`` as set, default on); ``--hf-threads`` sets
``RAYON_NUM_THREADS`` before tokenizers is imported. Every run also checks that all sides give the same ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _time_sides(sides: dict, batches: list[list[str]], repeats: int) -> dict[str, tuple[float, int, np.ndarray]]:
    """Best wall time of each side over ``repeats`` rounds, the sides taking turns within each round (so a
    change of load on a shared machine hits all of them), with its tokens and packed ids."""
    best: dict[str, float] = {}
    last: dict[str, list] = {}
    for _ in range(repeats):
        for side, encode in sides.items():
            t0 = time.perf_counter()
            last[side] = [encode(b) for b in batches]
            best[side] = min(best.get(side, float("inf")), time.perf_counter() - t0)
    return {
        side: (best[side], sum(int(e.lengths.sum()) for e in out), np.concatenate([e.token_ids for e in out]))
        for side, out in last.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="C threads for the N-thread run")
    ap.add_argument("--hf-threads", type=int, default=0, help="RAYON_NUM_THREADS for HF (0: its default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512, help="texts per encode call (the pipeline's batch_rows)")
    ap.add_argument("--short-docs", type=int, default=100_000, help="STS-B sentences, repeated to this many")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.hf_threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.hf_threads)

    from core.tokenize import Tokenizer, tokenizer_json_for
    from dll.wordpiece import FastTokenizer
    from engine.checkpoint import load_checkpoint
    from tests.wordpiece_corpus import scifact_abstracts, stsb_sentences

    data = ROOT / "tests" / "data"
    tok_json = tokenizer_json_for(load_checkpoint(None).tokenizer)
    short = stsb_sentences(data)
    corpora = {
        "STS-B sentences": (short * (args.short_docs // len(short) + 1))[: args.short_docs],
        "SciFact abstracts": scifact_abstracts(data),
    }
    sides = {
        "HF tokenizers": Tokenizer(tok_json, args.max_seq_len).encode,
        "C, 1 thread": FastTokenizer(tok_json, args.max_seq_len, threads=1).encode,
        f"C, {args.threads} threads": FastTokenizer(tok_json, args.max_seq_len, threads=args.threads).encode,
    }
    load = os.getloadavg()[0]
    print(f"{_cpu()}, {os.cpu_count()} cores, load {load:.1f}; batch {args.batch}, best of {args.repeats}")
    results = []
    for corpus, texts in corpora.items():
        batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
        rows, reference = {}, None
        for side, (secs, tokens, ids) in _time_sides(sides, batches, args.repeats).items():
            if reference is None:
                reference = ids
            elif not np.array_equal(ids, reference):
                raise SystemExit(f"{side} gives other ids than HF on {corpus}")
            rows[side] = (len(texts) / secs, tokens / secs)
        hf_docs = rows["HF tokenizers"][0]
        print(f"\n{corpus}: {len(texts):,} docs, {tokens / len(texts):.1f} tokens/doc after truncation")
        for side, (docs_s, tok_s) in rows.items():
            print(f"  {side:<16} {docs_s:>12,.0f} docs/s {tok_s:>14,.0f} tokens/s   {docs_s / hf_docs:5.2f}x HF")
            results.append({"corpus": corpus, "side": side, "docs_per_s": docs_s, "tokens_per_s": tok_s})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": _cpu(), "cores": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
