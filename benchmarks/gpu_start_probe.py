"""Where a fresh process's GPU engine start goes: imports, CUDA, weights, the first batches.

    python benchmarks/gpu_start_probe.py --tokenizer MINILM_DIR [--json OUT.json]

Builds the BERT-base fp16 ``--target gpu`` folder of ``bench_gpu_ingest.py`` (random weights), then
starts the engine in new processes, step by step, as a Triton model instance does (``model.py``:
``load_engine``, then its warm-up batches): first with an empty Triton-language kernel cache
(``TRITON_CACHE_DIR`` in a new folder: a machine's first start), then twice with that cache filled.
Each step's seconds are printed, and how many files the kernel cache gained in it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# the warm-up batches of model_repository/model.py (document lengths), then the first one again
BATCHES = [[3, 17, 64, 128], [12], [24] * 16, [48] * 64, [512] * 8, [3, 17, 64, 128]]

CHILD = r"""
import json, os, sys, time
from pathlib import Path
cache = Path(os.environ["TRITON_CACHE_DIR"])
def files():
    return sum(1 for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0
steps, t, n = [], time.perf_counter(), files()
def step(name):
    global t, n
    now, m = time.perf_counter(), files()
    steps.append({"step": name, "s": round(now - t, 3), "cache_files_added": m - n})
    t, n = now, m
import torch
step("import torch")
import numpy as np
from engine.model_dir import load_engine
import engine.torch_gpu
step("import the engine")
torch.zeros(1, device="cuda:0"); torch.cuda.synchronize()
step("CUDA context")
eng = load_engine(sys.argv[1], device="cuda:0")
torch.cuda.synchronize()
step("load_engine (weights to the GPU)")
rng = np.random.default_rng(0)
for lens in json.loads(sys.argv[2]):
    lengths = np.array(lens, dtype=np.int32)
    ids = rng.integers(1000, 2000, size=int(lengths.sum()), dtype=np.int32)
    eng.embed(ids, lengths)
    step(f"embed {len(lens)} docs, {int(lengths.sum())} tokens")
print("STEPS " + json.dumps(steps))
"""


def main() -> int:
    from bench_gpu_ingest import random_model
    from bench_ingest import warm_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, type=Path, help="all-MiniLM-L6-v2 folder (its tokenizer)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fbas-start-probe-"))
    model = random_model(args.tokenizer, work / "model-base", "base")
    built = warm_model(work, "fp16", model=str(model), target="gpu", max_seq_len=512, pooling="mean",
                       normalize=True)
    env = {**os.environ, "TRITON_CACHE_DIR": str(work / "triton-cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = {"date": time.strftime("%Y-%m-%d"), "runs": {}}
    for label in ("empty kernel cache", "filled cache 1", "filled cache 2"):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, str(built), json.dumps(BATCHES)], env=env,
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        steps = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("STEPS "))[6:])
        res["runs"][label] = {"process_wall_s": round(wall, 3), "steps": steps}
        print(f"--- {label}: {wall:.2f} s in all")
        for s in steps:
            print(f"  {s['step']:40s} {s['s']:7.3f} s   kernel cache +{s['cache_files_added']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
