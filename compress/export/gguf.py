"""`compress gguf OUT`: a compress export of a Llama-family model as one GGUF file for llama.cpp.

Uniform exports become llama.cpp's `llama` architecture. Per-layer ones become `deci`, whose graph
reads the query heads, KV heads and FFN width of every layer from arrays
(`deci.attention.head_count`, `deci.attention.head_count_kv`, `deci.feed_forward_length`), so the
kept heads and channels of FLAP, CFSP, Wanda-sp or Týr load as they are, whole KV groups removed
included. Refused before anything is written: q/k norms (Qwen3, Gemma 3), Gemma's embedding scale and
soft-capping, biases on q/k/v or gate/up that are not zero (not written yet), ARMOR's factorized
linears, mixture-of-experts layers, RoPE scaling, and MLP activations other than SiLU.

FLAP's compensation biases live where llama.cpp has optional tensors: `blk.N.attn_output.bias`
and `blk.N.ffn_down.bias` (both graphs add them); nothing is folded or dropped. Two corner cases are
padded exactly: a layer whose MLP lost every channel gets one zero channel (llama.cpp's deci graph
skips the rest of a layer whose FFN width is 0, attention output included), and a layer whose
attention lost every head gets one zero head (a head-free deci layer loads no attention tensors, so
it would drop an output bias, and a head-free first layer would size every layer's heads at 0).
Zero weights give zero outputs: the padding changes no logit.

q and k are permuted from the Hugging Face half-split rotary layout to llama.cpp's interleaved one,
per head, as llama.cpp's own converter does. The tokenizer is written with the `gguf` package's
byte-level BPE vocabulary (SmolLM, Llama 3; SentencePiece-style tokenizers are refused for now),
special tokens typed CONTROL; llama.cpp's pre-tokenizer name is read from tokenizer.json's rules
(`PRE_TOKENIZERS`) or given with `--pre`. Mistral's sliding window is not written (a note says so).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from compress.errors import UserError
from compress.export.hub import verified_export

LLAMA_FAMILY = ("llama", "mistral")
DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
# tokenizer.json's pre-tokenizer rules -> llama.cpp's name for them (src/llama-vocab.cpp)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_BYTES = "ByteLevel(use_regex=True,add_prefix_space=False)"  # the GPT-2 regex, then bytes
PRE_TOKENIZERS = {
    GPT2_BYTES: "gpt-2",  # SmolLM2's tokenizer as transformers rebuilds it from GGUF
    f"Digits(individual_digits=True)+{GPT2_BYTES}": "smollm",  # SmolLM's original: every digit apart first
    f"Split({LLAMA3_SPLIT})+ByteLevel(use_regex=False,add_prefix_space=False)": "llama-bpe",
}


def _pre_tokenizer_key(tokenizer: dict) -> str:
    """tokenizer.json's pre-tokenizer rules with the options that change the split: `Digits(...)+ByteLevel(...)`."""
    rule = tokenizer.get("pre_tokenizer") or {}
    parts = rule.get("pretokenizers", [rule]) if rule.get("type") == "Sequence" else [rule]
    names = []
    for part in parts:
        kind = part.get("type")
        if kind == "Split":
            names.append(f"Split({(part.get('pattern') or {}).get('Regex', '')})")
        elif kind == "ByteLevel":
            names.append(f"ByteLevel(use_regex={part.get('use_regex', True)},"
                         f"add_prefix_space={part.get('add_prefix_space', False)})")
        elif kind == "Digits":
            names.append(f"Digits(individual_digits={part.get('individual_digits', False)})")
        elif kind:
            names.append(kind)
    return "+".join(names)


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half q/k rows -> the interleaved pairs llama.cpp's NORM rope expects."""
    if heads == 0:
        return weight
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _refuse(config: dict, base: str) -> None:
    if base not in LLAMA_FAMILY:
        raise UserError(f"GGUF export covers Llama-family models ({', '.join(LLAMA_FAMILY)}); this one is {base!r}. "
                        f"llama.cpp's per-layer `deci` graph has no q/k norms (Qwen3, Gemma 3) and a hidden-sized "
                        f"q bias (Qwen2 after head removal)")
    if config.get("compress_factorized"):
        raise UserError("ARMOR's factorized linears have no GGUF tensor type; export ARMOR to transformers only")
    if config.get("num_local_experts") or config.get("num_experts"):
        raise UserError("mixture-of-experts exports are not written as GGUF yet (llama.cpp's deci graph is dense)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    scaling = rope.get("rope_type", rope.get("type", "default"))
    if scaling != "default":
        raise UserError(f"RoPE scaling {scaling!r} is not written to GGUF yet; only unscaled RoPE")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {config['hidden_act']!r}: llama.cpp's llama/deci graphs gate the MLP with SiLU")


def _padded(name: str, tensor: torch.Tensor, layer: dict, head_dim: int) -> torch.Tensor:
    """One zero head / one zero channel where a block lost all of them (see the module docstring)."""
    if layer.get("pad_ff") and name.endswith(("gate_proj.weight", "up_proj.weight")):
        return torch.zeros(1, tensor.shape[1])
    if layer.get("pad_ff") and name.endswith("down_proj.weight"):
        return torch.zeros(tensor.shape[0], 1)
    if layer.get("pad_head") and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return torch.zeros(head_dim, tensor.shape[1])
    if layer.get("pad_head") and name.endswith("o_proj.weight"):
        return torch.zeros(tensor.shape[0], head_dim)
    return tensor


def _add_tokenizer(writer, folder: Path, vocab_size: int, pre: str | None) -> str:
    """GPT-2-style byte-level BPE (merges, pre-tokenizer name, special tokens typed CONTROL as llama.cpp's
    own converter types them, so `<|im_start|>` in a chat template stays one token)."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json; GGUF needs the tokenizer's vocabulary")
    tokenizer = json.loads(path.read_text())
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style (byte fallback)" if model.get("byte_fallback") else repr(model.get("type"))
        raise UserError(f"a {kind} tokenizer is not written to GGUF yet (byte-level BPE only: SmolLM, Llama 3); "
                        f"use llama.cpp's convert_hf_to_gguf.py on a uniform export")
    key = _pre_tokenizer_key(tokenizer)
    pre = pre or PRE_TOKENIZERS.get(key)
    if pre is None:
        raise UserError(f"tokenizer.json's pre-tokenizer ({key[:100]}) has no known llama.cpp name; give it with "
                        f"--pre NAME (the names are in llama.cpp's src/llama-vocab.cpp)")
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"tokenizer.json cannot be read as byte-level BPE: {err}") from None
    added = {item["content"]: item.get("special", False) for item in tokenizer.get("added_tokens", [])}
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        name = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        if name in added:  # added tokens, in the base vocabulary or after it
            kind = gguf.TokenType.CONTROL if added[name] else gguf.TokenType.USER_DEFINED
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the embedding only {vocab_size} rows")
    while len(tokens) < vocab_size:  # embedding rows past the tokenizer's vocabulary
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return pre


def write_gguf(folder: Path, output: Path | None = None, dtype: str = "f16", pre: str | None = None,
               overwrite: bool = False, log=print) -> dict:
    """Write `output` (default FOLDER/model-DTYPE.gguf) from a verified compress export; returns a summary."""
    import gguf
    from safetensors import safe_open

    folder = Path(folder)
    verified_export(folder)
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)} (quantize afterwards with llama.cpp's "
                        f"llama-quantize)")
    output = Path(output) if output else folder / f"model-{dtype}.gguf"
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it")
    config = json.loads((folder / "config.json").read_text())
    per_layer = "per_layer_config" in config
    base = (config.get("compress_base") or {}).get("model_type", config["model_type"]) if per_layer else \
        config["model_type"]
    _refuse(config, base)
    files = sorted(folder.glob("*.safetensors"))
    handles = {}
    for file in files:
        handle = safe_open(str(file), framework="pt")
        handles.update({name: handle for name in handle.keys()})
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    shapes = [{key: handles[f"model.layers.{i}.{path}"].get_slice(f"model.layers.{i}.{path}").get_shape()[0]
               for key, path in (("heads", "self_attn.q_proj.weight"), ("kv_heads", "self_attn.k_proj.weight"),
                                 ("ff", "mlp.gate_proj.weight"))} for i in range(layers)]
    for shape in shapes:
        shape["heads"] //= head_dim
        shape["kv_heads"] //= head_dim
    for name, handle in handles.items():  # biases llama.cpp cannot place must be zero
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias")):
            if handle.get_tensor(name).count_nonzero():
                raise UserError(f"{name} is not zero; this exporter writes output biases only (FLAP's), GGUF not "
                                f"written")
    for i, shape in enumerate(shapes):
        if shape["ff"] == 0:
            shape["pad_ff"], shape["ff"] = True, 1
        if shape["heads"] == 0:  # deci creates no attention tensors then, and layer 0's would size every head
            shape["pad_head"], shape["heads"], shape["kv_heads"] = True, 1, 1
    uniform = not per_layer and len({(s["heads"], s["kv_heads"], s["ff"]) for s in shapes}) == 1
    arch = gguf.MODEL_ARCH.LLAMA if uniform else gguf.MODEL_ARCH.DECI
    names = gguf.get_tensor_name_map(arch, layers)
    qtype = getattr(gguf.GGMLQuantizationType, DTYPES[dtype])

    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)  # tensors spill to disk
    try:
        writer.add_name(folder.name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(layers)
        pick = (lambda key: shapes[0][key]) if uniform else (lambda key: [s[key] for s in shapes])
        writer.add_feed_forward_length(pick("ff"))
        writer.add_head_count(pick("heads"))
        writer.add_head_count_kv(pick("kv_heads"))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        rope = config.get("rope_parameters") or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
        pre = _add_tokenizer(writer, folder, config["vocab_size"], pre)
        written = 0
        for name in handles:
            if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            stem, _, suffix = name.rpartition(".")
            target = names.get_name(stem)
            if target is None:
                raise UserError(f"{name} has no GGUF tensor name in the {gguf.MODEL_ARCH_NAMES[arch]} architecture")
            tensor = handles[name].get_tensor(name).float()
            if suffix == "bias" and stem.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                continue  # zero (checked above)
            layer = shapes[int(name.split(".")[2])] if name.startswith("model.layers.") else {}
            tensor = _padded(name, tensor, layer, head_dim)
            if stem.endswith("q_proj"):
                tensor = _permute(tensor, layer["heads"])
            elif stem.endswith("k_proj"):
                tensor = _permute(tensor, layer["kv_heads"])
            array = tensor.numpy()
            if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                writer.add_tensor(f"{target}.{suffix}", gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(f"{target}.{suffix}", array)
            written += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        partial.replace(output)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    window = config.get("sliding_window")
    if window and window < config.get("max_position_embeddings", 0):
        log(f"note: the sliding window ({window} tokens) is not in the GGUF: llama.cpp's "
            f"{gguf.MODEL_ARCH_NAMES[arch]} graph attends to the whole context, as its own converter writes Mistral")
    summary = {"path": str(output), "architecture": gguf.MODEL_ARCH_NAMES[arch], "dtype": dtype, "tensors": written,
               "bytes": output.stat().st_size, "pre_tokenizer": pre,
               "padded_layers": [i for i, s in enumerate(shapes) if s.get("pad_ff") or s.get("pad_head")]}
    log(f"wrote {output} ({summary['architecture']}, {dtype}, {summary['bytes'] / 2**20:.1f} MiB)")
    return summary
