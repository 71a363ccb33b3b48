"""Triton client speed: response decoding vs tritonclient, and client overhead per round trip.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_triton_client.py [--model-dir DIR] [--json out.json]

1. Decode time per response, 1024 x 384 and 1024 x 768 FP32, same run, same bytes:
   - ours gRPC:  workers.triton_wire scan + np.frombuffer view of raw_output_contents
   - ours HTTP:  JSON header parse + np.frombuffer view of the binary body
   - tritonclient gRPC: ModelInferResponse.FromString (what its stub deserializer does) + InferResult.as_numpy
   - tritonclient HTTP binary: InferResult.from_response_body(...).as_numpy
   - JSON output (no binary_data): tritonclient's InferResult.from_response_body(...).as_numpy
   The 1024 x 384 responses are captured from the real tritonserver serving all-MiniLM-L6-v2;
   the 1024 x 768 ones are built in the same wire format (tritonclient's protobuf classes,
   Triton's JSON header layout), as no 768-wide model is built here.
2. Client overhead (request encoding + response decoding) as a share of one batch's round
   trip through Triton at the pipeline's default batch size (CorpusConfig.batch_rows = 512
   real sentences), gRPC and HTTP; 64 documents as well for scale.

The server is stopped before part 1, so the decode timings do not share the 2 cores with it.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.repository import ModelEntryOptions, write_model_repository
from services.triton import TritonProcess
from workers.triton_client import ClientOptions, TritonEncoder  # noqa: E402
from workers.triton_wire import (  # noqa: E402
    build_infer_request,
    encode_http_request,
    output_array,
    parse_http_response,
    scan_infer_response,
)


def real_sentences(n: int) -> list[str]:
    """n real English sentences: STS-B test (tests/data) when present, else the bundled calibration sample."""
    path = ROOT / "tests" / "data" / "stsb_multi_mt" / "stsb-en-test.csv"
    texts: list[str] = []
    if path.exists():
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                texts += [row[0], row[1]]
    else:
        texts = [t.strip() for t in (ROOT / "engine/data/calibration.txt").read_text().splitlines() if t.strip()]
    return (texts * (n // len(texts) + 1))[:n]


def cpu_name() -> str:
    """CPU model and the cores this process may use, e.g. 'Intel(R) Xeon(R) Processor, 2 cores'."""
    from core.envs import cpu_count

    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {cpu_count()} cores"


def timeit(fn, repeat: int, warmup: int = 3) -> dict:
    """Median and min wall time of ``fn()`` in microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return {"median_us": statistics.median(times), "min_us": min(times), "repeat": repeat}


# -- capturing and synthesizing responses


def grpc_bytes(enc: TritonEncoder, ids: np.ndarray, lens: np.ndarray) -> bytes:
    """One real ModelInferResponse as bytes (the same raw call the client makes)."""
    return enc._transport._send(build_infer_request("fbas_encoder", ids, lens))


def http_body(url: str, ids: np.ndarray, lens: np.ndarray, binary: bool) -> tuple[bytes, int | None]:
    host, port = url.rsplit(":", 1)
    body, hlen = encode_http_request(ids, lens)
    if not binary:
        header = json.loads(body[:hlen])
        header["outputs"][0]["parameters"]["binary_data"] = False
        h2 = json.dumps(header).encode()
        body, hlen = h2 + body[hlen:], len(h2)
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    c.request(
        "POST", "/v2/models/fbas_encoder/infer", body=body, headers={"Inference-Header-Content-Length": str(hlen)}
    )
    r = c.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(data[:300])
    h = r.getheader("Inference-Header-Content-Length")
    c.close()
    return data, (int(h) if h else None)


def synthetic(emb: np.ndarray) -> dict:
    """gRPC bytes, HTTP binary body and HTTP JSON body for an output ``emb`` [1, B, dim] FP32."""
    from tritonclient.grpc import service_pb2 as pb

    r = pb.ModelInferResponse(model_name="fbas_encoder", model_version="1")
    o = r.outputs.add()
    o.name, o.datatype = "embedding", "FP32"
    o.shape.extend(emb.shape)
    r.raw_output_contents.append(emb.tobytes())
    header = json.dumps(
        {
            "model_name": "fbas_encoder",
            "model_version": "1",
            "outputs": [
                {
                    "name": "embedding",
                    "datatype": "FP32",
                    "shape": list(emb.shape),
                    "parameters": {"binary_data_size": emb.nbytes},
                }
            ],
        }
    ).encode()
    js = json.dumps(
        {
            "model_name": "fbas_encoder",
            "model_version": "1",
            "outputs": [
                {
                    "name": "embedding",
                    "datatype": "FP32",
                    "shape": list(emb.shape),
                    "data": [float(x) for x in emb.ravel()],
                }
            ],
        }
    ).encode()
    return {"grpc": r.SerializeToString(), "http": (header + emb.tobytes(), len(header)), "json": (js, None)}


# -- decoders


def decoders(resp: dict) -> dict:
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.grpc import service_pb2 as pb

    g = resp["grpc"]
    hb, hl = resp["http"]
    jb, jl = resp["json"]

    def ours_grpc():
        return output_array(g, scan_infer_response(g), "embedding")[0]

    def ours_http():
        return parse_http_response(hb, hl)[1]["embedding"][0]

    def tc_grpc():
        return tg.InferResult(pb.ModelInferResponse.FromString(g)).as_numpy("embedding")[0]

    def tc_http():
        return th.InferResult.from_response_body(hb, False, hl).as_numpy("embedding")[0]

    def tc_json():
        return th.InferResult.from_response_body(jb, False, jl).as_numpy("embedding")[0]

    ref = ours_grpc()
    for f in (ours_http, tc_grpc, tc_http, tc_json):
        np.testing.assert_allclose(f(), ref, rtol=1e-6, atol=1e-7)  # every decoder reads the same numbers
    return {
        "ours gRPC (scan + frombuffer)": ours_grpc,
        "ours HTTP binary": ours_http,
        "tritonclient gRPC (FromString + as_numpy)": tc_grpc,
        "tritonclient HTTP binary": tc_http,
        "tritonclient HTTP JSON output": tc_json,
    }


# -- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="built model folder (default: build all-MiniLM-L6-v2 fp32 into a temp dir)")
    ap.add_argument("--batch", type=int, default=512, help="documents per request for the overhead measurement")
    ap.add_argument("--rounds", type=int, default=3, help="round trips per overhead measurement")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fbas-bench-") as tmp:
        results = run(args, Path(tmp))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def run(args: argparse.Namespace, tmp: Path) -> dict:
    """Measure everything (see the module docstring); ``tmp`` holds the model and the repository."""
    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is None:
        from core.config import EngineSpec
        from engine.build import build_model

        model_dir = build_model(EngineSpec(), tmp / "minilm")
    from engine.model_dir import load_tokenizer

    tok = load_tokenizer(model_dir)
    write_model_repository(model_dir, tmp / "repo", options=ModelEntryOptions())
    results: dict = {"machine": cpu_name(), "date": time.strftime("%Y-%m-%d"), "overhead": {}, "decode": {}}

    with TritonProcess(tmp / "repo", ready_timeout=300) as server:
        # part 2 first (needs the server): overhead per round trip
        for n in sorted({args.batch, 64}, reverse=True):
            enc_txt = tok.encode(real_sentences(n))
            ids, lens = enc_txt.token_ids, enc_txt.lengths
            for proto, url in (("grpc", server.grpc_url), ("http", server.http_url)):
                with TritonEncoder(ClientOptions(url=url, protocol=proto)) as enc:
                    enc.embed(ids, lens)  # warm
                    rt, cpu = [], []
                    for _ in range(args.rounds):
                        t0, c0 = time.perf_counter(), time.thread_time()
                        enc.embed(ids, lens)
                        rt.append(time.perf_counter() - t0)
                        cpu.append(time.thread_time() - c0)
                    round_trip_us = statistics.median(rt) * 1e6
                    thread_cpu_us = statistics.median(cpu) * 1e6
                    if proto == "grpc":
                        g = grpc_bytes(enc, ids, lens)
                        t_enc = timeit(lambda: build_infer_request("fbas_encoder", ids, lens), 200)
                        t_dec = timeit(lambda: output_array(g, scan_infer_response(g), "embedding")[0], 200)
                    else:
                        hb, hl = http_body(url, ids, lens, binary=True)
                        t_enc = timeit(lambda: encode_http_request(ids, lens), 200)
                        t_dec = timeit(lambda: parse_http_response(hb, hl)[1]["embedding"][0], 200)
                share = (t_enc["median_us"] + t_dec["median_us"]) / round_trip_us
                results["overhead"][f"{proto} {n} docs"] = {
                    "docs": n,
                    "tokens": int(ids.size),
                    "round_trip_ms": round_trip_us / 1e3,
                    "encode_us": t_enc["median_us"],
                    "decode_us": t_dec["median_us"],
                    "share_pct": 100 * share,
                    "client_thread_cpu_us": thread_cpu_us,
                    "thread_cpu_share_pct": 100 * thread_cpu_us / round_trip_us,
                }
        # real 1024 x 384 responses, captured for part 1
        enc_txt = tok.encode(real_sentences(1024))
        with TritonEncoder(ClientOptions(url=server.grpc_url)) as enc:
            real384 = {"grpc": grpc_bytes(enc, enc_txt.token_ids, enc_txt.lengths)}
        real384["http"] = http_body(server.http_url, enc_txt.token_ids, enc_txt.lengths, binary=True)
        real384["json"] = http_body(server.http_url, enc_txt.token_ids, enc_txt.lengths, binary=False)

    # part 1: decode, server stopped
    rng = np.random.default_rng(0)
    cases = {
        "1024 x 384 (captured from Triton)": real384,
        "1024 x 768 (same wire format)": synthetic(rng.standard_normal((1, 1024, 768)).astype(np.float32)),
    }
    for label, resp in cases.items():
        row = {}
        for name, fn in decoders(resp).items():
            row[name] = timeit(fn, 10 if "JSON" in name else 300, warmup=1 if "JSON" in name else 10)
        base = row["tritonclient gRPC (FromString + as_numpy)"]["median_us"]
        for name in row:
            row[name]["speedup_vs_tritonclient_grpc"] = base / row[name]["median_us"]
        results["decode"][label] = row
    return results


def report(results: dict) -> None:
    """Print the results as the Markdown tables BENCHMARKS.md uses."""
    print(f"\n## Decode time per response ({results['date']}, {results['machine']})\n")
    for label, row in results["decode"].items():
        print(f"### {label}\n\n| decoder | median us | min us | vs tritonclient gRPC |\n|---|---:|---:|---:|")
        for name, r in row.items():
            print(f"| {name} | {r['median_us']:.1f} | {r['min_us']:.1f} | {r['speedup_vs_tritonclient_grpc']:.1f}x |")
        print()
    print(
        "## Client overhead per round trip\n\n| path | docs | tokens | round trip ms | encode us | decode us | "
        "share | client thread CPU us | share |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for label, r in results["overhead"].items():
        print(
            f"| {label.split()[0]} | {r['docs']} | {r['tokens']} | {r['round_trip_ms']:.1f} | {r['encode_us']:.1f} | "
            f"{r['decode_us']:.1f} | {r['share_pct']:.3f}% | {r['client_thread_cpu_us']:.0f} | "
            f"{r['thread_cpu_share_pct']:.3f}% |"
        )


if __name__ == "__main__":
    main()
