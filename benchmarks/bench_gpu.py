"""GPU engine benchmarks, peers in the same run on the same card (BENCHMARKS.md, "GPU engine").

    python benchmarks/bench_gpu.py --model MINILM_DIR --data DATA_DIR --out results.json

Sections (``--sections``, comma separated):
  peak  8192^3 matrix products (fp16, bf16, fp8) through PyTorch: the card's measured ceiling.
  base  BERT-base with bert-base-chinese's shape (vocab 21128, 12 x 768, FFN 3072), random
        weights, S=128, B=256, every row full: Hugging Face BertModel with SDPA in fp16 vs ours
        (fp16, bf16, fp8; kernel variants); seq/s and effective TFLOP/s; cosine to HF fp32.
  mix   real length mixes: STS-B sentences, and long documents (joined STS-B sentences, 16 to
        512 tokens): sentence-transformers fp16 (batch 32 and 128) vs ours, real tokens/s, with
        our tokenization counted; all-MiniLM-L6-v2 (real weights) and a BERT-base-shaped model.
Times are medians of CUDA-event-timed runs after warm-up (``triton.testing.do_bench``);
``embed`` numbers are wall-clock host-to-host (numpy ids in, numpy vectors out).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_gpu")


def bench_ms(fn, warmup_ms: float = 200, rep_ms: float = 1500) -> float:
    """Median milliseconds of ``fn()`` (device time, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def wall_ms(fn, reps: int = 5) -> float:
    """Median wall-clock milliseconds of ``fn()`` including host work (synchronized)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


# --- peak ------------------------------------------------------------------------------------


@contextmanager
def clock_trace(into: dict):
    """The SM clock, power draw and throttle reasons while the block runs (``nvidia-smi`` every 200 ms;
    nothing without it): the medians under load, next to the card's maximum clock and power limit, say
    whether the matmul peak measured is the card's clock-limited one. GPU 0 only, the one benchmarked."""
    if not shutil.which("nvidia-smi"):
        yield
        return
    q = "clocks.sm,clocks.max.sm,power.draw,power.limit,utilization.gpu,clocks_event_reasons.active"
    proc = subprocess.Popen(
        ["nvidia-smi", "-i", "0", f"--query-gpu={q}", "--format=csv,noheader,nounits", "-lms", "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield
    finally:
        proc.terminate()
        rows = []
        for line in proc.communicate()[0].splitlines():
            f = [x.strip() for x in line.split(",")]
            try:
                if len(f) == 6 and int(f[4]) >= 90:  # samples while the GPU is busy
                    rows.append((float(f[0]), float(f[1]), float(f[2]), float(f[3]), f[5]))
            except ValueError:
                continue
        if rows:
            med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
            reasons = sorted({r[4] for r in rows})
            into["clocks"] = {
                "busy_samples": len(rows),
                "sm_mhz": med(0),
                "max_sm_mhz": med(1),
                "power_w": med(2),
                "power_limit_w": med(3),
                "throttle_reasons": reasons,
            }
            print("clocks under load:", into["clocks"], flush=True)


def section_peak(res: dict) -> None:
    with clock_trace(res):
        _section_peak(res)


def _section_peak(res: dict) -> None:
    n = 8192
    flops = 2 * n**3
    out = {}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device="cuda", dtype=dt), torch.randn(n, n, device="cuda", dtype=dt)
        out[name] = flops / bench_ms(lambda: torch.mm(a, b)) / 1e9
    if torch.cuda.get_device_capability() >= (8, 9):
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda")
        out["fp8"] = (
            flops
            / bench_ms(
                lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)
            )
            / 1e9
        )
    res["peak_tflops"] = out
    print("matmul 8192^3 TFLOP/s:", {k: round(v, 1) for k, v in out.items()}, flush=True)
    # the BERT-base GEMMs of section base (M = 256 x 128 tokens), fp16 and fp8 (tensor-wise, row-wise)
    shapes = {}
    M = 256 * 128
    for name, (N, K) in {"qkv": (2304, 768), "out": (768, 768), "ffn1": (3072, 768), "ffn2": (768, 3072)}.items():
        f = 2 * M * N * K
        a, w = (
            torch.randn(M, K, device="cuda", dtype=torch.float16),
            torch.randn(N, K, device="cuda", dtype=torch.float16),
        )
        r = {"fp16": f / bench_ms(lambda: torch.mm(a, w.t())) / 1e9}
        if torch.cuda.get_device_capability() >= (8, 9):
            aq, wq = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            one = torch.ones((), device="cuda")
            sa, sw = torch.rand(M, 1, device="cuda") + 0.5, torch.rand(1, N, device="cuda") + 0.5
            for label, kw in (
                ("fp8_tensor", dict(scale_a=one, scale_b=one)),
                ("fp8_row", dict(scale_a=sa, scale_b=sw)),
                ("fp8_row_noacc", dict(scale_a=sa, scale_b=sw, use_fast_accum=False)),
            ):
                kw.setdefault("use_fast_accum", True)
                try:
                    r[label] = f / bench_ms(lambda: torch._scaled_mm(aq, wq.t(), out_dtype=torch.bfloat16, **kw)) / 1e9
                except RuntimeError as e:
                    r[label] = repr(e)[:120]
        shapes[f"{name} {M}x{N}x{K}"] = r
        print(
            f"GEMM {name} {M}x{N}x{K} TFLOP/s:",
            {k: (round(v) if isinstance(v, float) else v) for k, v in r.items()},
            flush=True,
        )
    res["gemm_tflops"] = shapes
    # a floor for any fp16 BERT-base forward that uses cuBLAS: its 12 layers' four GEMMs at the rates just
    # measured, nothing else (no attention, LayerNorm, embeddings, launches)
    ms = 12 * sum(2 * M * int(k.split("x")[1]) * int(k.split("x")[2]) / (r["fp16"] * 1e9) for k, r in shapes.items())
    res["gemm_floor_ms"] = ms
    print(f"BERT-base S=128 B=256: the fp16 GEMMs alone take {ms:.2f} ms a forward at these rates", flush=True)


# --- models ----------------------------------------------------------------------------------


def random_bert(vocab: int, seed: int = 0, config: Path | None = None):
    """A BERT-base-shaped HF BertModel (or the shape of ``config``, a config.json) with HF's random
    init (std 0.02), fp32 on the CPU."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = (
        BertConfig.from_json_file(str(config))
        if config
        else BertConfig(
            vocab_size=vocab,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
        )
    )
    try:
        model = BertModel._from_config(cfg, attn_implementation="sdpa")
    except (AttributeError, TypeError, ValueError):
        model = BertModel(cfg)
    return model.eval()


def canonical(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items() if "position_ids" not in k}


def base_flops_per_seq(S: int, H: int = 768, I: int = 3072, L: int = 12) -> float:
    """Matmul FLOPs of one sequence: QKV/out/FFN GEMMs plus the two attention products."""
    return L * (2 * S * (4 * H * H + 2 * H * I) + 4 * S * S * H)


def profile_top(fn, n: int = 14) -> str:
    """The n kernels with the most device time over 3 calls of ``fn`` (a table)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def parse_variant(v: str) -> tuple[str, dict]:
    """'fp16:residual_in_gemm=1,kernels=cuda' -> ('fp16', {...}); '+' stands for ',' inside a value."""
    precision, _, rest = v.partition(":")
    opts = dict(kv.split("=") for kv in rest.split(",") if kv) if rest else {}
    flags = ("gelu_epilogue", "cuda_graphs", "fp8_fast_accum", "residual_in_gemm")
    return precision, {
        k: (val == "1" if k in flags else float(val) if k == "fp8_smooth" else val.replace("+", ","))
        for k, val in opts.items()
    }


def section_base(res: dict, variants: list[str], profile: bool = False) -> None:
    from engine.checkpoint import BertShape
    from engine.torch_gpu import GpuBertEngine, GpuOptions

    B, S = 256, 128
    hf32 = random_bert(21128)
    weights = canonical(hf32)
    shape = BertShape(
        vocab_size=21128, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_position=512
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 21128, (B, S), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    flops = base_flops_per_seq(S)
    out: dict = {"B": B, "S": S, "gflop_per_seq": flops / 1e9}

    hf16 = random_bert(21128).half().cuda()
    out["hf_attn_implementation"] = getattr(hf16.config, "_attn_implementation", "?")
    ids_d, mask_d = ids.cuda(), torch.ones(B, S, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        ms = bench_ms(lambda: hf16(input_ids=ids_d, attention_mask=mask_d))
    out["hf_sdpa_fp16"] = {"ms": ms, "seq_s": B / ms * 1e3, "tflops": flops * B / ms / 1e9}
    print(
        f"HF BertModel SDPA fp16: {ms:.2f} ms, {B / ms * 1e3:,.0f} seq/s, {flops * B / ms / 1e9:.0f} TFLOP/s",
        flush=True,
    )
    if "gemm_floor_ms" in res:  # what 1.5x HF leaves for everything but the GEMMs
        out["ms_for_1_5x_hf"] = ms / 1.5
        out["ms_left_beside_gemms"] = ms / 1.5 - res["gemm_floor_ms"]
        print(
            f"1.5x HF is {ms / 1.5:.2f} ms a forward: {ms / 1.5 - res['gemm_floor_ms']:.2f} ms beside the GEMMs "
            "for attention, LayerNorms, embeddings and pooling",
            flush=True,
        )
    hf16 = None
    # the oracle for cosines: HF fp32 (TF32 off), mean pooling, the first 64 rows
    torch.backends.cuda.matmul.allow_tf32 = False
    hf32 = hf32.cuda()
    with torch.inference_mode():
        h = hf32(input_ids=ids_d[:64], attention_mask=mask_d[:64]).last_hidden_state.double().mean(1).cpu().numpy()
    del hf32
    torch.cuda.empty_cache()

    packed = ids.numpy().astype(np.int32).reshape(-1)
    lens = np.full(B, S, dtype=np.int32)
    for v in variants:
        precision, opts = parse_variant(v)
        try:
            build = functools.partial(
                GpuBertEngine,
                shape,
                weights,
                pooling="mean",
                normalize=False,
                max_seq_len=512,
                precision=precision,
                device="cuda",
                calibration=(packed[: 16 * S], lens[:16]),
            )
            eng = build(options=GpuOptions(**opts))
            run = eng.prepare(packed, lens)
            if profile:
                eager = build(options=GpuOptions(**{**opts, "cuda_graphs": False}))
                table = profile_top(eager.prepare(packed, lens))
                print(f"--- profile {v} (eager, 3 forwards) ---\n{table}", flush=True)
                out.setdefault("profiles", {})[v] = table
                del eager
            ms = bench_ms(run)
            emb_ms = wall_ms(lambda: eng.embed(packed, lens))
            got = eng.embed(packed[: 64 * S], lens[:64])
            cos = cosines(got.astype(np.float64), h)
        except Exception as e:  # noqa: BLE001 - a benchmark variant that fails is reported, not fatal
            logger.exception("variant %s failed", v)
            out[v] = {"error": repr(e)}
            continue
        r = {
            "ms": ms,
            "seq_s": B / ms * 1e3,
            "tflops": flops * B / ms / 1e9,
            "embed_ms": emb_ms,
            "embed_seq_s": B / emb_ms * 1e3,
            "min_cos_vs_hf_fp32": float(cos.min()),
            "kernels": eng.kernels.name,
        }
        r["x_hf"] = r["seq_s"] / out["hf_sdpa_fp16"]["seq_s"]
        out[v] = r
        print(
            f"ours {v:28s} [{eng.kernels.name}]: {ms:.2f} ms, {r['seq_s']:,.0f} seq/s ({r['x_hf']:.2f}x HF), "
            f"{r['tflops']:.0f} TFLOP/s; embed() {emb_ms:.2f} ms; min cos {cos.min():.6f}",
            flush=True,
        )
        eng = run = None
        torch.cuda.empty_cache()
    peak = res.get("peak_tflops", {}).get("fp16")
    if peak:
        for v in variants:
            if "tflops" in out.get(v, {}):
                out[v]["frac_fp16_peak"] = out[v]["tflops"] / peak
    res["base"] = out


# --- real length mixes -----------------------------------------------------------------------


def stsb_sentences(data: Path) -> list[str]:
    texts = []
    for name in ("stsb-en-train.csv", "stsb-en-dev.csv", "stsb-en-test.csv"):
        p = data / name
        if p.exists():
            with open(p, encoding="utf-8", newline="") as f:
                texts += [t for row in csv.reader(f) for t in row[:2]]
    if not texts:
        raise SystemExit(f"no stsb-en-*.csv under {data}")
    return texts


def long_mix(sentences: list[str], tok, n_docs: int, seed: int = 0) -> list[str]:
    """Documents of consecutive sentences joined until a target length, uniform in 16..512 tokens."""
    rng = np.random.default_rng(seed)
    lens = tok.encode(sentences).lengths - 2
    docs, i = [], 0
    for _ in range(n_docs):
        target, parts, n = int(rng.integers(16, 513)), [], 2
        while n < target:
            parts.append(sentences[i % len(sentences)])
            n += int(lens[i % len(sentences)])
            i += 1
        docs.append(" ".join(parts))
    return docs


def st_encode(model_dir: Path, texts: list[str], dtype: torch.dtype, batch: int, max_len: int):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cuda")
    st.max_seq_length = max_len
    st = st.to(dtype)

    def run():
        return st.encode(texts, batch_size=batch, convert_to_numpy=True, show_progress_bar=False)

    run()
    return wall_ms(run, reps=3), run()


def section_mix(res: dict, minilm: Path, data: Path, variants: list[str], work: Path) -> None:
    from core.config import EngineSpec
    from engine.build import build_model
    from engine.model_dir import load_tokenizer, read_meta
    from engine.torch_gpu import load_gpu_engine

    precisions = sorted({parse_variant(v)[0] for v in variants})

    sentences = stsb_sentences(data)
    models = {"all-MiniLM-L6-v2": minilm}
    base_dir = work / "bert_base_random"  # BERT-base shape, vocab 30522
    if not base_dir.exists():
        m = random_bert(30522, seed=2)
        m.save_pretrained(base_dir, safe_serialization=True)
        for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (minilm / f).exists():
                shutil.copy(minilm / f, base_dir / f)
    models["bert-base (random, vocab 30522)"] = base_dir
    out: dict = {}
    for mname, mdir in models.items():
        folders = {
            p: build_model(
                EngineSpec(model=str(mdir), target="gpu", precision=p, max_seq_len=512, pooling="mean"),
                work / f"{mdir.name}_{p}",
            )
            for p in precisions
        }
        tok = load_tokenizer(folders[precisions[0]])
        mixes = {"stsb": sentences, "long": long_mix(sentences, tok, 2000)}
        for xname, texts in mixes.items():
            key = f"{mname} / {xname}"
            enc = tok.encode(texts)
            n_tok = int(enc.lengths.sum())
            r: dict = {
                "docs": len(texts),
                "tokens": n_tok,
                "mean_len": n_tok / len(texts),
                "max_len": int(enc.lengths.max()),
            }
            st_vecs = None
            for bs in (32, 128):
                ms, vecs = st_encode(mdir, texts, torch.float16, bs, 512)
                r[f"st_fp16_bs{bs}"] = {"ms": ms, "tok_s": n_tok / ms * 1e3}
                st_vecs = vecs if st_vecs is None else st_vecs
            best_st = max(r[f"st_fp16_bs{bs}"]["tok_s"] for bs in (32, 128))
            if mname.startswith("all-MiniLM"):
                _, st32 = st_encode(mdir, texts, torch.float32, 128, 512)
            else:
                st32 = None
            for v in variants:
                p, opts = parse_variant(v)
                try:
                    eng = load_gpu_engine(folders[p], read_meta(folders[p]), device="cuda", **opts)
                    t_tok = wall_ms(lambda: tok.encode(texts), reps=3)
                    ms = wall_ms(lambda: eng.embed(enc.token_ids, enc.lengths), reps=3)  # warm: graphs captured
                    vecs = eng.embed(enc.token_ids, enc.lengths)
                except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
                    logger.exception("mix variant %s failed", v)
                    r[f"ours {v}"] = {"error": repr(e)}
                    continue
                rr = {
                    "embed_ms": ms,
                    "tokenize_ms": t_tok,
                    "tok_s": n_tok / ms * 1e3,
                    "tok_s_with_tokenize": n_tok / (ms + t_tok) * 1e3,
                    "min_cos_vs_st_fp16": float(cosines(vecs, st_vecs).min()),
                    "graphs": len(eng._graphs),
                }
                if st32 is not None:
                    rr["min_cos_vs_st_fp32"] = float(cosines(vecs, st32).min())
                rr["x_st_best"] = rr["tok_s_with_tokenize"] / best_st
                r[f"ours {v}"] = rr
                print(
                    f"{key:45s} ours {v}: {rr['tok_s']:,.0f} tok/s engine, {rr['tok_s_with_tokenize']:,.0f} with "
                    f"tokenize ({rr['x_st_best']:.2f}x best ST fp16 {best_st:,.0f}); min cos vs ST "
                    f"{rr['min_cos_vs_st_fp16']:.5f}"
                    + (f" / fp32 {rr['min_cos_vs_st_fp32']:.5f}" if st32 is not None else ""),
                    flush=True,
                )
                eng = None
                torch.cuda.empty_cache()
            out[key] = r
    res["mix"] = out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="all-MiniLM-L6-v2 folder (HF + sentence-transformers)")
    ap.add_argument("--data", required=True, type=Path, help="folder with stsb-en-*.csv (stsb_multi_mt)")
    ap.add_argument("--out", type=Path, default=Path("bench_gpu.json"), help="results JSON")
    ap.add_argument("--sections", default="peak,base,mix", help="peak,base,mix")
    ap.add_argument(
        "--base-variants",
        default="fp16;fp16:gelu_epilogue=0;fp16:residual_in_gemm=1;fp16:kernels=cuda,residual_in_gemm=1;bf16;fp8",
        help="our variants for section base, ';'-separated: precision[:option=value,...] "
        "(GpuOptions fields; '+' for ',' inside a value)",
    )
    ap.add_argument("--mix-variants", default="fp16;bf16;fp8", help="our variants for section mix (same form)")
    ap.add_argument("--profile", action="store_true", help="print each base variant's top kernels (eager)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sections = set(args.sections.split(","))
    res: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    try:
        import sentence_transformers
        import transformers
        import triton

        res["versions"] = {
            "transformers": transformers.__version__,
            "triton": triton.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        }
    except ImportError:
        pass
    print(res, flush=True)
    work = Path(tempfile.mkdtemp(prefix="fbas_bench_gpu_"))
    try:
        if "peak" in sections:
            section_peak(res)
        if "base" in sections:
            section_base(res, args.base_variants.split(";"), args.profile)
        if "mix" in sections:
            section_mix(res, args.model, args.data, args.mix_variants.split(";"), work)
    finally:
        args.out.write_text(json.dumps(res, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
