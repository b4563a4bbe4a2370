"""The work folder that makes a run resumable after a kill.

A run writes its progress next to the output, in `.NAME.work/` (NAME = the output folder's name):

    fingerprint.json            what the progress belongs to (model, calibration, stages, code version)
    stage-0/layer-0007.safetensors   what stage 0 decided for layer 7 (scores, or the pruned layer)
    stage-0/hidden.safetensors  the calibration hidden states after the last finished layer
    stage-0/final-0007.safetensors   layer 7's decoder linears once stage 0 is complete
    stage-0/result.safetensors  the completion marker, with the stage's report details

Every file is written to a temporary name and renamed, so a kill leaves either the old file or
the new one, never half of one. Running the same command again finds the folder, checks the
fingerprint, and continues after the last finished layer; a different recipe starts afresh. The
folder is deleted once the checkpoint is exported. Safetensors only: nothing in it can run code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.model.loading import BUILTINS, cache_root


def recipe_fingerprint(recipe) -> str:
    """Hash of everything that decides the pruned weights (not evaluation, not the output path)."""
    data = recipe.model_dump(mode="json")
    relevant = {key: data[key] for key in ("model", "calibration", "stages")}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    digest.update(code_fingerprint().encode())  # progress made by other code is not reused
    digest.update(json.dumps(model_fingerprint(recipe.model.name), sort_keys=True).encode())
    digest.update(json.dumps(library_versions(), sort_keys=True).encode())
    digest.update(str(recipe.threads).encode())  # float results depend on the thread count
    return digest.hexdigest()[:24]


def model_fingerprint(name: str | None) -> dict:
    """What identifies the model's weights without reading them: for a local folder (or a cached
    built-in) its config.json and the name, size and modification time of every weight file; for a
    GGUF file its size and time; for a Hub id the name (its pinned revision is in the recipe)."""
    if not name:
        return {}
    path = cache_root() / "models" / name if name in BUILTINS else Path(name).expanduser()
    if path.is_file():
        stat = path.stat()
        return {"file": stat.st_size, "mtime": stat.st_mtime_ns}
    if not path.is_dir():
        return {"name": name}
    found = {"config": (path / "config.json").read_text() if (path / "config.json").is_file() else None}
    for weights in sorted(path.glob("*.safetensors*")):
        stat = weights.stat()
        found[weights.name] = [stat.st_size, stat.st_mtime_ns]
    return found


def library_versions() -> dict:
    """Versions of the libraries whose numerics decide the pruned weights."""
    found = {}
    for package in ("torch", "transformers", "safetensors", "accelerate", "peft"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def code_fingerprint() -> str:
    """Hash of the installed toolkit's source (compress/ and calibration/)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*(root / "compress").rglob("*.py"), *(root / "calibration").rglob("*.py")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class WorkFolder:
    def __init__(self, path: Path, fingerprint: str, log=print):
        self.path = Path(path)
        self.fingerprint = fingerprint
        marker = self.path / "fingerprint.json"
        if self.path.exists():
            previous = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
            if previous != fingerprint:
                log(f"work folder {self.path} belongs to another recipe; starting afresh")
                shutil.rmtree(self.path)
        self.resumed = self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            _atomic_text(marker, json.dumps({"fingerprint": fingerprint}))

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        save_atomic(self.path / f"{name}.safetensors", tensors, meta)

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        return load(self.path / f"{name}.safetensors")

    def stage(self, number: int) -> "StageFolder":
        return StageFolder(self.path / f"stage-{number}")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class StageFolder:
    """Progress of one stage: per-layer files, the hidden states, and the final result."""

    # Hidden states are large (samples x seq_len x hidden); they are saved after a layer only when
    # the time since the last save is at least this many times what that save took (<= ~5% overhead).
    HIDDEN_SAVE_RATIO = 20

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._last_save_end = None
        self._last_save_seconds = 0.0

    # ---- per-layer decisions, and other named results ---------------------------------------
    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        save_atomic(self.path / f"{name}.safetensors", tensors, meta)

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        return load(self.path / f"{name}.safetensors")

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        self.save(f"layer-{index:04d}", tensors, meta)

    def load_layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        return self.load(f"layer-{index:04d}")

    # ---- calibration hidden states ----------------------------------------------------------
    def save_hidden(self, depth: int, hidden: list[torch.Tensor], extra: dict | None = None) -> None:
        tensors = {f"batch.{i}": h.contiguous() for i, h in enumerate(hidden)}
        save_atomic(self.path / "hidden.safetensors", tensors, {"depth": depth, **(extra or {})})

    def checkpoint_hidden(self, depth: int, hidden: list[torch.Tensor], extra: dict | None = None) -> None:
        """`save_hidden`, unless the previous save was too recent to be worth another (see above)."""
        now = time.perf_counter()
        if (self._last_save_end is not None
                and now - self._last_save_end < self.HIDDEN_SAVE_RATIO * self._last_save_seconds):
            return
        self.save_hidden(depth, hidden, extra)
        self._last_save_end = time.perf_counter()
        self._last_save_seconds = self._last_save_end - now

    def load_hidden(self) -> tuple[int, list[torch.Tensor], dict] | None:
        found = load(self.path / "hidden.safetensors")
        if found is None:
            return None
        tensors, meta = found
        hidden = [tensors[f"batch.{i}"] for i in range(len(tensors))]
        return int(meta.pop("depth")), hidden, meta

    # ---- the finished stage -------------------------------------------------------------------
    def mark_finished(self, details: dict) -> None:
        """The stage is done: write its marker (with its report details) and drop the in-progress files."""
        self.save("result", {}, {"details": details})
        for pattern in ("layer-*.safetensors", "compensation-*.safetensors", "hidden.safetensors",
                        "supernet-*.safetensors", "round-*.safetensors"):
            for path in self.path.glob(pattern):
                path.unlink()

    def finished_details(self) -> dict | None:
        """The report details of a finished stage, or None if the stage did not finish."""
        marker = self.load("result")
        return None if marker is None else marker[1]["details"]

    def save_artifacts(self, artifacts: dict[str, bytes | str]) -> None:
        """Extra export files of the stage (kept so a resumed run still exports them)."""
        for number, (name, content) in enumerate(sorted(artifacts.items())):
            data = content if isinstance(content, bytes) else content.encode()
            save_atomic(self.path / f"artifact-{number:02d}.safetensors",
                        {"bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8)},
                        {"name": name, "text": not isinstance(content, bytes)})

    def load_artifacts(self) -> dict[str, bytes | str]:
        artifacts = {}
        for path in sorted(self.path.glob("artifact-*.safetensors")):
            tensors, meta = load(path)
            data = tensors["bytes"].numpy().tobytes()
            artifacts[meta["name"]] = data.decode() if meta["text"] else data
        return artifacts


def save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    partial = path.with_name(f".{path.name}.partial")
    metadata = {key: json.dumps(value) for key, value in (meta or {}).items()}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, partial, metadata=metadata)
    fault_point(f"{path.parent.name}/{path.name}:partial")
    os.replace(partial, path)
    fault_point(f"{path.parent.name}/{path.name}")


def fault_point(name: str) -> None:
    """Testing hook: SIGKILL this process at the named point when COMPRESS_FAULT_AT names it.

    Points: `stage-N/FILE` (right after FILE is in place), `stage-N/FILE:partial` (written under its
    temporary name, not yet renamed), `export:staged` (checkpoint complete in the staging folder).
    """
    if os.environ.get("COMPRESS_FAULT_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
    return tensors, metadata


def _atomic_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
