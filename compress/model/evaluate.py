"""Perplexity and inference speed under the benchmark protocol (`../shared/BENCHMARK.md`).

Perplexity: the text is tokenized whole and cut into non-overlapping windows of `seq_len`
tokens (tail dropped); labels are the inputs (the model shifts them); ppl = exp(mean over
windows of the window's mean token NLL). `quick` = the first 64 windows, `full` = all windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from calibration.data import read_source_text, tokenize_text
from compress.model.offload import model_device

QUICK_WINDOWS = 64


def eval_windows(ids: torch.Tensor, seq_len: int, windows: str | int) -> torch.Tensor:
    """The evaluation windows [n, seq_len] for `quick`, `full` or an explicit count."""
    available = len(ids) // seq_len
    if windows == "full":
        count = available
    elif windows == "quick":
        count = min(QUICK_WINDOWS, available)
    else:
        count = min(int(windows), available)
    return ids[: count * seq_len].reshape(count, seq_len)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 vocabulary logits of final (normed) hidden states, with the model's logit soft-capping."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


@torch.no_grad()
def window_nll(model, window: torch.Tensor, chunk: int = 128) -> float:
    """Mean next-token NLL of one window, computing the vocabulary logits `chunk` positions at a
    time (a 49k-word vocabulary over 512 positions would otherwise hold 100 MB of logits)."""
    device = model_device(model)
    ids = window.unsqueeze(0).to(device)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    total = 0.0
    targets = ids[0, 1:]
    for start in range(0, targets.shape[0], chunk):
        logits = head_logits(model, hidden[start:start + chunk])
        total += float(torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="sum"))
    return total / targets.shape[0]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: Callable | None = None) -> float:
    model.eval()
    total = 0.0
    for window in windows:
        total += window_nll(model, window)
        if progress is not None:
            progress(1)
    return math.exp(total / len(windows))


@torch.no_grad()
def forward_tokens_per_second(model, batch_size: int = 4, seq_len: int = 512, repeats: int = 2) -> float:
    """Tokens/s of a forward pass over a batch of `batch_size` x `seq_len` random tokens."""
    model.eval()
    device = model_device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    model(input_ids=ids[:, :16], use_cache=False)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return repeats * ids.numel() / (time.perf_counter() - start)


@torch.no_grad()
def generation_tokens_per_second(model, new_tokens: int = 128, repeats: int = 2) -> float:
    """Tokens/s of greedy generation of `new_tokens` at batch 1 (no early stop); best of `repeats`
    after a short warm-up."""
    model.eval()
    device = model_device(model)
    ids = torch.tensor([[1, 2, 3, 4]], device=device)

    def generate(count: int) -> float:
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=count,
                       min_new_tokens=count, pad_token_id=0)
        return time.perf_counter() - start

    generate(8)
    return new_tokens / min(generate(new_tokens) for _ in range(repeats))


def evaluate_ppl(model, tokenizer, evaluation, progress, label: str, test_ids=None) -> float | None:
    """Perplexity under a recipe's eval block (None for `ppl: none`), with a progress bar `ppl LABEL`.

    `test_ids`: the evaluation text already tokenized (a run measures several times on the same text).
    """

    if evaluation.ppl == "none":
        return None
    if test_ids is None:
        test_ids = tokenize_text(tokenizer, read_source_text(evaluation, "eval", "eval"))
    windows = eval_windows(test_ids, evaluation.seq_len, evaluation.ppl)
    with progress.bar(f"ppl {label}", len(windows), "win") as update:
        return perplexity(model, windows, update)
