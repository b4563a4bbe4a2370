"""GGUF export for llama.cpp: uniform exports as `llama`, per-layer ones as `deci`, checked by running the
GGUF's tensors through a re-implementation of llama.cpp's graph (interleaved RoPE, per-layer head counts,
optional output biases) and comparing its logits with the export's. llama.cpp itself is run by
docs/gguf_check.py (it needs llama-cpp-python, which builds llama.cpp on install)."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import compress
from cli import app
from compress.errors import UserError
from compress.export.gguf import write_gguf
from tests.conftest import tiny_model, tiny_tokenizer

IDS = torch.tensor([5, 17, 42, 99, 3, 250, 7, 61, 128, 200, 11, 12])


def gguf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the GGUF the way llama.cpp's llama/deci graphs compute them (src/models/deci.cpp)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()

    def get(key):
        return reader.fields[f"{arch}.{key}"].contents()

    t = {x.name: torch.from_numpy(np.array(x.data)).float() for x in reader.tensors}
    layers = get("block_count")
    heads, kv_heads = ([v] * layers if isinstance(v, int) else v
                       for v in (get("attention.head_count"), get("attention.head_count_kv")))
    d, eps, base = get("attention.key_length"), get("attention.layer_norm_rms_epsilon"), get("rope.freq_base")
    steps = len(ids)
    angles = torch.arange(steps)[:, None] * base ** (-torch.arange(0, d, 2).float() / d)[None]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rope(v):  # [T, H, d]: llama.cpp's NORM rope rotates adjacent pairs
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)

    def norm(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight

    def linear(v, name):
        y = v @ t[f"{name}.weight"].T
        return y + t[f"{name}.bias"] if f"{name}.bias" in t else y

    mask = torch.full((steps, steps), float("-inf")).triu(1)
    x = t["token_embd.weight"][ids]
    for i in range(layers):
        p = f"blk.{i}."
        if heads[i]:
            h = norm(x, t[p + "attn_norm.weight"])
            q = rope(linear(h, p + "attn_q").view(steps, heads[i], d))
            k = rope(linear(h, p + "attn_k").view(steps, kv_heads[i], d)).repeat_interleave(heads[i] // kv_heads[i], 1)
            v = linear(h, p + "attn_v").view(steps, kv_heads[i], d).repeat_interleave(heads[i] // kv_heads[i], 1)
            weights = (torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5 + mask).softmax(-1)
            x = x + linear(torch.einsum("hqk,khd->qhd", weights, v).reshape(steps, -1), p + "attn_output")
        h = norm(x, t[p + "ffn_norm.weight"])
        x = x + linear(F.silu(linear(h, p + "ffn_gate")) * linear(h, p + "ffn_up"), p + "ffn_down")
    return norm(x, t["output_norm.weight"]) @ t.get("output.weight", t["token_embd.weight"]).T


def _export(model_dir, text_files, output, **stage):
    recipe = {"model": {"name": str(model_dir)},
              "calibration": {"source": "text", "path": str(text_files["calibration"]), "num_samples": 8,
                              "seq_len": 32},
              "stages": [{"method": "flap", "sparsity": 0.3, "round_to": 8, **stage}],
              "export": {"output": str(output)}, "eval": {"ppl": "none"}}
    return compress.run(recipe, progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def exports(tiny_model_dir, text_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    _export(tiny_model_dir, text_files, root / "per_layer")  # FLAP's compensation biases on o_proj and down_proj
    _export(tiny_model_dir, text_files, root / "uniform", uniform=True, compensation="none")
    return root


@pytest.mark.parametrize("kind", ["per_layer", "uniform"])
def test_the_gguf_computes_the_exports_logits(exports, kind, tmp_path):
    folder = exports / kind
    summary = write_gguf(folder, tmp_path / "model.gguf", dtype="f32", log=lambda _: None)
    assert summary["architecture"] == ("deci" if kind == "per_layer" else "llama")
    model = compress.load(folder)
    with torch.no_grad():
        expected = model(IDS[None]).logits[0]
    assert torch.allclose(gguf_logits(summary["path"], IDS), expected, atol=1e-4)
    config = json.loads((folder / "config.json").read_text())
    if kind == "per_layer":  # widths really vary, and the biases are there
        from gguf import GGUFReader

        reader = GGUFReader(summary["path"])
        widths = reader.fields["deci.feed_forward_length"].contents()
        assert widths == [config["per_layer_config"][str(i)]["intermediate_size"] for i in range(3)]
        assert len(set(widths)) > 1 and any(x.name.endswith("ffn_down.bias") for x in reader.tensors)


def test_the_tokenizer_travels_with_its_pre_tokenizer(exports, tmp_path):
    from gguf import GGUFReader

    summary = write_gguf(exports / "uniform", tmp_path / "model.gguf", log=lambda _: None)
    reader = GGUFReader(summary["path"])
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = tiny_tokenizer().get_vocab()
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2" == summary["pre_tokenizer"]
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert all(tokens[index] == text for text, index in vocab.items())
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == vocab["</s>"]
    assert reader.fields["tokenizer.ggml.merges"].contents()  # BPE merges, or llama.cpp cannot tokenize
    from gguf import TokenType

    types = reader.fields["tokenizer.ggml.token_type"].contents()  # special tokens stay whole in llama.cpp
    assert [types[vocab[t]] for t in ("<unk>", "<s>", "</s>")] == [TokenType.CONTROL] * 3
    assert types[vocab["Ġthe"]] == TokenType.NORMAL


def test_a_layer_without_mlp_channels_is_padded_with_one_zero_channel(exports, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(exports / "per_layer", folder)
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    for name in ("gate_proj", "up_proj"):
        weights[f"model.layers.1.mlp.{name}.weight"] = weights[f"model.layers.1.mlp.{name}.weight"][:0].contiguous()
    weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down_proj.weight"][:, :0].contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["per_layer_config"]["1"]["intermediate_size"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    summary = write_gguf(folder, dtype="f32", log=lambda _: None)
    assert summary["padded_layers"] == [1] and summary["path"] == str(folder / "model-f32.gguf")
    model = compress.load(folder)  # the down_proj bias alone is what layer 1's MLP adds
    with torch.no_grad():
        expected = model(IDS[None]).logits[0]
    assert torch.allclose(gguf_logits(summary["path"], IDS), expected, atol=1e-4)
    with pytest.raises(UserError, match="--overwrite"):
        write_gguf(folder, dtype="f32", log=lambda _: None)


def test_what_llama_cpp_cannot_hold_is_refused(exports, text_files, tmp_path):
    model_dir = tmp_path / "qwen3"
    tiny_model("qwen3").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    _export(model_dir, text_files, tmp_path / "qwen3_out")
    with pytest.raises(UserError, match="q/k norms"):
        write_gguf(tmp_path / "qwen3_out", log=lambda _: None)
    with pytest.raises(UserError, match="not a compress export"):
        write_gguf(tmp_path, log=lambda _: None)
    with pytest.raises(UserError, match="choose one of"):
        write_gguf(exports / "uniform", dtype="q4", log=lambda _: None)


def test_the_cli_writes_the_gguf(exports, tmp_path):
    result = CliRunner().invoke(app, ["gguf", str(exports / "uniform"), "--output", str(tmp_path / "m.gguf"),
                                      "--dtype", "f32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.gguf").is_file() and "llama" in result.output
    assert not list(tmp_path.glob(".*partial*"))
