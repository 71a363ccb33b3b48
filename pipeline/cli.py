"""`fbas-pipeline`: the command line. Flags are built from the config fields (pipeline/config.py).

Every flag can also be given as ``FBAS_<FIELD>`` in the environment; the flag wins. Heavy
modules are imported inside each command so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import FbasConfig, apply_env, set_field
from pipeline.envs import env_name, read_env
from pipeline.errors import FbasError

logger = logging.getLogger("fbas")

def _add_section_flags(p: argparse.ArgumentParser, cfg: FbasConfig, section_name: str,
                       skip: Sequence[str] = ()) -> None:
    section = getattr(cfg, section_name)
    group = p.add_argument_group(f"{section_name} options")
    for f in dataclasses.fields(section):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(section, f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {default}; env {env_name(f.name)})"
        kwargs: dict[str, Any] = {"dest": f"{section_name}.{f.name}", "default": argparse.SUPPRESS,
                                  "help": help_text.replace("%", "%%")}
        if "bool" in str(f.type):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        group.add_argument(flag, **kwargs)


def _config_from_args(ns: argparse.Namespace) -> FbasConfig:
    cfg = apply_env(FbasConfig(), read_env())
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            set_field(getattr(cfg, section), name, value)
    return cfg.validate()


def build_parser() -> argparse.ArgumentParser:
    cfg = FbasConfig()
    parser = argparse.ArgumentParser(
        prog="fbas-pipeline",
        description="faster-bert-as-service: turn a text corpus into BERT embeddings and a searchable index.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quick start:\n  fbas-pipeline build --out models/minilm\n"
               "  fbas-pipeline embed --model-dir models/minilm texts.txt --out vectors.npy\n"
               "  fbas-pipeline ingest corpus.parquet --out out/\n"
               "  fbas-pipeline search out/ \"a question\" -k 10")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("build", help="turn a checkpoint into a built model folder (ONNX fp32/int8, or GPU)",
                       description="Build an engine from a Hugging Face or Google TF BERT checkpoint into a model "
                                   "folder that `embed`, `serve` and `ingest` load.")
    _add_section_flags(p, cfg, "engine")
    p.add_argument("--out", required=True, help="model folder to write (replaced if it is a built model folder)")
    p.add_argument("--fusions", default="all",
                   help="ONNX Runtime fused ops to use: all | none | comma list of embed_layernorm, attention, "
                        "skip_layernorm, bias_gelu (default: all, the fastest measured on CPU; see BENCHMARKS.md)")
    p.add_argument("--calibration", default=None,
                   help="int8: text file (one text per line) of real text from your corpus to calibrate on "
                        "(default: a bundled English + Chinese sample)")
    p.add_argument("--calibration-size", type=int, default=256, help="int8: texts used for calibration")
    p.add_argument("--int8-target", type=float, default=0.995,
                   help="int8: min cosine to fp32 the calibration sample must reach; more sensitive layers stay "
                        "in float until it does")
    _add_section_flags(p, cfg, "runtime", skip=("token_budget", "max_batch_size"))
    p.add_argument("--model-repository", dest="serve.model_repository", default=argparse.SUPPRESS,
                   help="also write the Triton model repository entry (config.pbtxt + model.py) here "
                        f"(env {env_name('model_repository')}; default: none)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("embed", help="embed texts in-process with a built model folder (no server)",
                       description="Embed a text file (one text per line), a Parquet file or JSONL with a text "
                                   "column, in input order, into a float32 .npy of shape [n, dim].")
    p.add_argument("input", help="texts: .txt (one per line), .parquet or .jsonl")
    p.add_argument("--model-dir", required=True, help="built model folder (from `fbas-pipeline build`)")
    p.add_argument("--out", required=True, help="output .npy file, float32 [n, dim]")
    p.add_argument("--text-column", default="text", help="column holding the text in Parquet/JSONL (default: text)")
    _add_section_flags(p, cfg, "runtime")
    p.set_defaults(func=_cmd_embed)

    _add_late_commands(sub, cfg)
    return parser


def _add_late_commands(sub, cfg: FbasConfig) -> None:
    """Commands whose implementation lives in other modules, registered if those modules exist."""
    import importlib

    for mod_name in ("pipeline.serve", "pipeline.commands"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            if e.name != mod_name:
                raise
            continue
        register: Callable | None = getattr(mod, "register_commands", None)
        if register:
            register(sub, cfg, _add_section_flags)


def _cmd_build(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from engine.build import build_model
    from pipeline.progress import progress_bar

    with progress_bar(total=None, desc="calibrating int8 (layers)", unit="layer",
                      disable=cfg.engine.precision != "int8") as bar:
        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out = build_model(cfg.engine, args.out, fusions=args.fusions, threads=cfg.runtime.threads,
                          calibration=args.calibration, calibration_size=args.calibration_size,
                          int8_target=args.int8_target, progress=report)
    from engine.model_dir import read_meta

    meta = read_meta(out)
    print(f"built {meta.name} -> {out} (target {meta.target}, {meta.precision}, dim {meta.dim}, pooling "
          f"{meta.pooling}, normalize {meta.normalize}, max_seq_len {meta.max_seq_len}, fingerprint {meta.fingerprint})")
    if "serve.model_repository" in vars(args):
        from pipeline.serve import write_model_repository

        entry = write_model_repository(out, cfg.serve.model_repository, cfg)
        print(f"wrote the Triton model repository entry {entry}")
    return 0


def _cmd_embed(args: argparse.Namespace, cfg: FbasConfig) -> int:
    from pipeline.embed_file import embed_file

    n, dim = embed_file(args.input, args.model_dir, args.out, cfg.runtime, text_column=args.text_column)
    print(f"wrote {n} x {dim} float32 embeddings to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        cfg = _config_from_args(args)
        return int(args.func(args, cfg) or 0)
    except FbasError as e:
        print(f"fbas-pipeline {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fbas-pipeline {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
