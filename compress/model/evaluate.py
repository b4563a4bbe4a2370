"""Perplexity and inference speed under the benchmark protocol (`../shared/BENCHMARK.md`).

Perplexity: the text is tokenized whole and cut into non-overlapping windows of `seq_len`
tokens (tail dropped); labels are the inputs (the model shifts them); ppl = exp(mean over
windows of the window's mean token NLL). `quick` = the first 64 windows, `full` = all windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

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


def chunked_nll(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int, checkpointed: bool = False):
    """Summed next-token NLL of `hidden` (positions x width, the decoder's final states) against
    `targets`, one tensor per `chunk` positions, so the vocabulary logits of only `chunk` positions
    exist at once; `checkpointed`: each chunk under activation checkpointing (training)."""
    from torch.utils.checkpoint import checkpoint

    def nll(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head_logits(model, h), y, reduction="sum")

    for start in range(0, targets.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        yield checkpoint(nll, h, y, use_reentrant=False) if checkpointed else nll(h, y)


@torch.no_grad()
def window_nll(model, window: torch.Tensor, chunk: int = 128) -> float:
    """Mean next-token NLL of one window, computing the vocabulary logits `chunk` positions at a
    time (a 49k-word vocabulary over 512 positions would otherwise hold 100 MB of logits)."""
    device = model_device(model)
    ids = window.unsqueeze(0).to(device)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    targets = ids[0, 1:]
    total = 0.0
    for part in chunked_nll(model, hidden, targets, chunk):
        total += float(part)
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


_MANAGERS: dict = {}


def task_manager(evaluation):
    """lm-eval's task index, with the recipe's own task folders; a UserError without lm-eval or for an
    unknown task name (raised before any weights load, by preflight)."""
    from compress.errors import UserError

    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("eval.tasks needs lm-eval-harness: pip install 'compress[eval]' (or lm-eval)") from None
    for path in evaluation.task_paths:
        if not Path(path).expanduser().exists():
            raise UserError(f"eval.task_paths: {path} does not exist")
    paths = tuple(str(Path(p).expanduser().resolve()) for p in evaluation.task_paths)
    if paths not in _MANAGERS:  # indexing lm-eval's ~15,000 task files takes seconds: once per process
        _MANAGERS[paths] = TaskManager(include_path=list(paths) or None)
    manager = _MANAGERS[paths]
    unknown = [task for task in evaluation.tasks if task not in manager.all_tasks]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UserError(f"eval.tasks: lm-eval has no task {unknown[0]!r}{hint}; `lm-eval ls tasks` lists them")
    return manager


@torch.no_grad()
def task_scores(model, tokenizer, evaluation) -> dict:
    """Accuracy on `evaluation.tasks` with lm-eval's HFLM wrapping the model in memory: {task: {metric: value}}
    (acc, acc_norm and their standard errors where the task has them; a filter other than lm-eval's
    `none` is named in brackets). The tokenizer goes in as a copy: HFLM may give it a pad token, and the
    export must keep the source's. Under `accelerate launch` the main process evaluates, the others get {}."""
    import copy
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from compress.model.processes import is_main_process

    if not is_main_process():
        return {}
    model.eval()
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=evaluation.task_batch_size,
                  max_length=getattr(model.config, "max_position_embeddings", None), softmax_dtype=torch.float32)
        results = simple_evaluate(model=lm, tasks=list(evaluation.tasks), num_fewshot=evaluation.num_fewshot,
                                  limit=evaluation.task_limit, task_manager=task_manager(evaluation),
                                  bootstrap_iters=1000, log_samples=False)
    finally:
        logger.setLevel(level)
    scores = {}
    for task, values in (results or {}).get("results", {}).items():
        scores[task] = {}
        for key, value in values.items():
            metric, comma, kind = key.partition(",")
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool):
                scores[task][metric if kind == "none" else f"{metric} ({kind})"] = float(value)
    return scores


def scores_line(scores: dict) -> str:
    """One task's metrics for a log line, standard errors left out: `acc 0.5833, acc_norm 0.3333`."""
    return ", ".join(f"{metric} {value:.4f}" for metric, value in scores.items() if "stderr" not in metric)
