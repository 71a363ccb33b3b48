"""The Triton client the workers use: a drop-in ``Engine`` whose ``embed`` runs on a Triton server.

    enc = TritonEncoder(ClientOptions(url="127.0.0.1:8001"))   # gRPC (default) or protocol="http"
    enc.wait_ready()                                            # server live + model ready, limits read
    vectors = enc.embed(token_ids, lengths)                     # float32 [B, dim]

What it guarantees:

* Readiness: the first call waits for server and model readiness (``ready_timeout``), then
  reads the model's limits (dim, max_seq_len, vocab_size, documents/tokens per request) from
  its config.
* Binary outputs without copies: gRPC responses arrive as bytes (no protobuf deserializer)
  and ``workers.triton_wire`` views ``raw_output_contents`` with ``np.frombuffer``; HTTP uses
  the binary-tensor extension the same way. FP32 results are read-only views of the response;
  FP16 results are converted to a new float32 array.
* Optional system shared memory (gRPC, same host): inputs and outputs go through a registered
  ``/dev/shm`` region instead of the socket; the region is registered again after a restart.
* Retries: UNAVAILABLE / DEADLINE_EXCEEDED / NOT_FOUND (a shutting-down server unloads the
  model first) and INTERNAL are retried with exponential
  backoff and jitter, at most ``max_retries`` times and ``retry_budget`` seconds per request,
  then raised as ``ServerUnavailableError`` / ``TransientError``. INVALID_ARGUMENT is never
  retried as is: an oversized request is split in halves, bad rows raise ``BadRowsError``
  naming them, anything else raises ``InvalidRequestError``.
* Errors: only this module sees ``grpc.RpcError``; it raises ``core.errors`` types ``from None``.
  A missing or malformed output raises ``ResponseFormatError``, never returns None.

One ``TritonEncoder`` may be shared by threads (gRPC channels are thread-safe; the HTTP path
keeps one connection per thread; the shared-memory path serializes calls on its region).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import numpy as np

from core.errors import InvalidRequestError, PermanentError, ServerUnavailableError, TransientError
from workers.triton_transport import (
    OUTPUT,
    BadRowsError,
    ClientOptions,
    ClientStats,
    ModelInfo,
    RequestTooLargeError,
    _GrpcTransport,
    _HttpTransport,
)
from workers.triton_wire import (
    ResponseFormatError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ClientOptions",
    "ModelInfo",
    "ClientStats",
    "TritonEncoder",
    "BadRowsError",
    "RequestTooLargeError",
    "ResponseFormatError",
    "find_bad_rows",
    "plan_chunks",
]


def find_bad_rows(token_ids: np.ndarray, lengths: np.ndarray, max_seq_len: int, vocab_size: int) -> list[int]:
    """Rows whose length is outside 1..max_seq_len or whose token ids are outside 0..vocab_size-1."""
    bad = (lengths < 1) | (lengths > max_seq_len)
    if int(lengths.sum(dtype=np.int64)) == token_ids.size and not bad.any():
        bad_tok = (token_ids < 0) | (token_ids >= vocab_size)
        if bad_tok.any():
            bad |= np.bincount(np.repeat(np.arange(lengths.size), lengths)[bad_tok], minlength=lengths.size) > 0
    return np.flatnonzero(bad).tolist()


def plan_chunks(lengths: np.ndarray, max_docs: int, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive document ranges [start, end) with at most ``max_docs`` documents and ``max_tokens`` tokens."""
    n = lengths.size
    if n <= max_docs and int(lengths.sum(dtype=np.int64)) <= max_tokens:
        return [(0, n)]
    cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    chunks, start = [], 0
    while start < n:
        end = int(np.searchsorted(cum, cum[start] + max_tokens, side="right")) - 1
        end = max(start + 1, min(end, start + max_docs, n))
        chunks.append((start, end))
        start = end
    return chunks


class TritonEncoder:
    """``embed(token_ids, lengths) -> float32 [B, dim]`` through Triton (see the module docstring)."""

    def __init__(self, options: ClientOptions | None = None, **kw: Any) -> None:
        self.options = options or ClientOptions(**kw)
        if self.options.protocol not in ("grpc", "http"):
            raise PermanentError(f"protocol {self.options.protocol!r} is not grpc or http")
        if self.options.shared_memory and self.options.protocol != "grpc":
            raise PermanentError("shared_memory needs protocol grpc")
        self.stats = ClientStats()
        self._info: ModelInfo | None = None
        self._info_lock = threading.Lock()
        self._transport = (_GrpcTransport if self.options.protocol == "grpc" else _HttpTransport)(self.options)

    # -- the Engine protocol
    @property
    def info(self) -> ModelInfo:
        """The model's limits; the first access waits for readiness."""
        if self._info is None:
            self.wait_ready()
        return self._info  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def max_seq_len(self) -> int:
        return self.info.max_seq_len

    @property
    def precision(self) -> str:
        return self.info.precision

    def wait_ready(self, timeout: float | None = None) -> ModelInfo:
        """Poll server liveness/readiness and model readiness (backoff up to 1 s), then read the model's config."""
        timeout = self.options.ready_timeout if timeout is None else timeout
        deadline, delay, last = time.monotonic() + timeout, 0.05, "no answer yet"
        while True:
            try:
                if self._transport.ready():
                    break
                last = f"model {self.options.model_name!r} not ready"
            except TransientError as e:
                last = str(e)
            if time.monotonic() + delay > deadline:
                raise ServerUnavailableError(
                    f"Triton at {self.options.url} not ready after {timeout:.0f}s ({last}): "
                    "start it (`fbas-pipeline serve`) or check --triton"
                )
            time.sleep(delay)
            delay = min(1.0, delay * 2)
        with self._info_lock:
            self._info = self._read_info(self._transport.model_config())
            self._transport.setup(self._info, self.stats)
        logger.info(
            "Triton model %s ready at %s: dim %d, %s output, <= %d docs / %d tokens per request",
            self.options.model_name,
            self.options.url,
            self._info.dim,
            self._info.output_dtype,
            self._info.max_docs,
            self._info.max_tokens,
        )
        return self._info

    def _read_info(self, cfg: dict) -> ModelInfo:
        params = cfg.get("parameters", {})

        def p(key: str) -> str:
            if key not in params:
                raise ResponseFormatError(
                    f"model {self.options.model_name!r} has no parameter {key!r} in its "
                    "config.pbtxt: it was not written by fbas (rebuild the repository)"
                )
            return params[key]

        outs = [o for o in cfg.get("output", []) if o.get("name") == OUTPUT]
        if not outs:
            raise ResponseFormatError(f"model {self.options.model_name!r} has no output {OUTPUT!r}")
        o = self.options
        return ModelInfo(
            dim=int(p("dim")),
            max_seq_len=int(p("max_seq_len")),
            vocab_size=int(p("vocab_size")),
            output_dtype=outs[0]["data_type"].replace("TYPE_", ""),
            max_docs=o.max_docs_per_request or int(p("max_docs_per_request")),
            max_tokens=o.max_tokens_per_request or int(p("max_tokens_per_request")),
            precision=params.get("precision", "fp32"),
            fingerprint=params.get("fingerprint", ""),
        )

    def embed(self, token_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Packed token ids int32 [T] + lengths int32 [B] -> embeddings float32 [B, dim] (one row per document).

        Inputs larger than the model's per-request limits go out as several requests. When one
        request suffices and the output is FP32, the result is a read-only view of the response
        bytes (copy it to write into it). Raises ``BadRowsError`` (rows named), ``InvalidRequestError``,
        ``ServerUnavailableError`` / ``TransientError`` after the bounded retries, ``ResponseFormatError``.
        """
        ids = np.ascontiguousarray(token_ids, dtype=np.int32).reshape(-1)
        lens = np.ascontiguousarray(lengths, dtype=np.int32).reshape(-1)
        info = self.info
        if int(lens.sum(dtype=np.int64)) != ids.size:
            raise InvalidRequestError(
                f"sum(lengths)={int(lens.sum(dtype=np.int64))} does not match the {ids.size} token ids"
            )
        if lens.size == 0:
            return np.empty((0, info.dim), dtype=np.float32)
        if self.options.validate:
            bad = find_bad_rows(ids, lens, info.max_seq_len, info.vocab_size)
            if bad:
                raise BadRowsError(
                    f"{len(bad)} of {lens.size} documents are invalid (rows {bad[:20]}): lengths must "
                    f"be in 1..{info.max_seq_len}, token ids in 0..{info.vocab_size - 1}",
                    bad,
                )
        offsets = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
        parts = [
            self._embed_chunk(ids[offsets[s] : offsets[e]], lens[s:e], s)
            for s, e in plan_chunks(lens, info.max_docs, info.max_tokens)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _embed_chunk(self, ids: np.ndarray, lens: np.ndarray, row0: int) -> np.ndarray:
        """One request with retries; split in halves when the server says it is too large."""
        o = self.options
        start, attempt, delay = time.monotonic(), 0, o.backoff
        while True:
            try:
                self.stats.add(requests=1)
                out = self._transport.infer(ids, lens)
                return out if out.dtype == np.float32 else out.astype(np.float32)
            except RequestTooLargeError as e:
                if lens.size < 2:
                    raise RequestTooLargeError(f"a single document of {ids.size} tokens is too large: {e}") from None
                half = lens.size // 2
                cut = int(lens[:half].sum(dtype=np.int64))
                self.stats.add(splits=1)
                logger.info("request of %d docs / %d tokens too large (%s): splitting", lens.size, ids.size, e)
                return np.concatenate(
                    [
                        self._embed_chunk(ids[:cut], lens[:half], row0),
                        self._embed_chunk(ids[cut:], lens[half:], row0 + half),
                    ]
                )
            except BadRowsError as e:
                rows = [row0 + r for r in e.rows]
                raise BadRowsError(f"Triton rejected {len(rows)} documents (rows {rows[:20]}): {e}", rows) from None
            except TransientError as e:
                attempt += 1
                spent = time.monotonic() - start
                if attempt > o.max_retries or spent + delay > o.retry_budget:
                    kind = type(e) if isinstance(e, ServerUnavailableError) else TransientError
                    raise kind(f"Triton request failed after {attempt} attempts over {spent:.1f}s: {e}") from None
                self.stats.add(retries=1)
                logger.warning("Triton request failed (%s); retry %d/%d in %.2fs", e, attempt, o.max_retries, delay)
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(o.max_backoff, delay * 2)

    def model_statistics(self) -> dict:
        """Triton's statistics of this model: inference_count, execution_count, and the duration totals (ns)."""
        return self._transport.statistics()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> TritonEncoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# transports: the only code that sees grpc / http.client errors
