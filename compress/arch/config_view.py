"""A model's config.json read before any weight is loaded, for the checks a recipe can fail early.

`ConfigView(None)` (a GGUF file, a built-in model not fetched yet) knows nothing, and every check
that needs a figure passes.
"""

from __future__ import annotations

from compress.errors import UserError


class ConfigView:
    def __init__(self, config: dict | None):
        self.config = config
        self.text = (config or {}).get("text_config", config or {})  # multimodal configs nest the LM's

    @property
    def known(self) -> bool:
        return self.config is not None

    @property
    def experts(self) -> int:
        """Experts per MoE layer (1 for a dense model, or when unknown)."""
        return int(self.text.get("num_local_experts") or self.text.get("num_experts") or 1)

    @property
    def is_moe(self) -> bool:
        """The config names more than one expert per layer (False when unknown)."""
        return self.experts > 1

    def check_context_length(self, key: str, length: int) -> None:
        limit = self.text.get("max_position_embeddings")
        if isinstance(limit, int) and length > limit:
            raise UserError(f"{key}={length} is longer than the model's context ({limit} positions); "
                            f"set {key}={min(limit, 2048)} or less")

    def input_widths(self) -> dict[str, int | None]:
        """The widths a linear's input can have: hidden size, MLP (and expert) width, head size."""
        text = self.text
        heads = text.get("num_attention_heads")
        head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads if heads else 0)
        return {"hidden_size": text.get("hidden_size"), "intermediate_size": text.get("intermediate_size"),
                "moe_intermediate_size": text.get("moe_intermediate_size"), "head_dim": head_dim or None}

    def mlp_share(self) -> float | None:
        """The MLPs' share of the decoder-linear parameters (every expert counted), or None if unknown."""
        text = self.text
        try:
            hidden = int(text["hidden_size"])
            # MoE: every expert's MLP counts (a mixed model's dense layers are not; the stage re-checks when loaded)
            experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
            inter = experts * int(text.get("moe_intermediate_size") or text["intermediate_size"])
            heads, kv = (int(text["num_attention_heads"]),
                         int(text.get("num_key_value_heads") or text["num_attention_heads"]))
            head_dim = int(text.get("head_dim") or hidden // heads)
        except (KeyError, TypeError, ValueError):
            return None
        mlp = 3 * hidden * inter
        return mlp / (mlp + 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim)
