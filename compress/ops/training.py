"""A short fine-tuning loop for adapters (LoRA recovery, and methods that prune while they train).

One process: plain training. Under `accelerate launch`: data-parallel, each process takes its share
of every batch and gradients are averaged (the same updates as one big process).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.errors import UserError
from compress.model.evaluate import chunked_nll
from compress.model.processes import on_cpu

LOSS_CHUNK = 512  # positions whose vocabulary logits exist at once in the training loss


def lora_targets(adapter, target_modules, dropout: float, details: dict, log) -> tuple[list[str], list[str]]:
    """peft's `target_modules` (leaf names of nn.Linear layers) and `target_parameters` (fused expert banks).

    Dense models: the configured names. Mixture of experts: the experts of a layer are two 3-D tensors
    (gate_up_proj, down_proj), adapted as banks (one rank-r LoRA per expert, peft's ParamWrapper), the same
    way in every MoE family. peft's banks take no dropout: with `dropout > 0` the experts stay frozen and
    the attention trains (logged, `experts_adapted: false` in the report)."""
    if not getattr(adapter, "is_moe", False):
        return list(target_modules), []
    mlp = {adapter.gate_name, adapter.up_name, adapter.down_name}
    wanted = [name for name in target_modules if name in mlp]
    modules = [name for name in target_modules if name not in mlp]
    if not wanted:
        return modules, []
    if any(adapter.experts(layer) is None for layer in adapter.layers()):
        raise UserError("stages: lora on the MLP of a mixture-of-experts model with dense MLP layers is not "
                        "supported (peft renames the MLP targets to the expert banks); adapt the attention "
                        "only: target_modules=[q_proj, k_proj, v_proj, o_proj]")
    if (adapter.gate_name in wanted) != (adapter.up_name in wanted):
        raise UserError(f"stages: lora target_modules: the experts' gate and up projections are one fused tensor "
                        f"(gate_up_proj); target both {adapter.gate_name} and {adapter.up_name} or neither")
    if dropout > 0:
        details["experts_adapted"] = False
        log(f"LoRA: the expert banks stay frozen (peft's LoRA on fused experts takes no dropout; "
        f"dropout={dropout}); set dropout=0 to adapt them")
        if not modules:
            raise UserError("stages: lora would adapt nothing: the expert banks need dropout=0")
        return modules, []
    details["experts_adapted"] = True
    banks = (["experts.gate_up_proj"] if adapter.gate_name in wanted else []) + (
        ["experts.down_proj"] if adapter.down_name in wanted else [])
    return modules, banks


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained model, unwrapped from accelerate
    losses: list[float]
    seconds: float

    def summary(self, tokens: int) -> dict:
        """Report fields: time, throughput, first/last loss, and the loss curve in up to ~10 points."""
        steps = len(self.losses)
        window = max(1, min(10, steps // 4))
        return {
            "train_seconds": self.seconds,
            "tokens_per_second": tokens / self.seconds,
            "loss_first": sum(self.losses[:window]) / window,
            "loss_last": sum(self.losses[-window:]) / window,
            "loss_curve": [round(sum(self.losses[i:i + window]) / len(self.losses[i:i + window]), 4)
                           for i in range(0, steps, window)],
        }


def causal_lm_loss(train_model: torch.nn.Module, model: torch.nn.Module, batch: torch.Tensor,
                   chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch`, the loss `labels=batch` gives, without the batch's
    full vocabulary logits: the (wrapped) model runs with `logits_to_keep=1`, its decoder's final
    hidden states are taken by a hook, and the logits are made `chunk` positions at a time. When the
    model's layers run under activation checkpointing (memory first), each logit chunk does too, so
    backward recomputes it instead of keeping it; otherwise the chunks are kept for backward (no
    recomputed logit product, at the memory of the full logits; not benchmarked apart). At 8 x 512
    tokens and a 49,152-word vocabulary the full logits are 805 MB in float32, and the loss keeps
    two or three tensors of that size for backward; at Llama-3's 128,256 words, 2.1 GB each.
    The forward still goes through `train_model` (accelerate's data-parallel wrapper)."""
    captured = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        train_model(input_ids=batch, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured[-1][:, :-1].reshape(-1, captured[-1].shape[-1])
    targets = batch[:, 1:].reshape(-1)
    checkpointed = bool(getattr(model, "is_activation_checkpointing", True))
    total = sum(chunked_nll(model, hidden, targets, chunk, checkpointed=checkpointed))
    return total / targets.numel()


def train(model: torch.nn.Module, windows: torch.Tensor, *, steps: int, batch_size: int, learning_rate: float,
          weight_decay: float = 0.0, warmup_steps: int = 0, max_grad_norm: float = 1.0, seed: int = 0,
          make_bar: Callable | None = None, on_gradients: Callable[[int], None] | None = None) -> TrainResult:
    """AdamW with warm-up + cosine decay and gradient clipping on the trainable parameters of `model`,
    `steps` batches of `batch_size` windows drawn in a seeded order; `on_gradients(step)` runs after the
    backward pass (the gradients as computed, before clipping)."""
    from accelerate import Accelerator

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, steps))
    accelerator = Accelerator(cpu=on_cpu())
    world, rank = accelerator.num_processes, accelerator.process_index
    if batch_size % world:
        raise UserError(f"recovery batch_size {batch_size} must be a multiple of the {world} processes")
    train_model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    plain_loss = not getattr(model.config, "output_router_logits", False)
    losses: list[float] = []
    bar = make_bar("recovery", steps, "step") if make_bar and accelerator.is_main_process else None
    start = time.perf_counter()
    train_model.train()
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    try:
        for step in range(steps):
            batch = windows[order[step * batch_size:(step + 1) * batch_size]][rank::world].to(device)
            if plain_loss:
                loss = causal_lm_loss(train_model, model, batch)
            else:  # the model adds its own terms to the loss (an MoE router's auxiliary loss)
                loss = train_model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise UserError(f"recovery loss became {loss.item()} at step {step}; lower learning_rate "
                                f"(now {learning_rate:g}) or run in float32")
            accelerator.backward(loss)
            if on_gradients is not None:
                on_gradients(step)
            accelerator.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if bar is not None:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}",
                                tok_s=f"{(step + 1) * batch.numel() * world / elapsed:.0f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(accelerator.unwrap_model(train_model), losses, time.perf_counter() - start)
