"""Where a fresh process's GPU engine start goes: imports, CUDA, weights, the first batches.

    python benchmarks/studies/gpu_start_probe.py --tokenizer MINILM_DIR [--json OUT.json]

Builds the BERT-base fp16 ``--target gpu`` folder of ``bench_gpu_ingest.py`` (random weights), then
starts the engine in new processes, step by step, as a Triton model instance does (``model.py``:
``load_engine``, then its warm-up batches): first with an empty Triton-language kernel cache
(``TRITON_CACHE_DIR`` in a new folder: a machine's first start), then twice with that cache filled.
Each step's seconds are printed, and how many files the kernel cache gained in it; the last run also
profiles its first batch by function (cProfile).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # benchmarks/studies/ -> the repository root
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_gpu_ingest, bench_ingest

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
for k, lens in enumerate(json.loads(sys.argv[2])):
    lengths = np.array(lens, dtype=np.int32)
    ids = rng.integers(1000, 2000, size=int(lengths.sum()), dtype=np.int32)
    if k == 0 and os.environ.get("PROBE_PROFILE"):   # where the first batch's time goes, by function
        import cProfile, io, pstats
        prof = cProfile.Profile()
        prof.runcall(eng.embed, ids, lengths)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
        print("PROFILE\n" + text.getvalue(), file=sys.stderr)
    else:
        eng.embed(ids, lengths)
    step(f"embed {len(lens)} docs, {int(lengths.sum())} tokens")
print("STEPS " + json.dumps(steps))
"""


# a local cluster's start (redis-server, tritonserver with 2 GPU instances, the Celery worker) until the model
# serves, with the code of the checkout it runs in
CLUSTER_CHILD = r"""
import sys, time
from pathlib import Path
from core.config import FbasConfig, apply_env
from core.envs import read_env
from services.local import LocalCluster
cfg = apply_env(FbasConfig(), read_env())
cfg.serve.instance_count = 2
t0 = time.perf_counter()
c = LocalCluster(Path(sys.argv[1]), Path(sys.argv[2]), cfg)
try:
    c.start()
    c.wait_ready()
    print("READY", round(time.perf_counter() - t0, 3))
finally:
    c.stop(idle=True)
"""


def cluster_starts(built: Path, roots: dict[str, Path], rounds: int, work: Path) -> dict:
    """Seconds from a local cluster's start until its model serves, per checkout, the checkouts alternating."""
    out: dict = {name: [] for name in roots}
    for k in range(rounds):
        for name, root in roots.items():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
            p = subprocess.run(
                [sys.executable, "-c", CLUSTER_CHILD, str(built), str(work / f"state-{name}-{k}")],
                env=env,
                cwd=str(root),
                capture_output=True,
                text=True,
            )
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-3000:])
            out[name].append(float(next(x for x in p.stdout.splitlines() if x.startswith("READY")).split()[1]))
            print(f"cluster ready, {name}: {out[name][-1]:.2f} s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, type=Path, help="all-MiniLM-L6-v2 folder (its tokenizer)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--cluster-roots",
        default=None,
        help="NAME=CHECKOUT,...: instead of the engine steps, time local clusters' starts (until the model "
        "serves) with each checkout's code, alternating, --rounds times",
    )
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fbas-start-probe-"))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    from bench_gpu_ingest import random_model
    from bench_ingest import warm_model

    model = random_model(args.tokenizer, work / "model-base", "base")
    built = warm_model(work, "fp16", model=str(model), target="gpu", max_seq_len=512, pooling="mean", normalize=True)
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": str(work / "triton-cache"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    res = {"date": time.strftime("%Y-%m-%d"), "runs": {}}
    if args.cluster_roots:
        roots = {k: Path(v).resolve() for k, v in (x.split("=", 1) for x in args.cluster_roots.split(","))}
        res["cluster_ready_s"] = cluster_starts(built, roots, args.rounds, work)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0
    for label in ("empty kernel cache", "filled cache 1", "filled cache 2, profiled"):
        if label.endswith("profiled"):
            env["PROBE_PROFILE"] = "1"
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-c", CHILD, str(built), json.dumps(BATCHES)], env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        steps = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("STEPS "))[6:])
        res["runs"][label] = {"process_wall_s": round(wall, 3), "steps": steps}
        if "PROFILE" in p.stderr:
            res["runs"][label]["profile"] = p.stderr[p.stderr.index("PROFILE") :]
            print(res["runs"][label]["profile"])
        print(f"--- {label}: {wall:.2f} s in all")
        for s in steps:
            print(f"  {s['step']:40s} {s['s']:7.3f} s   kernel cache +{s['cache_files_added']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
