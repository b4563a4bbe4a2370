"""Writing a pruned model as a folder that loads with `transformers`, and checking that it does.

* Uniform widths: the stock config of the architecture (heads, KV heads, MLP width updated;
  `attention_bias` / `mlp_bias` switched on if bias compensation added output biases, with zero
  biases materialised on the sibling projections) -> plain `from_pretrained`.
* Per-layer widths: the source config plus `per_layer_config`, `compress_output_biases` and an
  `auto_map` to the shipped `modeling_pruned.py` -> `from_pretrained(..., trust_remote_code=True)`,
  or `compress.load(folder)` without running any code from the folder.

The folder is written under a temporary name beside the target, reloaded, compared with the
in-memory model (max |logit difference| under a tolerance, in float32) and only then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from compress.arch import get_adapter
from compress.arch.base import Adapter
from compress.arch.moe import model_experts, routed_experts
from compress.errors import UserError
from compress.model.loading import load_pruned
from compress.model.modeling_pruned import PRUNED_PREFIX, FactorizedLinear, attach_zero_bias
from compress.model.offload import model_device, onloaded
from compress.ops.masks import follows_nm
from compress.workdir import fault_point

MODELING_FILE = Path(__file__).resolve().parent.parent / "model" / "modeling_pruned.py"


def check_output_dir(output: str | None, overwrite: bool, source: str | None = None) -> Path:
    """The output folder, checked: a non-empty one is replaced only with `overwrite`, and only if it is a
    compress checkpoint (never the current folder, home, an ancestor of either, or the model source)."""
    if not output:
        raise UserError("no output folder: add output=DIR")
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is a file; choose another output=DIR")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {path} is not empty; choose another output=DIR or add --overwrite")
        _check_replaceable(path, source)
    parent = path.parent if path.parent != Path("") else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"cannot write in {parent}; choose another output=DIR")
    return path


def _check_replaceable(path: Path, source: str | None) -> None:
    resolved = path.resolve()
    protected = {Path.cwd().resolve(): "the current folder", Path.home().resolve(): "your home folder"}
    for place, what in protected.items():
        if resolved == place or resolved in place.parents:
            raise UserError(f"--overwrite would delete {path}, which is {what} or holds it; choose another output=DIR")
    if source and Path(source).expanduser().exists():
        model = Path(source).expanduser().resolve()
        if resolved == model or resolved in model.parents:
            raise UserError(f"--overwrite would delete {path}, which holds the model being pruned; choose another "
                            f"output=DIR")
    if not ((path / "report.json").is_file() and (path / "config.json").is_file()):
        raise UserError(f"--overwrite replaces only a checkpoint written by compress, and {path} is not one (no "
                        f"report.json and config.json); empty it yourself or choose another output=DIR")


def layer_layout(adapter: Adapter) -> list[dict]:
    """Per-layer widths and which output projections carry a bias."""
    layout = []
    o_path, down_path = adapter.output_projection_paths()
    for layer in adapter.layers():
        widths = adapter.layer_widths(layer)
        widths["width_key"] = adapter.layer_width_key(layer)
        widths["output_biases"] = [
            path for path, linear in ((o_path, adapter.o_proj(layer)), (down_path, adapter.down_proj(layer)))
            if linear.bias is not None
        ]
        factorized = {name: module.block for name, module in layer.named_modules()
                      if isinstance(module, FactorizedLinear)}
        if factorized:  # ARMOR's linears: path -> block size
            widths["factorized"] = factorized
        layout.append(widths)
    return layout


def _materialize_biases(parent: nn.Module, names: list[str]) -> None:
    for name in names:
        attach_zero_bias(parent, name)


def _stock_config_possible(adapter: Adapter, layout: list[dict]) -> bool:
    if any(entry.get("factorized") for entry in layout):
        return False  # no stock class holds a factorized linear
    first = {k: v for k, v in layout[0].items()}
    if any({k: v for k, v in entry.items()} != first for entry in layout[1:]):
        return False
    config = adapter.config
    kinds = dict(zip(adapter.output_projection_paths(), ("attention", "mlp")))
    if any(kinds[path] not in adapter.bias_flags for path in first["output_biases"]):
        return False  # the stock config cannot give that projection a bias
    heads = first["num_attention_heads"]
    # LlamaConfig-style validators demand hidden_size % heads == 0 even with an explicit head_dim.
    return config.hidden_size % heads == 0 and heads % first["num_key_value_heads"] == 0


def _write_uniform(model, adapter: Adapter, layout: list[dict], folder: Path, max_shard_size: str) -> None:
    first = layout[0]
    config = model.config
    if first["output_biases"]:
        attention_bias = adapter.output_projection_paths()[0] in first["output_biases"]
        mlp_bias = adapter.output_projection_paths()[1] in first["output_biases"]

        for index, layer in enumerate(adapter.layers()):
            with adapter.onloaded(index):
                if attention_bias:
                    _materialize_biases(adapter.attention(layer), [adapter.q_name, adapter.k_name, adapter.v_name])
                if mlp_bias:
                    _materialize_biases(adapter.mlp(layer), [adapter.gate_name, adapter.up_name])
        for kind, needed in (("attention", attention_bias), ("mlp", mlp_bias)):
            if needed:
                setattr(config, adapter.bias_flags[kind], True)
    config.num_attention_heads = first["num_attention_heads"]
    config.num_key_value_heads = first["num_key_value_heads"]
    for key, value in first.get("experts", {}).items():  # MoE: the expert count and top-k left
        setattr(config, key, value)
    setattr(config, first["width_key"], first["intermediate_size"])
    if getattr(config, "head_dim", None) is None:
        config.head_dim = adapter.head_dim()
    model.save_pretrained(folder, max_shard_size=max_shard_size)


def _write_per_layer(model, adapter: Adapter, layout: list[dict], folder: Path, max_shard_size: str) -> None:
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["head_dim"] = adapter.head_dim()
    # MoE layers name their expert count and top-k only when some layer lost experts
    experts_vary = any(config.get(key) != value for entry in layout for key, value in entry.get("experts", {}).items())
    config["per_layer_config"] = {
        str(index): {"num_attention_heads": entry["num_attention_heads"],
                     "num_key_value_heads": entry["num_key_value_heads"],
                     entry["width_key"]: entry["intermediate_size"],
                     **(entry.get("experts", {}) if experts_vary else {})}
        for index, entry in enumerate(layout)
    }
    config["compress_output_biases"] = {
        str(index): entry["output_biases"] for index, entry in enumerate(layout) if entry["output_biases"]
    }
    factorized = {str(index): entry["factorized"] for index, entry in enumerate(layout) if entry.get("factorized")}
    if factorized:
        config["compress_factorized"] = factorized
    config["compress_base"] = {
        "module": adapter.transformers_module, "model_class": adapter.model_class, "config_class": adapter.config_class,
        "model_type": config["model_type"],
    }
    # not the stock type: transformers must never build the stock (dense-width) class from this config
    config["model_type"] = PRUNED_PREFIX + config["model_type"]
    config["auto_map"] = {
        "AutoConfig": "modeling_pruned.PrunedConfig",
        "AutoModelForCausalLM": "modeling_pruned.PrunedForCausalLM",
    }
    if not getattr(adapter, "is_moe", False):  # the decoder alone, which vLLM's Transformers backend builds (the
        # legacy per-expert keys of an MoE checkpoint are converted only on the causal-LM path of transformers 5)
        config["auto_map"]["AutoModel"] = "modeling_pruned.PrunedModel"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source = MODELING_FILE.read_text()
    for constant, value in (("BASE_MODULE", adapter.transformers_module), ("BASE_MODEL_CLASS", adapter.model_class),
                            ("BASE_CONFIG_CLASS", adapter.config_class)):
        source = _set_constant(source, constant, value)
    (folder / "modeling_pruned.py").write_text(source)


def _set_constant(source: str, name: str, value: str) -> str:
    lines = source.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(f"{name} = "):
            lines[i] = f'{name} = "{value}"\n'
            return "".join(lines)
    raise RuntimeError(f"constant {name} missing from {MODELING_FILE}")


def drop_tied_copies(model, folder: Path) -> None:
    """Remove tied weights that a disk-offloaded save wrote twice (it cannot see that they share storage)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = list(tied) if isinstance(tied, (dict, list, tuple)) else []
    if not getattr(model.config, "tie_word_embeddings", False) or not keys:
        return
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for key in keys:
        shard = index["weight_map"].get(key) if index else "model.safetensors"
        path = folder / shard if shard else None
        if path is None or not path.is_file():
            continue
        with safe_open(path, framework="pt") as handle:
            if key not in handle.keys():
                continue
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys() if name != key}
        save_file(tensors, path, metadata=metadata)
        if index:
            del index["weight_map"][key]
    if index:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


VERIFY_IDS = torch.randint(0, 1 << 30, (2, 64), generator=torch.Generator().manual_seed(1234))


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def reference_logits(model) -> torch.Tensor:
    """Logits of `model` in its own dtype (returned as float32) on a fixed random batch: the reload check's
    reference. Nothing is cast, so a half-precision model never needs a float32 copy (audit R9)."""
    ids = VERIFY_IDS % model.config.vocab_size
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model_device(model)), use_cache=False).logits.float().cpu()


def check_tolerance(tolerance: float, dtype: torch.dtype) -> float:
    """`tolerance` is for float32; a half-precision check allows the same number of ulps x 0.1 (bfloat16: 0.66,
    float16: 0.08): the reload runs the same weights in the same dtype, and a wrong weight or shape moves
    logits by far more."""
    if dtype == torch.float32 or not dtype.is_floating_point:
        return tolerance
    return tolerance * 0.1 * torch.finfo(dtype).eps / torch.finfo(torch.float32).eps


def max_logit_difference(expected: torch.Tensor, reloaded) -> float:
    return float((expected - reference_logits(reloaded)).abs().max())


def check_nm_patterns(model, patterns: tuple[tuple[int, int], ...], exempt: frozenset[str] = frozenset()) -> None:
    """Raise if any decoder linear of `model` breaks one of the N:M patterns (`exempt`: `layers.I.NAME` keys of
    linears left as they were, e.g. experts that received no calibration tokens)."""

    if not patterns:
        return

    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.layers()):
        with onloaded(layer, None, write_back=False):
            for name, linear in adapter.decoder_linears(layer).items():
                if f"layers.{index}.{name}" in exempt:
                    continue
                for n, m in patterns:
                    if not follows_nm(linear.weight, n, m):
                        raise RuntimeError(f"saved layers.{index}.{name} does not follow the {n}:{m} pattern; "
                                           f"nothing was written")


def remove_stale_staging(output: Path) -> None:
    """Clean up after earlier runs killed during export (their process is gone): delete their staging
    folders, and put an old checkpoint set aside for replacement back if the new one never arrived."""
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    for old in output.parent.glob(f".{output.name}.old-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not _process_alive(int(pid)):
            if output.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(output)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_checkpoint(model, tokenizer, adapter: Adapter, output: Path, *, overwrite: bool, max_shard_size: str,
                     finalize=None, verify: bool = True, tolerance: float = 1e-4, release_model: bool = False,
                     nm_patterns: tuple[tuple[int, int], ...] = (), placement: dict | None = None,
                     nm_exempt: frozenset[str] = frozenset()) -> dict:
    """Write, reload, compare, add `finalize(facts)` files (report, card), then move into place.

    `nm_patterns`: N:M patterns the decoder linears must follow; checked on the reloaded weights.

    With `release_model`, the in-memory model's weights are freed once written (after its
    reference logits are taken), so the reload does not hold two copies of the model.
    """

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    remove_stale_staging(output)
    shutil.rmtree(staging, ignore_errors=True)
    layout = layer_layout(adapter)
    stock = _stock_config_possible(adapter, layout)
    dtype = model_dtype(model)
    expected = reference_logits(model) if verify else None
    tolerance = check_tolerance(tolerance, dtype)
    try:
        if stock:
            _write_uniform(model, adapter, layout, staging, max_shard_size)
        else:
            _write_per_layer(model, adapter, layout, staging, max_shard_size)
        if hasattr(model, "hf_device_map"):
            drop_tied_copies(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        difference = None
        if release_model and not hasattr(model, "hf_device_map"):  # offloaded models hold little memory
            model.to("meta")
        if verify:
            reloaded = load_pruned(staging, dtype=dtype, **(placement or {}))
            # MoE: the reloaded experts run the same routed loop as the pruned model's (the stock grouped
            # forward rounds differently: 1.3e-4 on the logits of an 8-expert SmolLM2)
            with routed_experts(model_experts(get_adapter(reloaded))):
                difference = max_logit_difference(expected, reloaded)
            check_nm_patterns(reloaded, nm_patterns, nm_exempt)
            del reloaded
            if not difference < tolerance:
                raise RuntimeError(f"reloaded checkpoint differs from the pruned model: max |logit difference| "
                                   f"{difference:.3g} >= {tolerance:g} ({str(dtype).removeprefix('torch.')}); "
                                   f"nothing was written")
        facts = {"format": "stock" if stock else "per_layer", "reload_max_abs_logit_diff": difference,
                 "trust_remote_code_needed": not stock}
        if verify and nm_patterns:
            facts["nm_pattern_verified"] = [f"{n}:{m}" for n, m in nm_patterns]
            if nm_exempt:
                facts["nm_pattern_exempt"] = sorted(nm_exempt)  # left as they were (no calibration tokens)
        if finalize is not None:
            for name, content in finalize(facts).items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    target.write_text(content)
        aside = None
        if output.exists():
            if not overwrite and any(output.iterdir()):
                raise UserError(f"output folder {output} appeared while running; add --overwrite")
            aside = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(aside)  # the old checkpoint stays whole until the new one is in place
        fault_point("export:staged")
        staging.rename(output)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return facts
