"""Recovery fine-tuning: a short LoRA fine-tune of the pruned model, as a recipe stage.

    stages:
      - method: flap
        sparsity: 0.5
      - method: lora              # after any pruning stage
        steps: 200                # or tokens: 409600
        batch_size: 8
        seq_len: 256
        rank: 8
        data: {source: builtin, name: wikitext2}   # or {path: my.txt}; never the evaluation text

What the stage does:
1. Token windows from `data` (a named set such as the packaged `wikitext2`, text / jsonl / Hugging
   Face dataset, or `calibration`: the calibration windows, which is what `calibration=self` picks;
   `template` formats instruction records, e.g.
   "### Instruction:\\n{instruction}\\n\\n### Response:\\n{output}"), at seeded random offsets
   like the calibration windows.
2. peft LoRA on the decoder linears (`target_modules`), AdamW with linear warm-up and cosine decay,
   gradient clipping, optional gradient checkpointing; a progress bar shows loss and tokens/s.
3. `merge: true` (default) folds the adapter into the weights (`merge_and_unload`). Merging makes
   masked weights dense again, so when an earlier stage left zeros in place (unstructured or N:M)
   the masks are re-applied after merging and the N:M patterns are verified before going on.
   `merge: false` keeps the pruned weights as they are and exports the adapter beside them
   (`adapter/`, loadable with `peft.PeftModel.from_pretrained`).
4. `rank_allocation: importance` gives each decoder layer a LoRA rank that follows the layer's
   coarse importance (angular distance between its input and output, CFSP's block importance),
   with the same mean rank as `uniform` (`inverse` gives more rank to less important layers).
   The importance comes from an earlier CFSP stage, or is measured on the pruned model.

Several GPUs: run the same `compress run ...` under `accelerate launch`; see docs/guide.md.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.config import DataSource, StageConfig
from compress.errors import UserError
from compress.methods.base import Method, StageContext
from compress.methods.registry import register
from compress.model.offload import is_offloaded
from compress.model.processes import on_cpu

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RecoveryDataConfig(DataSource):
    source: Literal["builtin", "text", "jsonl", "hf", "calibration"] = Field(
        "builtin", description="builtin (a named data set) | text | jsonl | hf | calibration (the calibration "
                               "windows, e.g. self-generated ones)")
    path: str | None = Field(None, description="text/jsonl file; data_files for source=hf")
    template: str | None = Field(None, description="format of one instruction record, e.g. "
                                                   "'### Instruction:\\n{instruction}\\n\\n### Response:\\n{output}'")


class LoraConfig(StageConfig):
    method: Literal["lora"] = "lora"
    sparsity: float = Field(0.0, ge=0.0, le=0.0, description="recovery removes nothing")
    data: RecoveryDataConfig = RecoveryDataConfig()
    target_modules: list[str] = Field(list(LINEAR_NAMES), min_length=1,
                                      description="decoder linears that get LoRA (names inside a layer)")
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0, description="LoRA scale = alpha / rank")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    steps: int = Field(200, ge=1)
    tokens: int | None = Field(None, ge=1, description="train on this many tokens (overrides steps)")
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=8)
    warmup_steps: int = Field(20, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    gradient_checkpointing: bool = True
    merge: bool = Field(True, description="merge the adapter into the weights (else export it in adapter/)")
    eval_before: bool = Field(True, description="measure perplexity before training (the report's 'before')")
    rank_allocation: Literal["uniform", "importance", "inverse"] = "uniform"
    min_rank: int = Field(2, ge=1)
    max_rank: int = Field(64, ge=1)
    importance_temperature: float = Field(6.5, gt=0, description="sigmoid temperature of the layer importance")

    @model_validator(mode="after")
    def _check(self):
        unknown = [name for name in self.target_modules if name not in LINEAR_NAMES]
        if unknown:
            raise ValueError(f"unknown target module {unknown[0]!r}; choose among {', '.join(LINEAR_NAMES)}")
        if self.min_rank > self.max_rank:
            raise ValueError(f"min_rank {self.min_rank} > max_rank {self.max_rank}")
        return self

    @property
    def total_steps(self) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))
        return self.steps


def recovery_text(data: RecoveryDataConfig, eos: str | None) -> str:
    """The training text: plain text, or instruction records formatted by the template and joined by EOS."""
    from calibration.data import read_records, read_source_text

    if data.template is None:
        return read_source_text(data, key="data", role="train")
    if data.source in ("text", "builtin"):
        raise UserError("recovery data.template formats records: use data.source=jsonl or hf")
    texts = []
    for where, record in read_records(data.source, data.path, data.dataset, data.dataset_config, data.split, "data"):
        try:
            texts.append(data.template.format_map(record))
        except KeyError as err:
            raise UserError(f"{where} has no field {err} used by data.template") from None
    return (eos or "\n\n").join(texts)


def layer_ranks(importance: list[float], config: LoraConfig) -> list[int]:
    """LoRA rank per layer following the importance (mean = `rank`, within [min_rank, max_rank])."""
    from compress.methods.cfsp import importance_weights

    weights = importance_weights(torch.tensor(importance, dtype=torch.float64), config.importance_temperature)
    if config.rank_allocation == "inverse":
        weights = 2 * weights.mean() - weights
    ranks = (config.rank * weights / weights.mean()).round().clamp(config.min_rank, config.max_rank)
    return [int(r) for r in ranks]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@register
class LoraRecovery(Method):
    name = "lora"
    Config = LoraConfig
    prunes = False

    def run(self, ctx: StageContext) -> dict:
        from accelerate import Accelerator
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model, get_peft_model_state_dict

        from calibration.data import sample_windows, tokenize_text
        from compress.ops.masks import follows_nm, parse_pattern

        cfg, adapter = self.config, ctx.adapter
        model = adapter.model
        if adapter.offload_store is not None and any(is_offloaded(layer) for layer in adapter.layers()):
            raise UserError("the lora stage trains the whole model at once: it needs every layer in memory or on a "
                            "GPU, not on disk; drop max_memory/device_map for this recipe or export first and "
                            "fine-tune the checkpoint on a larger machine")
        if ctx.tokenizer is None:
            raise UserError("the lora stage needs the model's tokenizer")
        steps = cfg.total_steps
        if cfg.data.source == "calibration":  # e.g. calibration=self: the windows the model wrote, end to end
            ids = ctx.windows.flatten()
        else:
            ids = tokenize_text(ctx.tokenizer, recovery_text(cfg.data, ctx.tokenizer.eos_token))
        windows = sample_windows(ids, steps * cfg.batch_size, cfg.seq_len, cfg.seed)
        details: dict = {"steps": steps, "tokens": steps * cfg.batch_size * cfg.seq_len}

        earlier = [stage["config"] for stage in ctx.previous]
        patterns = sorted({nm for c in earlier if "pattern" in c for nm in [parse_pattern(c["pattern"])] if nm})
        masked = any("pattern" in c for c in earlier)
        linears = {f"layers.{i}.{name}": linear for i, layer in enumerate(adapter.layers())
                   for name, linear in adapter.decoder_linears(layer).items()}
        masks = {key: linear.weight != 0 for key, linear in linears.items()} if masked and cfg.merge else {}

        if cfg.eval_before and ctx.evaluate is not None:
            details["ppl_before"] = ctx.evaluate("before recovery")
            ctx.log(f"ppl before recovery {details['ppl_before']:.2f}")

        rank_pattern, alpha_pattern = {}, {}
        if cfg.rank_allocation != "uniform":
            importance = next((s["block_importance"] for s in reversed(ctx.previous) if "block_importance" in s), None)
            if importance is None:
                from compress.methods.cfsp import measure_block_importance
                importance = measure_block_importance(ctx)
            ranks = layer_ranks(importance, cfg)
            details["layer_ranks"] = ranks
            for index, rank in enumerate(ranks):
                for name in adapter.decoder_linears(adapter.layers()[index]):
                    if name.rsplit(".", 1)[-1] in cfg.target_modules:
                        key = rf"layers\.{index}\.{name.replace('.', chr(92) + '.')}"
                        rank_pattern[key] = rank
                        alpha_pattern[key] = cfg.alpha * rank / cfg.rank  # same scale alpha/rank everywhere

        torch.manual_seed(cfg.seed)
        peft_config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                     target_modules=list(cfg.target_modules), rank_pattern=rank_pattern,
                                     alpha_pattern=alpha_pattern, bias="none", task_type="CAUSAL_LM")
        was_training = model.training
        peft_model = get_peft_model(model, peft_config)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        details["trainable_params"] = trainable
        ctx.log(f"LoRA: {trainable:,} trainable parameters, {steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens")
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        parameters = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, steps))
        # One process: plain training. Under `accelerate launch`: data-parallel, each process takes
        # its share of every batch and gradients are averaged (same updates as one big process).
        accelerator = Accelerator(cpu=on_cpu())
        world, rank = accelerator.num_processes, accelerator.process_index
        if cfg.batch_size % world:
            raise UserError(f"recovery batch_size {cfg.batch_size} must be a multiple of the {world} processes")
        train_model, optimizer = accelerator.prepare(peft_model, optimizer)
        device = accelerator.device
        losses: list[float] = []
        bar = ctx.make_bar("recovery", steps, "step") if ctx.make_bar and accelerator.is_main_process else None
        start = time.perf_counter()
        train_model.train()
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(windows), generator=generator)
        try:
            for step in range(steps):
                batch = windows[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]][rank::world].to(device)
                loss = train_model(input_ids=batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise UserError(f"recovery loss became {loss.item()} at step {step}; lower learning_rate "
                                    f"(now {cfg.learning_rate:g}) or run in float32")
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(parameters, cfg.max_grad_norm)
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
            if cfg.gradient_checkpointing:
                model.activation_checkpointing_disable()
        seconds = time.perf_counter() - start
        window = max(1, min(10, steps // 4))
        details.update({
            "train_seconds": seconds,
            "tokens_per_second": steps * cfg.batch_size * cfg.seq_len / seconds,
            "loss_first": sum(losses[:window]) / window,
            "loss_last": sum(losses[-window:]) / window,
            "loss_curve": [round(sum(losses[i:i + window]) / len(losses[i:i + window]), 4)
                           for i in range(0, steps, window)],
        })
        peft_model = accelerator.unwrap_model(train_model)
        peft_model.eval()
        if cfg.merge:
            peft_model.merge_and_unload()
        else:
            from safetensors.torch import save

            state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
            if ctx.evaluate is not None:
                details["ppl_with_adapter"] = ctx.evaluate("with adapter")
            config = peft_model.peft_config["default"]
            ctx.artifacts["adapter/adapter_model.safetensors"] = save(state)
            ctx.artifacts["adapter/adapter_config.json"] = _adapter_config_json(config)
            peft_model.unload()
            details["adapter"] = "adapter/"
        model.train(was_training)

        if masks:
            with torch.no_grad():
                for key, linear in linears.items():
                    linear.weight.mul_(masks[key].to(linear.weight.dtype))
            exempt = {key for stage in ctx.previous for key in stage.get("untouched_no_calibration_tokens", [])}
            for key, linear in linears.items():
                if key in exempt:
                    continue
                for n, m in patterns:
                    if not follows_nm(linear.weight, n, m):
                        raise RuntimeError(f"{key} lost its {n}:{m} pattern after recovery")
            details["masks_reapplied"] = True
            details["patterns_verified"] = [f"{n}:{m}" for n, m in patterns]
        return details


def _adapter_config_json(config) -> str:
    import json

    values = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    values["base_model_name_or_path"] = ".."  # the checkpoint folder this adapter sits in
    return json.dumps(values, indent=2, sort_keys=True, default=str) + "\n"
