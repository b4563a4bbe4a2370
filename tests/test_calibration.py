"""Calibration sources: text, jsonl, Hugging Face datasets (local builder), self-generated."""

import pytest
import torch

from calibration.data import calibration_windows, read_source_text
from compress.errors import UserError
from compress.recipe import CalibrationConfig
from tests.conftest import tiny_llama, tiny_tokenizer


def test_jsonl_and_hf_sources_read_the_same_field(text_files):
    from_jsonl = read_source_text("jsonl", str(text_files["jsonl"]), "text")
    from_hf = read_source_text("hf", str(text_files["jsonl"]), "text", dataset="json", split="train")
    assert from_jsonl == from_hf and len(from_jsonl) > 1000


def test_windows_from_text_have_the_configured_shape(text_files):
    cfg = CalibrationConfig(source="text", path=str(text_files["calibration"]), num_samples=5, seq_len=16)
    windows = calibration_windows(cfg, None, tiny_tokenizer())
    assert windows.shape == (5, 16)
    again = calibration_windows(cfg, None, tiny_tokenizer())
    assert torch.equal(windows, again)  # seeded


def test_self_generated_windows_are_seeded():
    cfg = CalibrationConfig(source="self", num_samples=3, seq_len=12, batch_size=2)
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    first = calibration_windows(cfg, model, tokenizer)
    assert first.shape == (3, 12)
    assert torch.equal(first, calibration_windows(cfg, model, tokenizer))


@pytest.mark.parametrize("source,content,message", [
    ("text", None, "file not found"),
    ("jsonl", '{"body": "x"}\n', "has no field 'text'"),
    ("jsonl", "{not json}\n", "is not valid JSON"),
])
def test_bad_sources_name_the_problem(tmp_path, source, content, message):
    path = tmp_path / "data"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_source_text(source, str(path))


def test_too_short_text_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only a few words")
    cfg = CalibrationConfig(source="text", path=str(path), num_samples=2, seq_len=64)
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_windows(cfg, None, tiny_tokenizer())
