"""`fbas-pipeline build` and `embed` as a user runs them (subprocesses, real model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def fbas(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fbas-pipeline {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "minilm"
    proc = fbas("build", "--out", str(out), "--fusions", "all")
    assert "built sentence-transformers/all-MiniLM-L6-v2" in proc.stdout
    meta = json.loads((out / "fbas_model.json").read_text())
    assert meta["options"]["fusions"] == "embed_layernorm,attention,skip_layernorm,bias_gelu"
    assert len(meta["fingerprint"]) == 16
    return out


TEXTS = [
    "A man is playing a guitar.",
    "A man plays the guitar.",
    "The weather is lovely today, isn't it?",
    "一个男人在弹吉他。",
]


def test_embed_txt_parquet_jsonl_agree(cli_model, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    fbas("embed", "--model-dir", str(cli_model), str(tmp_path / "in.txt"), "--out", str(tmp_path / "a.npy"))
    fbas(
        "embed",
        "--model-dir",
        str(cli_model),
        str(tmp_path / "in.parquet"),
        "--text-column",
        "body",
        "--out",
        str(tmp_path / "b.npy"),
    )
    fbas("embed", "--model-dir", str(cli_model), str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "c.npy"))
    a, b, c = (np.load(tmp_path / f"{x}.npy") for x in "abc")
    assert a.shape == (4, 384) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert float(a[0] @ a[1]) > float(a[0] @ a[2])  # the paraphrases are closer to each other


def test_embed_refuses_empty_rows_by_line(cli_model, tmp_path):
    (tmp_path / "in.txt").write_text("first\n\n   \nfourth\n", encoding="utf-8")
    proc = fbas(
        "embed", "--model-dir", str(cli_model), str(tmp_path / "in.txt"), "--out", str(tmp_path / "x.npy"), check=False
    )
    assert proc.returncode == 2
    assert "row(s) 2, 3 are null, empty or whitespace-only" in proc.stderr
    assert not (tmp_path / "x.npy").exists()


def test_embed_missing_column_names_it(cli_model, tmp_path):
    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "in.parquet")
    proc = fbas(
        "embed",
        "--model-dir",
        str(cli_model),
        str(tmp_path / "in.parquet"),
        "--out",
        str(tmp_path / "x.npy"),
        check=False,
    )
    assert proc.returncode == 2 and "no column 'text'" in proc.stderr and "--text-column" in proc.stderr


def test_build_bad_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    proc = fbas("build", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m"), check=False)
    assert proc.returncode == 2
    assert "lacks the key 'hidden_size'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = fbas("build", "--precision", "fp16", "--out", str(tmp_path / "m"), check=False)
    assert proc.returncode == 2 and "--target gpu" in proc.stderr


def test_embed_without_built_folder(tmp_path):
    (tmp_path / "in.txt").write_text("hello\n")
    proc = fbas(
        "embed", "--model-dir", str(tmp_path), str(tmp_path / "in.txt"), "--out", str(tmp_path / "x.npy"), check=False
    )
    assert proc.returncode == 2 and "fbas-pipeline build" in proc.stderr


def test_a_csv_is_read_as_a_table_never_as_raw_lines(cli_model, tmp_path):
    """A CSV's header and other columns are never embedded: its text column is, in order; other formats refused."""
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)), encoding="utf-8")
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    fbas("embed", "--model-dir", str(cli_model), str(tmp_path / "in.txt"), "--out", str(tmp_path / "txt.npy"))
    fbas(
        "embed", "--model-dir", str(cli_model), str(csv_path), "--text-column", "body", "--out", str(tmp_path / "c.npy")
    )
    assert np.array_equal(np.load(tmp_path / "c.npy"), np.load(tmp_path / "txt.npy"))
    no_column = fbas(
        "embed", "--model-dir", str(cli_model), str(csv_path), "--out", str(tmp_path / "x.npy"), check=False
    )
    assert no_column.returncode == 2 and "no column 'text'" in no_column.stderr and "id, body" in no_column.stderr
    (tmp_path / "in.docx").write_text("x", encoding="utf-8")
    unknown = fbas(
        "embed", "--model-dir", str(cli_model), str(tmp_path / "in.docx"), "--out", str(tmp_path / "y.npy"), check=False
    )
    assert unknown.returncode == 2 and "unknown input format '.docx'" in unknown.stderr
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "y.npy").exists()


def test_a_checkpoint_given_as_model_dir_gets_a_fresh_folder_hint(tmp_path):
    from engine.checkpoint import default_model_path

    ckpt = default_model_path()
    (tmp_path / "in.txt").write_text("hello\n", encoding="utf-8")
    r = fbas("embed", "--model-dir", str(ckpt), str(tmp_path / "in.txt"), "--out", str(tmp_path / "o.npy"), check=False)
    assert r.returncode == 2 and "it is a checkpoint" in r.stderr
    assert f"--out {ckpt}" not in r.stderr and "--out models/NAME" in r.stderr
