"""Calibration data (text, jsonl, Hugging Face datasets, self-generated) and layer-by-layer capture."""

from calibration.capture import LayerwiseCapture
from calibration.data import calibration_windows, read_source_text, sample_windows, tokenize_text

__all__ = ["calibration_windows", "read_source_text", "sample_windows", "tokenize_text", "LayerwiseCapture"]
