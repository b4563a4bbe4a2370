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
import re
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from calibration.data import check_not_eval_text, read_records, read_source_text, sample_windows, tokenize_text
from calibration.stats import measure_block_importance
from compress.arch.base import Adapter, known_linear_names
from compress.config import DataSource, StageConfig
from compress.errors import UserError
from compress.methods.base import Method, StageContext
from compress.methods.registry import register
from compress.model.offload import is_offloaded
from compress.ops.allocation import importance_weights
from compress.ops.masks import MaskSnapshot
from compress.ops.training import lora_targets, train


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
    target_modules: list[str] = Field(list(Adapter.linear_names()), min_length=1,
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
        names = known_linear_names()
        unknown = [name for name in self.target_modules if name not in names]
        if unknown:
            raise ValueError(f"unknown target module {unknown[0]!r}; choose among {', '.join(names)}")
        if self.min_rank > self.max_rank:
            raise ValueError(f"min_rank {self.min_rank} > max_rank {self.max_rank}")
        return self

    def check_model(self, view, number: int, recipe) -> None:
        """The training data exists, is not the evaluation text, and its windows fit the model's context."""

        view.check_context_length(f"stages.{number}.seq_len", self.seq_len)
        data = self.data
        if data.source == "hf":
            if not data.dataset:
                raise UserError(f"stages.{number}.data.source=hf needs stages.{number}.data.dataset=NAME")
            return
        if data.source == "calibration":
            return
        if data.source in ("text", "jsonl") and (not data.path or not Path(data.path).expanduser().is_file()):
            raise UserError(f"recovery data file not found: {data.path}; set stages.{number}.data.path=FILE "
                            f"or stages.{number}.data.name=wikitext2 (shipped)")
        check_not_eval_text(data, f"stages.{number}.data", "train", recipe.eval)
        if data.template is not None and data.source in ("text", "builtin"):
            raise UserError(f"stages.{number}.data.template formats records: set data.source=jsonl or hf")

    @property
    def total_steps(self) -> int:
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))
        return self.steps


def recovery_text(data: RecoveryDataConfig, eos: str | None) -> str:
    """The training text: plain text, or instruction records formatted by the template and joined by EOS."""

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

    weights = importance_weights(torch.tensor(importance, dtype=torch.float64), config.importance_temperature)
    if config.rank_allocation == "inverse":
        weights = 2 * weights.mean() - weights
    ranks = (config.rank * weights / weights.mean()).round().clamp(config.min_rank, config.max_rank)
    return [int(r) for r in ranks]


@register
class LoraRecovery(Method):
    name = "lora"
    Config = LoraConfig
    prunes = False

    def check_trainable(self, ctx: StageContext) -> None:
        """The model can be trained here: every layer in memory (not offloaded to disk), a tokenizer."""
        adapter = ctx.adapter
        if adapter.offload_store is not None and any(is_offloaded(layer) for layer in adapter.layers()):
            raise UserError(f"the {self.name} stage trains the whole model at once: it needs every layer in memory "
                            f"or on a GPU, not on disk; drop max_memory/device_map for this recipe or export first "
                            f"and fine-tune the checkpoint on a larger machine")
        if ctx.tokenizer is None:
            raise UserError(f"the {self.name} stage needs the model's tokenizer")

    def run(self, ctx: StageContext) -> dict:
        cfg, adapter = self.config, ctx.adapter
        self.check_trainable(ctx)
        missing = [name for name in cfg.target_modules if name not in adapter.linear_names()]
        if missing:
            raise UserError(f"stages: lora target module {missing[0]!r} is not a decoder linear of this model; "
                            f"its decoder linears are {', '.join(adapter.linear_names())}")
        steps = cfg.total_steps
        windows = training_windows(cfg, ctx)
        details: dict = {"steps": steps, "tokens": steps * cfg.batch_size * cfg.seq_len}
        masks = None
        if cfg.merge and any(stage.masks_weights for stage in ctx.previous):
            masks = MaskSnapshot(adapter, sorted({s.pattern for s in ctx.previous if s.pattern is not None}),
                                 {key for stage in ctx.previous for key in stage.untouched})
        if cfg.eval_before and ctx.evaluate is not None:
            details["ppl_before"] = ctx.evaluate("before recovery")
            ctx.log(f"ppl before recovery {details['ppl_before']:.2f}")

        model, was_training = adapter.model, adapter.model.training
        peft_model = self.peft_model(ctx, details)
        ctx.log(f"LoRA: {details['trainable_params']:,} trainable parameters, {steps} steps x {cfg.batch_size} x "
                f"{cfg.seq_len} tokens")
        result = self.train(peft_model, windows, ctx)
        details.update(result.summary(details["tokens"]))
        self.merge_or_export(result.model, ctx, details)
        model.train(was_training)
        if masks is not None:
            verified = masks.restore()
            details["masks_reapplied"] = True
            details["patterns_verified"] = verified
        return details

    def train(self, peft_model, windows: torch.Tensor, ctx: StageContext, on_gradients=None):
        """The stage's fine-tune of `peft_model` (`compress.ops.training.train`), with gradient
        checkpointing on for its duration if the config asks for it."""
        cfg, model = self.config, ctx.adapter.model
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        try:
            return train(peft_model, windows, steps=cfg.total_steps, batch_size=cfg.batch_size,
                         learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                         warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
                         make_bar=ctx.make_bar, on_gradients=on_gradients)
        finally:
            if cfg.gradient_checkpointing:
                model.activation_checkpointing_disable()

    def peft_model(self, ctx: StageContext, details: dict):
        """The model with LoRA adapters on the target linears (per-layer ranks for rank_allocation)."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        cfg, adapter = self.config, ctx.adapter
        modules, banks = lora_targets(adapter, cfg.target_modules, cfg.dropout, details, ctx.log)
        rank_pattern, alpha_pattern = {}, {}
        if cfg.rank_allocation != "uniform":
            importance = next((s.block_importance for s in reversed(ctx.previous) if s.block_importance is not None),
                              None)
            if importance is None:
                importance = measure_block_importance(ctx.new_capture(1))
            ranks = layer_ranks(importance, cfg)
            details["layer_ranks"] = ranks
            for index, rank in enumerate(ranks):
                layer = adapter.layers()[index]
                names = [name for name in adapter.decoder_linears(layer)
                         if ".experts." not in name and name.rsplit(".", 1)[-1] in modules]
                if adapter.experts(layer) is not None:
                    names += [f"{adapter.mlp_name}.{bank}" for bank in banks]
                for name in names:
                    key = rf"layers\.{index}\.{re.escape(name)}"
                    fused = 2 if name.endswith("gate_up_proj") else 1
                    rank_pattern[key] = rank * fused
                    alpha_pattern[key] = cfg.alpha * rank * fused / cfg.rank  # same scale alpha/rank everywhere
        if "experts.gate_up_proj" in banks:  # gate and up fused: rank r for each, as two adapters would have
            rank_pattern[r".*\.gate_up_proj"] = 2 * cfg.rank
            alpha_pattern[r".*\.gate_up_proj"] = 2 * cfg.alpha
        torch.manual_seed(cfg.seed)
        peft_config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                     target_modules=modules, target_parameters=banks or None,
                                     rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, bias="none",
                                     task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            # peft checks rank/alpha patterns against modules only; the expert banks' patterns do apply (the
            # trainable-parameter count is pinned in tests/test_moe.py)
            warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys did not match",
                                    RuntimeWarning)
            peft_model = get_peft_model(adapter.model, peft_config)
        details["trainable_params"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        return peft_model

    def merge_or_export(self, peft_model, ctx: StageContext, details: dict) -> None:
        """Fold the adapter into the weights, or keep the weights and export the adapter in adapter/."""
        from peft import get_peft_model_state_dict

        peft_model.eval()
        if self.config.merge:
            peft_model.merge_and_unload()
            return
        from safetensors.torch import save

        state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
        if ctx.evaluate is not None:
            details["ppl_with_adapter"] = ctx.evaluate("with adapter")
        ctx.artifacts["adapter/adapter_model.safetensors"] = save(state)
        ctx.artifacts["adapter/adapter_config.json"] = _adapter_config_json(peft_model.peft_config["default"])
        peft_model.unload()
        details["adapter"] = "adapter/"


def training_windows(cfg: LoraConfig, ctx: StageContext) -> torch.Tensor:
    """`steps x batch_size` windows of `seq_len` tokens from the stage's data, at seeded offsets."""

    if cfg.data.source == "calibration":  # e.g. calibration=self: the windows the model wrote, end to end
        ids = ctx.windows.flatten()
    else:
        ids = tokenize_text(ctx.tokenizer, recovery_text(cfg.data, ctx.tokenizer.eos_token))
    return sample_windows(ids, cfg.total_steps * cfg.batch_size, cfg.seq_len, cfg.seed)


def _adapter_config_json(config) -> str:
    import json

    values = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    values["base_model_name_or_path"] = ".."  # the checkpoint folder this adapter sits in
    return json.dumps(values, indent=2, sort_keys=True, default=str) + "\n"
