"""`fbas-pipeline eval`: retrieval quality of an output folder on a BEIR-format query set.

    queries.jsonl  {"_id": "q1", "text": "..."} per line (or Parquet with id/_id, text)
    qrels.tsv      query-id <TAB> corpus-id <TAB> score   (a header line is allowed)

Metrics as BEIR computes them with pytrec_eval: nDCG@10 with graded gains (the qrels score)
and log2 discounts, the ideal ranking from the qrels; recall@100 = relevant documents
(score > 0) retrieved in the top 100 / relevant documents. Only queries that have qrels are
scored; by default a hit whose id equals the query id is dropped (BEIR's
``ignore_identical_ids``, needed for ArguAna-style sets). Ids compare as strings.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from core.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["read_qrels", "ndcg_at_k", "recall_at_k", "evaluate_run", "evaluate"]


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """``{query id: {corpus id: score}}`` from a BEIR qrels TSV."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"qrels file {p} does not exist")
    qrels: dict[str, dict[str, int]] = {}
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if len(parts) < 3:
                raise InputError(f"{p}:{n}: expected 'query-id<TAB>corpus-id<TAB>score'")
            try:
                score = int(float(parts[2]))
            except ValueError:
                if n == 1:
                    continue  # header
                raise InputError(f"{p}:{n}: score {parts[2]!r} is not a number") from None
            qrels.setdefault(parts[0], {})[parts[1]] = score
    if not qrels:
        raise InputError(f"{p} holds no qrels")
    return qrels


def ndcg_at_k(ranked: list[str], rels: dict[str, int], k: int = 10) -> float:
    """nDCG@k with gain = relevance score and discount 1/log2(rank + 1) (pytrec_eval's ndcg_cut)."""
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: list[str], rels: dict[str, int], k: int = 100) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def evaluate_run(run: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Mean nDCG@10 and recall@100 over the queries that have qrels and a run."""
    scored = [q for q in qrels if q in run]
    if not scored:
        raise InputError("no query of the query file has qrels: check that the ids match")
    ndcg = sum(ndcg_at_k(run[q], qrels[q], 10) for q in scored) / len(scored)
    recall = sum(recall_at_k(run[q], qrels[q], 100) for q in scored) / len(scored)
    return {"ndcg@10": round(ndcg, 5), "recall@100": round(recall, 5), "queries": len(scored)}


def evaluate(
    out: str | Path,
    queries_path: str | Path,
    qrels_path: str | Path,
    *,
    threads: int = 0,
    ignore_identical_ids: bool = True,
    depth: int = 100,
) -> dict[str, Any]:
    """Search every query (top ``depth``) and score the run against the qrels."""
    from output.search import Searcher, read_queries, search_many

    qrels = read_qrels(qrels_path)
    queries = [(str(q), t) for q, t in read_queries(queries_path) if str(q) in qrels]
    if not queries:
        raise InputError(f"none of the queries in {queries_path} has qrels in {qrels_path}: check that the ids match")
    searcher = Searcher(out, threads=threads)
    run: dict[str, list[str]] = {}
    for qid, hits in search_many(searcher, queries, depth + 1):
        ids = [str(h.id) for h in hits]
        if ignore_identical_ids:
            ids = [d for d in ids if d != qid]
        run[qid] = ids[:depth]
    result = evaluate_run(run, qrels)
    logger.info(
        "eval %s: nDCG@10 %.4f, recall@100 %.4f over %d queries",
        out,
        result["ndcg@10"],
        result["recall@100"],
        result["queries"],
    )
    return result
