"""Calibration token windows from a text file, a jsonl field, a Hugging Face dataset or the model itself.

Window sampling follows the benchmark protocol: the text is tokenized whole, then each window's
start is drawn with `random.Random(seed).randint(0, len(ids) - seq_len - 1)`, in order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from compress.errors import UserError


def read_source_text(source: str, path: str | None = None, field: str = "text", dataset: str | None = None,
                     dataset_config: str | None = None, split: str = "train", key: str = "calibration") -> str:
    """The text of a `text`, `jsonl` or `hf` source, as one string (`key` names the recipe block in errors)."""
    if source == "text":
        file = _existing_file(path, f"{key}.path")
        try:
            return file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as err:
            raise UserError(f"cannot read {key} text {file}: {err}; give a UTF-8 text file") from err
    texts = []
    for where, record in read_records(source, path, dataset, dataset_config, split, key):
        if field not in record:
            raise UserError(f"{where} has no field '{field}'; set {key}.field")
        if record[field]:
            texts.append(str(record[field]))
    return "\n\n".join(texts)


def read_records(source: str, path: str | None = None, dataset: str | None = None,
                 dataset_config: str | None = None, split: str = "train", key: str = "calibration"):
    """(where, record) for every record of a `jsonl` file or a Hugging Face dataset; `where` locates it."""
    if source == "jsonl":
        file = _existing_file(path, f"{key}.path")
        with file.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{file}:{line_number} is not valid JSON ({err.msg}); fix the line") from err
                if not isinstance(record, dict):
                    raise UserError(f"{file}:{line_number} is not a JSON object")
                yield f"{file}:{line_number}", record
        return
    if source == "hf":
        if not dataset:
            raise UserError(f"{key}.source=hf needs {key}.dataset (a Hugging Face dataset name)")
        import datasets

        try:
            # `path` doubles as data_files, for the generic builders ("json", "text", "parquet").
            rows = datasets.load_dataset(dataset, dataset_config, split=split, data_files=path or None)
        except Exception as err:  # network, missing config, missing split: all user-fixable
            raise UserError(f"cannot load dataset {dataset} ({dataset_config}, {split}): {err}") from err
        for number, row in enumerate(rows):
            yield f"dataset {dataset} row {number}", row
        return
    raise UserError(f"unknown {key} source '{source}'")


def _existing_file(path: str | None, key: str) -> Path:
    if not path:
        raise UserError(f"{key} is not set; give the path of the data file")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}: file not found: {file}; fix the path (paths are relative to the current folder)")
    return file


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, without special tokens, as a 1-D LongTensor."""
    # The text is far longer than the model's context on purpose; windows are cut afterwards.
    previous = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = 1 << 62
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        if previous is not None:
            tokenizer.model_max_length = previous
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets, shape [num_samples, seq_len]."""
    if len(ids) <= seq_len + 1:
        raise UserError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                        f"give more text or lower calibration.seq_len")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seq_len - 1) for _ in range(num_samples)]
    return torch.stack([ids[start:start + seq_len] for start in starts])


@torch.no_grad()
def generate_windows(model, tokenizer, num_samples: int, seq_len: int, seed: int, batch_size: int = 16,
                     temperature: float = 1.0, top_p: float = 0.95, progress=None) -> torch.Tensor:
    """Calibration windows written by the model itself (data-free calibration).

    Each sequence starts from one token drawn uniformly (seeded) from the vocabulary and is then
    sampled with nucleus sampling; no external text is needed.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    special = set(tokenizer.all_special_ids)
    windows = []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        first = []
        while len(first) < count:
            token = int(torch.randint(vocab, (1,), generator=generator))
            if token not in special:
                first.append(token)
        ids = torch.tensor(first, dtype=torch.long).unsqueeze(1).to(model.device)
        torch.manual_seed(seed + start)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature, top_p=top_p,
            top_k=0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        windows.append(out[:, :seq_len].cpu())
        if progress is not None:
            progress(count)
    return torch.cat(windows)


def calibration_windows(cfg, model, tokenizer, progress=None) -> torch.Tensor:
    """Token windows [num_samples, seq_len] for a recipe's calibration block."""
    if cfg.source == "self":
        return generate_windows(model, tokenizer, cfg.num_samples, cfg.seq_len, cfg.seed,
                                batch_size=cfg.batch_size * 2, progress=progress)
    text = read_source_text(cfg.source, cfg.path, cfg.field, cfg.dataset, cfg.dataset_config, cfg.split)
    if not text.strip():
        raise UserError(f"calibration source {cfg.path or cfg.dataset} is empty; give a file with text in it")
    ids = tokenize_text(tokenizer, text)
    return sample_windows(ids, cfg.num_samples, cfg.seq_len, cfg.seed)
