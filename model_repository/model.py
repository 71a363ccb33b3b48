"""Triton Python-backend model: a built fbas engine behind Triton's dynamic batcher.

Copied by ``services.repository.write_model_repository`` into ``REPO/<model>/1/model.py`` next to
the built model folder ``REPO/<model>/1/engine/`` (see ``model_repository/README.md``).

Wire contract (one request = one group of documents, no padding anywhere):

    token_ids  INT32 [1, T]     every document's ids back to back, [CLS] ... [SEP]
    lengths    INT32 [1, B]     tokens per document, sum(lengths) == T
    embedding  FP32|FP16 [1, B, dim]   one pooled (optionally normalized) row per document

Both inputs are ragged (``allow_ragged_batch``), so requests with different T and B are
batched together; Triton's batch dimension counts requests. ``execute`` validates every
request on its own, concatenates the valid ones, runs the engine once, and splits the rows
back per request. A bad request gets its own ``INVALID_ARG`` error, never failing the others.
Two counters on Triton's metrics endpoint say where an instance's time goes (``fbas_model_execute_seconds_total``:
inside ``execute``; ``fbas_engine_embed_seconds_total``: inside the engine's ``embed``, a part of it): Triton's
own ``compute_infer`` less the first is the stub's hand-over, the first less the second this file's Python.
Error messages carry a machine-readable tag that ``workers.triton_client`` reads:

    [fbas:oversize]          the request exceeds max_docs_per_request / max_tokens_per_request
    [fbas:bad_rows=3,17]     those document rows are invalid (length, token id range)
    [fbas:bad_request]       the request as a whole is malformed (shapes, sum of lengths)
"""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

OUTPUT_NAME = "embedding"
_NP_OUT = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}


class RequestRejected(Exception):
    """A request is invalid; ``str(self)`` is the message sent back (starts with its tag)."""


def as_numpy(tensor) -> np.ndarray:
    """A ``pb_utils.Tensor`` as a NumPy array, through DLPack (no copy).

    Not ``Tensor.as_numpy()``: the stub's pybind11 was built for NumPy 1.x and, under NumPy 2,
    reads the dtype's item size from the wrong place, so ``as_numpy()`` returns an array with
    zero strides (every element equal to the first). DLPack does not go through that code.
    """
    return np.from_dlpack(tensor)


# DLPack's name for a consumed capsule; it must outlive every capsule renamed to it (PyCapsule_SetName
# keeps the pointer, not a copy), so it is a module constant.
_USED_DLTENSOR = b"used_dltensor"
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name.restype = ctypes.c_int


def output_tensor(name: str, array: np.ndarray):
    """A ``pb_utils.Tensor`` from a contiguous array, through DLPack (see ``as_numpy`` for why).

    The stub takes ownership of the capsule's tensor and renames the capsule ``used_dlpack``; NumPy's
    capsule destructor recognizes only DLPack's ``used_dltensor`` and otherwise writes a
    "PyCapsule_GetPointer called with incorrect name" traceback to the log, once per response. The
    capsule is renamed to the standard name after the hand-over, so it is freed silently (the tensor
    itself is released by the stub, through the DLPack deleter, as before)."""
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    _capsule_set_name(capsule, _USED_DLTENSOR)
    return tensor


def _param(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def check_request(token_ids: np.ndarray, lengths: np.ndarray, limits: dict) -> tuple[np.ndarray, np.ndarray]:
    """Validate one request's inputs; return them flattened (1-D int32) or raise ``RequestRejected``.

    ``limits``: max_docs, max_tokens, max_seq_len, vocab_size (documents, tokens, tokens, ids).
    """
    if token_ids.ndim != 2 or lengths.ndim != 2 or token_ids.shape[0] != 1 or lengths.shape[0] != 1:
        raise RequestRejected(
            f"[fbas:bad_request] token_ids and lengths must have shape [1, n] "
            f"(got {list(token_ids.shape)} and {list(lengths.shape)})"
        )
    ids, lens = token_ids[0], lengths[0]
    n_docs, n_tok = lens.size, ids.size
    if n_docs == 0:
        raise RequestRejected("[fbas:bad_request] the request has no documents (lengths is empty)")
    if n_docs > limits["max_docs"] or n_tok > limits["max_tokens"]:
        raise RequestRejected(
            f"[fbas:oversize] {n_docs} documents / {n_tok} tokens exceed this model's limits of "
            f"{limits['max_docs']} documents / {limits['max_tokens']} tokens per request: "
            "split the request"
        )
    bad_len = np.flatnonzero((lens < 1) | (lens > limits["max_seq_len"]))
    if bad_len.size:
        rows = ",".join(map(str, bad_len[:64].tolist()))
        raise RequestRejected(
            f"[fbas:bad_rows={rows}] document lengths must be in 1..{limits['max_seq_len']} "
            f"tokens (truncate before sending)"
        )
    total = int(lens.sum(dtype=np.int64))
    if total != n_tok:
        raise RequestRejected(f"[fbas:bad_request] sum(lengths)={total} does not match the {n_tok} token ids")
    bad_tok = (ids < 0) | (ids >= limits["vocab_size"])
    if bad_tok.any():
        doc_of_token = np.repeat(np.arange(n_docs), lens)
        rows = ",".join(map(str, np.unique(doc_of_token[bad_tok])[:64].tolist()))
        raise RequestRejected(f"[fbas:bad_rows={rows}] token ids must be in 0..{limits['vocab_size'] - 1}")
    return ids, lens


class _Timers:
    """The instance's time in ``execute`` and in the engine, as Triton custom metrics (counters, seconds);
    a stub without the metrics API counts nothing, and a failed count never fails a request."""

    def __init__(self, args: dict) -> None:
        family = getattr(pb_utils, "MetricFamily", None)
        self.metrics: list = []
        if family is None:
            return
        labels = {"model": args.get("model_name", ""), "version": str(args.get("model_version", ""))}
        labels["instance"] = args.get("model_instance_name", "")
        # the families must outlive their metrics (the stub deletes a metric's values with its family)
        self.families = [
            family(
                name="fbas_model_execute_seconds_total",
                description="seconds spent in the fbas model's execute (validation, engine, responses)",
                kind=family.COUNTER,
            ),
            family(
                name="fbas_engine_embed_seconds_total",
                description="seconds spent in the engine's embed (the model itself, host copies included)",
                kind=family.COUNTER,
            ),
            family(
                name="fbas_engine_graph_capture_seconds_total",
                description="seconds of embed spent capturing CUDA graphs for shapes seen the first time",
                kind=family.COUNTER,
            ),
        ]
        self.metrics = [f.Metric(labels=labels) for f in self.families]

    def add(self, execute_s: float, embed_s: float, capture_s: float = 0.0) -> None:
        try:
            for metric, value in zip(self.metrics, (execute_s, embed_s, capture_s)):
                metric.increment(value)
        except Exception as e:  # noqa: BLE001 - accounting only: the request's answer does not depend on it
            pb_utils.Logger.log_warn(f"fbas: the model's time counters stopped ({e!r})")
            self.metrics = []


def _test_load_delay() -> None:
    """Test hook: ``FBAS_TEST_LOAD_DELAY=SECONDS`` makes each instance's load that much slower, so a test can
    stop a local cluster while its model is still loading."""
    from core.envs import read_env

    delay = read_env().get("test_load_delay")
    if delay:
        time.sleep(float(delay))


class TritonPythonModel:
    """One instance per Triton model instance (``instance_group``); loads the engine once."""

    def initialize(self, args: dict) -> None:
        from engine.model_dir import load_engine, read_meta

        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        engine_dir = version_dir / _param(config, "engine_dir", "engine")
        meta = read_meta(engine_dir)
        out_cfg = pb_utils.get_output_config_by_name(config, OUTPUT_NAME)
        if out_cfg is None or out_cfg["data_type"] not in _NP_OUT:
            raise pb_utils.TritonModelException(
                f"config.pbtxt must declare output '{OUTPUT_NAME}' as TYPE_FP32 or TYPE_FP16"
            )
        self.out_dtype = _NP_OUT[out_cfg["data_type"]]
        self.dim = meta.dim
        self.limits = {
            "max_docs": int(_param(config, "max_docs_per_request", "1024")),
            "max_tokens": int(_param(config, "max_tokens_per_request", "262144")),
            "max_seq_len": meta.max_seq_len,
            "vocab_size": meta.vocab_size,
        }
        device = None
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        threads = int(_param(config, "threads", "0"))
        _test_load_delay()
        t0 = time.perf_counter()
        self.engine = load_engine(
            engine_dir, threads=threads, device=device, token_budget=int(_param(config, "token_budget", "2048"))
        )
        if getattr(self.engine, "dim", meta.dim) != meta.dim:
            raise pb_utils.TritonModelException(f"engine dim {self.engine.dim} != fbas_model.json dim {meta.dim}")
        t1 = time.perf_counter()
        self._warmup(meta, gpu=device is not None)
        t2 = time.perf_counter()
        self.timers = _Timers(args)
        self._captured = getattr(self.engine, "capture_s", 0.0)  # the warm-up's captures are the load's, not a job's
        # an engine that rounds to the output dtype itself (the GPU engine: on the device) is asked to
        self._embed_kw = (
            {"out_dtype": self.out_dtype} if "out_dtype" in inspect.signature(self.engine.embed).parameters else {}
        )
        # the split says where a slow start goes: the runtime's imports and weights, or the warm-up's
        # first kernels and CUDA graphs
        self.logger.log_info(
            f"fbas: loaded {meta.name} ({meta.target}/{meta.precision}, dim {meta.dim}, "
            f"fingerprint {meta.fingerprint}) from {engine_dir} on {device or 'cpu'} in "
            f"{t2 - t0:.2f}s (engine {t1 - t0:.2f}s, warm-up {t2 - t1:.2f}s), pid {os.getpid()}"
        )

    def _warmup(self, meta, gpu: bool = False) -> None:
        """Run a few documents of different lengths so the first real request is not slow.

        On a GPU the engine captures one CUDA graph per padded batch shape the first time it sees
        that shape, so a few representative batches are run too (one short document, many short
        ones, a medium batch, a few long documents); other shapes are still captured on demand.
        """
        batches = [[3, 17, 64, 128]]
        if gpu:
            batches += [[12], [24] * 16, [48] * 64, [meta.max_seq_len] * 8]
        rng = np.random.default_rng(0)
        low, high = min(1000, meta.vocab_size - 1), min(meta.vocab_size, 2000)
        for batch in batches:
            lengths = np.minimum(np.array(batch, dtype=np.int32), meta.max_seq_len)
            ids = rng.integers(low, high, size=int(lengths.sum()), dtype=np.int32)
            out = self.engine.embed(ids, lengths)
            if out.shape != (len(lengths), meta.dim) or not np.isfinite(out).all():
                raise pb_utils.TritonModelException(
                    f"warmup produced {out.shape} / non-finite values: engine is broken"
                )

    def execute(self, requests: list) -> list:
        """Validate each request, run the valid ones as one engine call, answer each request once."""
        t0 = time.perf_counter()
        embed_s = 0.0
        responses: list = [None] * len(requests)
        good: list[tuple[int, np.ndarray, np.ndarray]] = []
        for i, request in enumerate(requests):
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "token_ids")
                lens = pb_utils.get_input_tensor_by_name(request, "lengths")
                if ids is None or lens is None:
                    raise RequestRejected("[fbas:bad_request] inputs 'token_ids' and 'lengths' are both required")
                good.append((i, *check_request(as_numpy(ids), as_numpy(lens), self.limits)))
            except RequestRejected as e:
                responses[i] = self._error(str(e), pb_utils.TritonError.INVALID_ARG)
        if good:
            try:
                ids, lens = np.concatenate([g[1] for g in good]), np.concatenate([g[2] for g in good])
                t1 = time.perf_counter()
                rows = self.engine.embed(ids, lens, **self._embed_kw)
                embed_s = time.perf_counter() - t1
                start = 0
                for i, _, lens in good:
                    responses[i] = self._ok(rows[start : start + lens.size])
                    start += lens.size
            except Exception as e:  # noqa: BLE001 - process boundary: isolate the failing request below
                self.logger.log_warn(f"fbas: batch of {len(good)} requests failed ({e!r}); retrying one by one")
                for i, ids, lens in good:
                    responses[i] = self._one(ids, lens)
        captured = getattr(self.engine, "capture_s", 0.0)  # the GPU engine's running total
        self.timers.add(time.perf_counter() - t0, embed_s, captured - self._captured)
        self._captured = captured
        return responses

    def _one(self, ids: np.ndarray, lens: np.ndarray):
        try:
            return self._ok(self.engine.embed(ids, lens))
        except ValueError as e:
            return self._error(f"[fbas:bad_request] {e}", pb_utils.TritonError.INVALID_ARG)
        except Exception as e:  # noqa: BLE001 - process boundary: one error per request, never a crashed batch
            return self._error(f"engine failed: {e!r}", pb_utils.TritonError.INTERNAL)

    def _ok(self, rows: np.ndarray):
        out = np.ascontiguousarray(rows, dtype=self.out_dtype).reshape(1, rows.shape[0], self.dim)
        return pb_utils.InferenceResponse(output_tensors=[output_tensor(OUTPUT_NAME, out)])

    @staticmethod
    def _error(message: str, code):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))

    def finalize(self) -> None:
        self.engine = None
