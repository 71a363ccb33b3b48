"""What a new user meets in the first hour, through the real command: exit codes that mean something, errors that
name the variable or file at fault, a version, help without placeholder defaults, no cluster for an empty corpus."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.pipeline_support import fbas_cli

ROOT = Path(__file__).resolve().parents[2]


_cli = fbas_cli


def test_status_of_a_missing_or_empty_folder_is_not_success(tmp_path):
    missing = _cli("status", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    empty = _cli("status", str(tmp_path))
    assert empty.returncode == 1 and "no fbas job here" in empty.stdout


def test_a_bad_variable_is_named_and_a_mistyped_one_is_warned_about(tmp_path):
    bad = _cli("status", str(tmp_path), env={"FBAS_MAX_SEQ_LEN": "abc"})
    assert bad.returncode == 2 and "FBAS_MAX_SEQ_LEN" in bad.stderr and "'abc'" in bad.stderr
    typo = _cli("status", str(tmp_path), env={"FBAS_MAX_SEQLEN": "128"})
    assert "FBAS_MAX_SEQLEN is not an fbas setting" in typo.stderr and "did you mean FBAS_MAX_SEQ_LEN" in typo.stderr
    hooks = _cli("status", str(tmp_path), env={"FBAS_SHARED_DATA": str(tmp_path)})
    assert "not an fbas setting" not in hooks.stderr


def test_version_and_help_defaults():
    version = _cli("--version")
    assert (
        version.returncode == 0 and version.stdout.startswith("fbas-pipeline ") and version.stdout.strip()[-1].isdigit()
    )
    for command in ("build", "ingest", "worker", "serve", "status", "search", "embed", "eval"):
        text = _cli(command, "--help").stdout
        assert "(default: None" not in text, command
    build = _cli("build", "--help").stdout
    assert "(default: 256)" in build and "(default: 0.995)" in build


def test_an_empty_corpus_is_refused_before_anything_starts(tmp_path):
    corpus = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), corpus)
    r = _cli("ingest", str(corpus), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "holds no rows" in r.stderr
    assert not (tmp_path / "out").exists(), "nothing was built or started for it"


def test_an_index_too_big_for_the_corpus_is_refused_before_embedding(tmp_path):
    corpus = tmp_path / "tiny.parquet"
    pq.write_table(pa.table({"id": list(range(5)), "text": [f"text {i}" for i in range(5)]}), corpus)
    r = _cli("ingest", str(corpus), "--out", str(tmp_path / "out"), "--index", "ivfpq")
    assert (
        r.returncode == 2 and "--index ivfpq needs at least 1,000 rows" in r.stderr and "this corpus has 5" in r.stderr
    )
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_serve_names_the_working_path_when_the_repository_is_empty(tmp_path):
    r = _cli("serve", "--model-repository", str(tmp_path / "repo"))
    assert r.returncode == 2
    assert "serve --model-dir models/NAME --model-repository" in r.stderr and "build --out models/NAME" in r.stderr


def test_the_gpu_target_on_a_host_without_one_fails_at_once_in_one_line(tmp_path):
    from services.gpus import visible_gpus

    if visible_gpus():
        import pytest

        pytest.skip("this host has a GPU: the refusal is for hosts without one")
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["a b", "c d"]}), corpus)
    r = _cli("ingest", str(corpus), "--out", str(tmp_path / "out"), "--target", "gpu", "--precision", "fp16")
    assert r.returncode == 2 and "needs an NVIDIA GPU and this host shows none" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_full_disk_at_the_start_is_named_and_leaves_nothing_behind(tmp_path):
    """`ingest` into a 20 MB filesystem: the model (about 90 MB) cannot be placed there. One clear error names
    the folder and the space needed; no partial model folder is left, so the disk is as free as before."""
    import shutil

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)]).returncode:
        import pytest

        pytest.skip("needs root and mount(8) to make a small filesystem")
    try:
        free_before = shutil.disk_usage(mnt).free
        r = _cli("ingest", str(ROOT / "pipeline" / "data" / "sample_corpus.parquet"), "--out", str(mnt / "o"))
        assert r.returncode == 2, r.stderr
        assert "out of disk space for the model" in r.stderr and f"{mnt}/o/.fbas" in r.stderr and "MB" in r.stderr
        assert "Traceback" not in r.stderr
        left = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
        assert not any(".copying" in p or ".building" in p or p.endswith("model") for p in left), left
        assert shutil.disk_usage(mnt).free >= free_before - 64 * 1024, "space was left taken"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_corrupt_parquet_page_is_named_and_a_rerun_with_the_repaired_file_works(tmp_path):
    """Bytes flipped inside row group 1's text pages: `ingest` stops with exit 2 naming the file and the row
    group (no Arrow traceback), leaves no claim on the folder, and the same command with the repaired file
    finishes with every row once."""
    from tests.pipeline_support import check_oracle

    texts = [f"sentence number {i} " + "lorem ipsum dolor sit amet " * (i % 7) for i in range(3000)]
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": list(range(3000)), "text": texts}), good, row_group_size=1000)
    text_col = pq.ParquetFile(good).metadata.row_group(1).column(1)
    start = text_col.dictionary_page_offset or text_col.data_page_offset
    data = bytearray(good.read_bytes())
    for k in range(200):  # inside row group 1's text pages: snappy can no longer decompress them
        data[start + 3000 + k] ^= 0x5A
    corpus, out = tmp_path / "corpus.parquet", tmp_path / "out"
    corpus.write_bytes(bytes(data))
    bad = _cli("ingest", str(corpus), "--out", str(out), "--no-progress")
    assert bad.returncode == 2
    assert f"{corpus}: row group 1 (rows 1000-1999 of this file) cannot be read" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not (out / ".fbas" / "job.pending").exists()
    corpus.write_bytes(good.read_bytes())
    fixed = _cli("ingest", str(corpus), "--out", str(out), "--no-progress")
    assert fixed.returncode == 0, fixed.stderr
    check_oracle(out, list(range(3000)))


def test_ingest_uses_a_built_model_as_it_is_and_says_what_it_is_doing(tmp_path):
    """A folder `build` wrote, given as --model-dir or as --model, is served as it is (its own settings, here
    max_seq_len 128, win over the flags' defaults; nothing is built again), and the one-off steps are named on
    stderr as they start and end."""
    import json

    built = tmp_path / "m128"
    b = _cli("build", "--max-seq-len", "128", "--out", str(built))
    assert b.returncode == 0, b.stderr
    fingerprint = json.loads((built / "fbas_model.json").read_text())["fingerprint"]
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(50)), "text": [f"text number {i}" for i in range(50)]}), corpus)
    for flag, out in (("--model-dir", tmp_path / "o1"), ("--model", tmp_path / "o2")):
        r = _cli("ingest", str(corpus), "--out", str(out), flag, str(built))
        assert r.returncode == 0, r.stderr
        m = json.loads((out / "manifest.json").read_text())["model"]
        assert m["fingerprint"] == fingerprint and m["max_seq_len"] == 128
        assert "building the model" not in r.stderr
        for step in ("starting the local services", "waiting for tritonserver to load the model", "finalizing"):
            assert f"fbas: {step}" in r.stderr and "done in" in r.stderr, r.stderr


def test_setup_asks_for_the_cpu_torch_first_and_builds_without_warnings(tmp_path):
    """`make setup-test` asks PyTorch's CPU index first (a stock index would hand out the CUDA build), and
    building the package prints no setuptools warning (the license and data-folder warnings are gone)."""
    import subprocess
    import sys

    lines = (ROOT / "Makefile").read_text().splitlines()
    installs = [x for x in lines if "$(PIP) install" in x and "torch" in x and not x.startswith("#")]
    assert installs and "download.pytorch.org/whl/cpu" in installs[0], installs
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert "BuildBackendWarning" not in text and "SetuptoolsDeprecationWarning" not in text, text[-3000:]
    assert list(tmp_path.glob("faster_bert_as_service-*.whl"))
