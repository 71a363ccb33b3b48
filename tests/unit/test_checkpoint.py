"""Checkpoint loading: name tables, shape checks, clear errors; the TF fixture loads to TF's numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from core.errors import CheckpointError
from engine.checkpoint import expected_shapes, load_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_default_model_loads_with_sentence_transformers_defaults(default_checkpoint):
    ck = default_checkpoint
    assert ck.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert (ck.shape.hidden_size, ck.shape.num_layers, ck.shape.num_heads) == (384, 6, 12)
    assert (ck.default_pooling, ck.default_normalize, ck.default_max_seq_len) == ("mean", True, 256)
    assert set(ck.weights) == set(expected_shapes(ck.shape))
    assert all(w.dtype == np.float32 for w in ck.weights.values())


def test_tf_checkpoint_loads_to_tf_numbers():
    ck = load_checkpoint(FIXTURES / "tf_bert_tiny")
    assert ck.format == "tf" and ck.shape.hidden_size == 32 and ck.shape.num_layers == 2
    assert ck.default_pooling == "pooler" and ck.tokenizer.lowercase
    with np.load(FIXTURES / "tf_bert_tiny_expected.npz") as tf:
        # kernels are [in, out] in TF and [out, in] in the canonical table
        np.testing.assert_array_equal(
            ck.weights["encoder.layer.1.attention.self.query.weight"],
            tf["bert/encoder/layer_1/attention/self/query/kernel"].T,
        )
        np.testing.assert_array_equal(
            ck.weights["embeddings.word_embeddings.weight"], tf["bert/embeddings/word_embeddings"]
        )
        np.testing.assert_array_equal(
            ck.weights["encoder.layer.0.output.LayerNorm.weight"], tf["bert/encoder/layer_0/output/LayerNorm/gamma"]
        )
        np.testing.assert_array_equal(ck.weights["pooler.dense.weight"], tf["bert/pooler/dense/kernel"].T)
        n_encoder = sum(1 for k in tf.files if k.startswith("bert/"))
    assert len(ck.weights) == n_encoder  # every encoder tensor used, the pretraining heads dropped


def _hf_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_weights_file(default_checkpoint, tmp_path):
    d = _hf_copy(default_checkpoint.path, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights: expected model.safetensors"):
        load_checkpoint(d)


def test_wrong_shape_names_the_tensor(default_checkpoint, tmp_path):
    d = _hf_copy(default_checkpoint.path, tmp_path / "m")
    w = load_file(str(d / "model.safetensors"))
    w["encoder.layer.3.intermediate.dense.weight"] = np.zeros((10, 384), np.float32)
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.3\.intermediate\.dense\.weight has shape \(10, 384\)"):
        load_checkpoint(d)


def test_missing_and_unexpected_tensors_are_named(default_checkpoint, tmp_path):
    d = _hf_copy(default_checkpoint.path, tmp_path / "m")
    w = load_file(str(d / "model.safetensors"))
    del w["encoder.layer.5.output.dense.bias"]
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) encoder\.layer\.5\.output\.dense\.bias"):
        load_checkpoint(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    w = load_file(str(default_checkpoint.path / "model.safetensors"))
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) encoder\.layer\.4"):
        load_checkpoint(d)


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a known checkpoint format .*weights.bin"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_damaged_safetensors(default_checkpoint, tmp_path):
    d = _hf_copy(default_checkpoint.path, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="damaged or not safetensors"):
        load_checkpoint(d)


def test_tf_folder_without_data_shard(tmp_path):
    d = tmp_path / "tf"
    shutil.copytree(FIXTURES / "tf_bert_tiny", d)
    (d / "bert_model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match="data-00000-of-00001"):
        load_checkpoint(d)


def test_unsupported_pooling_config(default_checkpoint, tmp_path):
    d = _hf_copy(default_checkpoint.path, tmp_path / "m")
    p = d / "1_Pooling" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["pooling_mode_mean_sqrt_len_tokens"] = True
    p.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="pooling configuration"):
        load_checkpoint(d)
