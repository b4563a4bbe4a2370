"""Per-weight gradient norms of the language-modelling loss over the calibration samples.

For every decoder linear W and every calibration sample n, g_n = dL_n/dW, where L_n is the mean
next-token cross-entropy of sample n. The result per weight is the norm across samples:

    l2: sqrt(sum_n g_n^2)        l1: sum_n |g_n|

accumulated in float32. GBLM-Pruner uses it; any method that needs first-order information can.

* Experts of mixture-of-experts layers are slices of two fused tensors: gradients are folded per
  fused tensor and cut back into each expert's gate/up/down projection (`trainable_targets`).
* One backward per sample (the norm is across samples, so gradients cannot be summed over a
  batch first). Only decoder-linear weights require grad; embeddings, norms and lm_head do not.
* Each weight's gradient is folded into its accumulator the moment autograd produces it
  (`register_post_accumulate_grad_hook`) and then dropped, so no full set of `.grad` tensors is
  ever held: memory = model + accumulators (the size of the decoder linears) + activations.
* Gradient checkpointing (default on) keeps only each decoder layer's input during the forward
  and recomputes the layer in the backward: activations of one sample shrink from every
  intermediate tensor of every layer to one hidden state per layer, at the price of one extra
  forward.
* Results are cached as safetensors under `$COMPRESS_CACHE/gradients/`, keyed by a fingerprint of
  the model's weights, the calibration token ids and the options, and reused across sparsities.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress.arch.moe import ExpertLinear
from compress.errors import NumericalError
from compress.model.loading import cache_root
from compress.ops.training import causal_lm_loss

FORMAT_VERSION = 1


def gradient_cache_dir() -> Path:
    return cache_root() / "gradients"


def fingerprint(adapter, windows: torch.Tensor, norm: str) -> str:
    """Hash of what the gradients depend on: weights (strided sample of every tensor), data, options."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": FORMAT_VERSION, "norm": norm,
                              "config": adapter.config.to_dict()}, sort_keys=True, default=str).encode())
    for name, tensor in adapter.model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def linear_key(index: int, name: str) -> str:
    return f"layers.{index}.{name}"


def gradient_norms(adapter, windows: torch.Tensor, norm: str = "l2", checkpointing: bool = True,
                   progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Norm across calibration samples of each decoder-linear weight's gradient (see module doc)."""
    model = adapter.model
    targets, views = trainable_targets(adapter)
    accumulators = {key: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for key, w in targets.items()}
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    handles = []

    def fold(key):
        def hook(param):
            grad = param.grad.float()
            accumulators[key].add_(grad.square() if norm == "l2" else grad.abs())
            param.grad = None
        return hook

    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for key, weight in targets.items():
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(fold(key)))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing is active in training mode only; decoder dropout is 0 here
        device = next(model.parameters()).device
        for sample in windows:
            ids = sample[None].to(device)
            loss = causal_lm_loss(model, model, ids)
            if not torch.isfinite(loss):
                raise NumericalError("NaN or Inf in the calibration loss of the gradient pass; "
                                     "run in float32 (dtype=float32) or check the model weights")
            loss.backward()
            if progress is not None:
                progress(1)
    finally:
        for handle in handles:
            handle.remove()
        if checkpointing:
            model.activation_checkpointing_disable()
        model.train(was_training)
        for name, param in model.named_parameters():
            param.requires_grad_(saved_flags[name])
            param.grad = None
    for key, acc in accumulators.items():
        if not torch.isfinite(acc).all():
            raise NumericalError(f"NaN or Inf in the gradients of {key}")
        if norm == "l2":
            acc.sqrt_()
    fused_keys = {fused for fused, _, _ in views.values()}
    result = {key: acc for key, acc in accumulators.items() if key not in fused_keys}
    for key, (fused, expert, rows) in views.items():  # each expert's share of a fused tensor
        part = accumulators[fused][expert]
        result[key] = (part if rows is None else part[rows]).contiguous()
    return result


def trainable_targets(adapter) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """(parameters whose gradients are needed, keyed; decoder linears that are views of one of them).

    A dense linear's weight is its own parameter. An expert's gate/up/down projection is a slice of
    a fused expert tensor (compress.arch.moe.ExpertLinear): the fused parameter is the target and
    `views[linear key] = (fused key, expert, rows)` cuts its accumulator back into projections.
    """

    targets, views = {}, {}
    for i, layer in enumerate(adapter.layers()):
        for name, linear in adapter.decoder_linears(layer).items():
            key = linear_key(i, name)
            if isinstance(linear, ExpertLinear):
                fused = linear_key(i, f"{adapter.mlp_name}.experts.{linear.parameter}")
                targets[fused] = getattr(linear._experts, linear.parameter)
                views[key] = (fused, linear.expert, linear.rows)
            else:
                targets[key] = linear.weight
    return targets, views


def cached_gradient_norms(adapter, windows: torch.Tensor, norm: str = "l2", checkpointing: bool = True,
                          cache: bool = True, progress=None, log=print) -> dict[str, torch.Tensor]:
    """`gradient_norms`, read from / written to the safetensors cache when `cache` is on."""
    if not cache:
        return gradient_norms(adapter, windows, norm, checkpointing, progress)
    key = fingerprint(adapter, windows, norm)
    path = gradient_cache_dir() / f"{key}.safetensors"
    if path.is_file():
        log(f"gradients: reusing {path}")
        if progress is not None:
            progress(len(windows))
        return load_file(path)
    norms = gradient_norms(adapter, windows, norm, checkpointing, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in norms.items()}, partial,
              metadata={"norm": norm, "samples": str(len(windows)), "format": str(FORMAT_VERSION)})
    os.replace(partial, path)
    log(f"gradients: cached in {path}")
    return norms
