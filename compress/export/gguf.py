"""`compress gguf OUT`: a compress export of a Llama-family model as one GGUF file for llama.cpp.

Uniform exports become llama.cpp's `llama` architecture. Per-layer ones become `deci`, whose graph
reads the query heads, KV heads and FFN width of every layer from arrays
(`deci.attention.head_count`, `deci.attention.head_count_kv`, `deci.feed_forward_length`), so the
kept heads and channels of FLAP, CFSP, Wanda-sp or Týr load as they are, whole KV groups removed
included. What the two graphs cannot hold is refused before anything is written: q/k norms (Qwen3,
Gemma 3), Gemma's embedding scale and soft-capping, biases on q/k/v or gate/up that are not zero,
ARMOR's factorized linears, mixture-of-experts layers, and RoPE scaling other than none.

FLAP's compensation biases live where llama.cpp has optional tensors: `blk.N.attn_output.bias`
and `blk.N.ffn_down.bias` (both graphs add them); nothing is folded or dropped. Two corner cases are
padded exactly: a layer whose MLP lost every channel gets one zero channel (llama.cpp's deci graph
skips the rest of a layer whose FFN width is 0, attention output included), and a layer whose
attention lost every head but keeps an output bias gets one zero head (a head-free deci layer has no
attention output, so it would drop the bias). Zero weights give zero outputs: the padding changes
no logit.

q and k are permuted from the Hugging Face half-split rotary layout to llama.cpp's interleaved one,
per head, as llama.cpp's own converter does. The tokenizer is written with the `gguf` package's
vocabularies (GPT-2 byte-level BPE, or SentencePiece-style BPE with byte fallback); the
pre-tokenizer name is read from tokenizer.json's rules (`PRE_TOKENIZERS`) or given as `pre=`.
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
PRE_TOKENIZERS = {
    "ByteLevel": "gpt-2",  # the GPT-2 regex alone (SmolLM2's tokenizer as transformers rebuilds it from GGUF)
    "Digits+ByteLevel": "smollm",  # SmolLM's original: every digit apart, then the GPT-2 regex
    f"Split:{LLAMA3_SPLIT}+ByteLevel": "llama-bpe",
}


def _pre_tokenizer_key(tokenizer: dict) -> str:
    rule = tokenizer.get("pre_tokenizer") or {}
    parts = rule.get("pretokenizers", [rule]) if rule.get("type") == "Sequence" else [rule]
    names = []
    for part in parts:
        if part.get("type") == "Split":
            names.append(f"Split:{(part.get('pattern') or {}).get('Regex', '')}")
        elif part.get("type"):
            names.append(part["type"])
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
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"RoPE scaling {rope.get('rope_type')!r} is not written to GGUF yet; only unscaled RoPE")


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
    import gguf

    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    model = tokenizer.get("model", {})
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        vocab = gguf.vocab.BpeVocab(folder)
        pre = pre or PRE_TOKENIZERS.get(_pre_tokenizer_key(tokenizer))
        if pre is None:
            raise UserError(f"tokenizer.json's pre-tokenizer ({_pre_tokenizer_key(tokenizer)[:80]}) has no known "
                            f"llama.cpp name; give it as pre=NAME (see llama.cpp's src/llama-vocab.cpp)")
    elif model.get("type") == "BPE":
        vocab, pre = gguf.vocab.LlamaHfVocab(folder), pre or "default"
    else:
        raise UserError(f"a {model.get('type')!r} tokenizer is not written to GGUF; BPE tokenizers only")
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    while len(tokens) < vocab_size:  # embedding rows past the tokenizer's vocabulary
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(
        writer, quiet=True)
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
                raise UserError(f"{name} is not zero and llama.cpp's graph has no place for it; GGUF not written")
    for i, shape in enumerate(shapes):
        if shape["ff"] == 0:
            shape["pad_ff"], shape["ff"] = True, 1
        if shape["heads"] == 0 and f"model.layers.{i}.self_attn.o_proj.bias" in handles:
            shape["pad_head"], shape["heads"], shape["kv_heads"] = True, 1, 1
    uniform = not per_layer and len({(s["heads"], s["kv_heads"], s["ff"]) for s in shapes}) == 1
    arch = gguf.MODEL_ARCH.LLAMA if uniform else gguf.MODEL_ARCH.DECI
    names = gguf.get_tensor_name_map(arch, layers)
    qtype = getattr(gguf.GGMLQuantizationType, DTYPES[dtype])

    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch])
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
        writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
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
