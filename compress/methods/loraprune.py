"""LoRAPrune: structured pruning driven by LoRA gradients while the adapters train (Zhang et al.,
ACL Findings 2024, arXiv 2305.18403).

    stages:
      - method: loraprune
        sparsity: 0.5             # of the decoder linears' parameters (KV groups and MLP channels)
        steps: 200                # of which the first prune_steps prune, the rest fine-tune
        prune_steps: 100
        batch_size: 8
        seq_len: 256
        rank: 8

What the stage does (one LoRA fine-tune, the `lora` stage's data, adapters and loop):
1. Importance without a weight gradient. For a linear W0 with adapter s·B·A, one SGD step on A
   and B changes B·A by -(g_B·A + B·g_A) + g_B·g_A, so Ĝ = g_B·A + B·g_A - g_B·g_A stands for
   dL/dW (only r x k and d x r gradients exist; Ĝ is formed one linear at a time, after backward).
   A weight's importance is |Ĝ ⊙ (W0 + s·B·A)|, a unit's the sum over its weights: a KV group =
   its query heads' q rows, its k and v rows and its query heads' o_proj columns; an MLP channel
   = its gate and up rows and its down_proj column. As in the released code, each linear's vector
   of unit scores is divided by its L2 norm before the linears of a block are summed.
2. Moving average Ī = beta·Ī + (1 - beta)·I after every optimizer step of the pruning phase.
3. Every `prune_every` steps the removed share follows a cubic schedule,
   sparsity · (1 - (1 - t / prune_steps)³), reaching exactly `sparsity` at t = prune_steps. Removed
   units are masked (their q/k/v and gate/up outputs are multiplied by 0, so the heads emit
   nothing and the channels carry nothing into o_proj / down_proj) and stay removed; training goes
   on on the masked model, then `steps - prune_steps` more steps fine-tune with the final mask.
4. `structure: global` (default) ranks all units of all layers at once as FLAP's AL-AM does:
   scores z-standardised per layer and kind, each unit weighing its real parameter count under
   GQA, so the kept parameters reach the target. `per_layer` removes the same share from every
   layer (the released code's `local_prune`, without its frozen first and last layers).
   `uniform: true` rounds the global decision to one width per kind (stock config).
5. At the end the adapters are merged into the weights and the masked units physically sliced;
   the logits of the sliced model are checked against the masked model's on a training batch.

Dense decoder layers only: peft cannot put adapters on fused MoE expert tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.errors import NumericalError, UserError
from compress.methods.base import StageContext
from compress.methods.lora import LoraConfig, LoraRecovery, training_windows
from compress.methods.registry import register
from compress.ops.allocation import (
    UnitScores,
    global_allocation,
    round_widths,
    same_width_allocation,
    standardize,
    uniform_allocation,
)
from compress.ops.slicing import attention_unit_params, mlp_unit_params, slice_attention, slice_mlp
from compress.ops.units import UnitMasks

PRUNED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraPruneConfig(LoraConfig):
    method: Literal["loraprune"] = "loraprune"
    sparsity: float = Field(0.2, ge=0.0, lt=1.0, description="share of the decoder linears' parameters removed")
    prune_steps: int = Field(100, ge=1, description="steps of the pruning phase (the rest fine-tune with the final "
                                                    "mask)")
    prune_every: int = Field(10, ge=1, description="steps between two pruning events")
    beta: float = Field(0.9, ge=0.0, lt=1.0, description="moving average of the importance: beta x old + (1 - beta) "
                                                          "x new")
    structure: Literal["global", "per_layer"] = "global"
    uniform: bool = Field(False, description="one width per kind in every layer (stock config, no custom code)")
    min_units: int = Field(1, ge=1, description="units of each kind always kept in every layer")
    round_to: int = Field(1, ge=1, description="kept MLP widths rounded to a multiple of this at the final event")
    target_modules: list[str] = Field(list(PRUNED_LINEARS), min_length=1,
                                      description="decoder linears that get LoRA; all seven, whose gradients "
                                                  "score the units")

    @model_validator(mode="after")
    def _check_loraprune(self):
        if self.prune_steps > self.total_steps:
            raise ValueError(f"prune_steps {self.prune_steps} is more than the stage's {self.total_steps} steps")
        if not self.merge:
            raise ValueError("loraprune slices the merged weights: merge must stay true")
        missing = [name for name in PRUNED_LINEARS if name not in self.target_modules]
        if missing:
            raise ValueError(f"loraprune scores units from the LoRA gradients of every decoder linear; "
                             f"target_modules lacks {', '.join(missing)}")
        return self

    def check_model(self, view, number: int, recipe) -> None:
        if view.is_moe:
            raise UserError(MOE_REFUSAL)
        super().check_model(view, number, recipe)


MOE_REFUSAL = ("loraprune prunes dense decoder layers: its unit scores need one LoRA per linear, and the experts of "
               "a mixture-of-experts (MoE) layer are fused banks; use flap or cfsp for expert channels")


def scheduled_sparsity(step: int, prune_steps: int, target: float) -> float:
    """Cubic schedule: 0 at step 0, `target` at `prune_steps` and after (steps counted from 1)."""
    progress = min(1.0, step / prune_steps)
    return target * (1.0 - (1.0 - progress) ** 3)


def lora_weight_gradient(module) -> torch.Tensor:
    """Ĝ = g_B·A + B·g_A - g_B·g_A of a peft LoRA linear (float32, [out, in]): what one SGD step of
    the adapter would change the weight by, with the sign of a gradient."""
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    g_a, g_b = a.grad, b.grad
    if g_a is None or g_b is None:
        return torch.zeros(b.shape[0], a.shape[1], device=a.device)
    a, b, g_a, g_b = a.detach().float(), b.detach().float(), g_a.float(), g_b.float()
    return g_b @ a + b @ g_a - g_b @ g_a


def lora_merged_weight(module) -> torch.Tensor:
    """W0 + s·B·A of a peft LoRA linear, float32."""
    a, b = module.lora_A["default"].weight.detach().float(), module.lora_B["default"].weight.detach().float()
    return module.base_layer.weight.detach().float() + module.scaling["default"] * (b @ a)


def unit_importance(adapter, layer, element_importance) -> dict[str, torch.Tensor]:
    """{"attention": [kv groups], "mlp": [channels]} from `element_importance(linear) -> [out, in]`.

    Each linear's unit vector is L2-normalised, then the linears of the block are summed."""
    shape = adapter.attention_shape(layer)
    q, k, v = adapter.qkv(layer)
    o = adapter.o_proj(layer)
    gate, up = adapter.gate_up(layer)
    down = adapter.down_proj(layer)
    groups, query = shape.num_kv_heads, shape.group_size * shape.head_dim

    def normalised(values: torch.Tensor) -> torch.Tensor:
        values = values.double()
        return values / (values.norm() + 1e-8)

    attention = (normalised(element_importance(q).sum(1).reshape(groups, query).sum(1))
                 + normalised(element_importance(k).sum(1).reshape(groups, shape.head_dim).sum(1))
                 + normalised(element_importance(v).sum(1).reshape(groups, shape.head_dim).sum(1))
                 + normalised(element_importance(o).sum(0).reshape(groups, query).sum(1)))
    mlp = (normalised(element_importance(gate).sum(1)) + normalised(element_importance(up).sum(1))
           + normalised(element_importance(down).sum(0)))
    return {"attention": attention, "mlp": mlp}


@register
class LoraPrune(LoraRecovery):
    name = "loraprune"
    Config = LoraPruneConfig
    prunes = True

    def run(self, ctx: StageContext) -> dict:
        cfg, adapter = self.config, ctx.adapter
        if getattr(adapter, "is_moe", False):
            raise UserError(MOE_REFUSAL)
        self.check_trainable(ctx)
        steps = cfg.total_steps
        windows = training_windows(cfg, ctx)
        details: dict = {"steps": steps, "prune_steps": cfg.prune_steps,
                         "tokens": steps * cfg.batch_size * cfg.seq_len}
        model, was_training = adapter.model, adapter.model.training
        # the unit costs and the layers' shapes, before any adapter wraps the linears
        params = {(i, kind): count for i, layer in enumerate(adapter.layers())
                  for kind, count in (("attention", attention_unit_params(adapter, layer)),
                                      ("mlp", mlp_unit_params(adapter, layer)))}
        peft_model = self.peft_model(ctx, details)
        ctx.log(f"LoRAPrune: {details['trainable_params']:,} trainable parameters, {steps} steps x {cfg.batch_size} "
                f"x {cfg.seq_len} tokens, pruning to {cfg.sparsity:.0%} over the first {cfg.prune_steps}")
        masks = UnitMasks(adapter)
        masks.install()
        average: dict[tuple[int, str], torch.Tensor] = {}
        schedule: list[dict] = []

        def on_gradients(step: int) -> None:
            if step >= cfg.prune_steps:
                return
            with torch.no_grad():
                for index, layer in enumerate(adapter.layers()):
                    scores = unit_importance(adapter, layer,
                                             lambda m: (lora_weight_gradient(m) * lora_merged_weight(m)).abs())
                    for kind, value in scores.items():
                        if not torch.isfinite(value).all():
                            return  # as the released code: an update with NaN/Inf is skipped whole
                    for kind, value in scores.items():
                        key = (index, kind)
                        value = value.cpu()
                        average[key] = value if key not in average else cfg.beta * average[key] + (1 - cfg.beta) * value
            done = step + 1
            if done % cfg.prune_every == 0 or done == cfg.prune_steps:
                target = scheduled_sparsity(done, cfg.prune_steps, cfg.sparsity)
                keep = self.decide(adapter, average, params, masks, target, final=done == cfg.prune_steps)
                masks.set(keep)
                schedule.append({"step": done, "target": round(target, 4),
                                 "removed": round(removed_share(keep, params, masks), 4)})

        result = self.train(peft_model, windows, ctx, on_gradients=on_gradients)
        details.update(result.summary(details["tokens"]))
        details["schedule"] = schedule
        check = windows[:2]
        result.model.eval()
        with torch.no_grad():
            masked_logits = result.model(input_ids=check.to(model.device), use_cache=False).logits.float()
        masks.remove()
        self.merge_or_export(result.model, ctx, details)
        keep = masks.keep_indices()
        for index, layer in enumerate(adapter.layers()):
            shape = adapter.attention_shape(layer)
            if len(keep[(index, "attention")]) < shape.num_kv_heads:
                slice_attention(adapter, layer, keep[(index, "attention")])
            if len(keep[(index, "mlp")]) < adapter.intermediate_size(layer):
                slice_mlp(adapter, layer, keep[(index, "mlp")])
        model.eval()
        with torch.no_grad():
            sliced_logits = model(input_ids=check.to(model.device), use_cache=False).logits.float()
        difference = float((sliced_logits - masked_logits).abs().max())
        scale = float(masked_logits.abs().max())
        details["sliced_vs_masked_max_logit_difference"] = difference
        if not difference <= 1e-3 * max(1.0, scale):
            raise NumericalError(f"loraprune: the sliced model's logits differ from the masked model's by "
                                 f"{difference:g} (logits up to {scale:g}): the slicing does not match the masks")
        model.train(was_training)
        details["kept_units"] = {f"layers.{i}.{kind}": int(len(idx)) for (i, kind), idx in sorted(keep.items())}
        return details

    def decide(self, adapter, average, params, masks: UnitMasks, target: float, final: bool):
        """Kept units per (layer, kind) at the scheduled sparsity; removed units stay removed."""
        cfg = self.config
        units = []
        for (index, kind), scores in sorted(average.items()):
            if cfg.structure == "global":
                scores = standardize(scores)
            removed = torch.tensor(-torch.inf, dtype=torch.float64)
            scores = torch.where(masks.kept[(index, kind)], scores.double(), removed)
            removable = kind != "attention" or adapter.attention_prunable
            units.append(UnitScores(index, kind, scores, params[(index, kind)], removable=removable))
        if cfg.structure == "global":
            keep = global_allocation(units, target, cfg.min_units)
            if cfg.uniform:
                keep = same_width_allocation(units, keep, target, cfg.min_units)
        else:
            keep = uniform_allocation(units, target, cfg.min_units)
        if final:
            keep = round_widths(units, keep, cfg.round_to)
        return keep


def removed_share(keep, params, masks: UnitMasks) -> float:
    """Share of the prunable parameters (KV groups and MLP channels) the decision removes."""
    total = sum(len(masks.kept[key]) * count for key, count in params.items())
    kept = sum(len(keep[key]) * count for key, count in params.items())
    return 1.0 - kept / total
