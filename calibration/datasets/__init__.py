"""Data sets known by name, for calibration, recovery training and evaluation.

    calibration: {source: builtin, name: wikitext2}          # wiki.valid.tokens, shipped in the package
    eval:        {source: builtin, name: wikitext2}          # wiki.test.raw, shipped in the package
    stages: [..., {method: lora, data: {source: builtin, name: wikitext2}}]

`wikitext2` is packaged (`calibration/datasets/wikitext2/`, byte-identical to the benchmark's files,
SHA-256 checked on every read), so it works offline. `wikitext2-hf` and `c4` are read from the
Hugging Face Hub with `datasets` where the Hub is reachable.

Every named set has one text per role, and the roles that fit weights (`calibration`, `train`)
never read the text that `eval` reads.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import io
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from compress.errors import UserError

ROLES = ("calibration", "train", "eval")


@dataclass(frozen=True)
class Packaged:
    """Files shipped inside this package: role -> (gzip file under the set's folder, SHA-256 of the text)."""

    folder: str
    files: dict[str, tuple[str, str]]
    description: str


@dataclass(frozen=True)
class Hub:
    """A Hugging Face dataset: per role the split (and, for sharded sets, the data file) to read."""

    dataset: str
    config: str | None
    splits: dict[str, str]
    description: str
    data_files: dict[str, str] = field(default_factory=dict)
    text_field: str = "text"
    join: str = "\n\n"
    max_records: dict[str, int] = field(default_factory=dict)  # role -> first N records only


_VALID = ("wiki.valid.tokens.gz", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8")
_TEST = ("wiki.test.raw.gz", "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c")

NAMED: dict[str, Packaged | Hub] = {
    "wikitext2": Packaged(
        "wikitext2", {"calibration": _VALID, "train": _VALID, "eval": _TEST},
        "WikiText-2, shipped: calibration/training on wiki.valid.tokens, evaluation on wiki.test.raw (offline)"),
    "wikitext2-hf": Hub(
        "wikitext", "wikitext-2-raw-v1", {"calibration": "train", "train": "train", "eval": "test"},
        "WikiText-2 raw from the Hub: train split for calibration/training, test split for evaluation"),
    "c4": Hub(
        "allenai/c4", None, {"calibration": "train", "train": "train", "eval": "validation"},
        "C4 (en) from the Hub: first train shard; evaluation on the first 1,100 documents of the first "
        "validation shard (as SparseGPT/GPTQ)",
        data_files={"calibration": "en/c4-train.00000-of-01024.json.gz", "train": "en/c4-train.00000-of-01024.json.gz",
                    "eval": "en/c4-validation.00000-of-00008.json.gz"},
        join=" ", max_records={"eval": 1100}),
}


def check_name(name: str | None, key: str) -> str:
    """`name` if it is a known data set, else a one-line error naming the recipe key."""
    if name in NAMED:
        return name
    close = difflib.get_close_matches(str(name), list(NAMED), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"{key}: unknown data set '{name}'{hint}; known: {', '.join(NAMED)}")


def is_packaged(name: str) -> bool:
    return isinstance(NAMED.get(name), Packaged)


def identity(name: str, role: str) -> str:
    """What a role of a named set reads, for telling whether two roles read the same text."""
    spec = NAMED[name]
    if isinstance(spec, Packaged):
        return f"packaged:{spec.files[role][1]}"
    return f"hub:{spec.dataset}:{spec.config}:{spec.splits[role]}:{spec.data_files.get(role)}"


@lru_cache(maxsize=8)
def _packaged_text(folder: str, file: str, sha256: str) -> str:
    data = gzip.decompress(resources.files(__name__).joinpath(folder, file).read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise UserError(f"packaged data {folder}/{file} is damaged (SHA-256 {digest[:12]}..., expected "
                        f"{sha256[:12]}...); reinstall compress")
    # read as a text file is read (universal newlines: wiki.test.raw has CRLF line ends), so the text
    # is exactly what `Path.read_text()` gives for the benchmark's files
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8").read()


def named_text(name: str, role: str, key: str = "calibration") -> str:
    """The whole text a named data set gives for `role` ('calibration', 'train' or 'eval')."""
    spec = NAMED[check_name(name, f"{key}.name")]
    if isinstance(spec, Packaged):
        return _packaged_text(spec.folder, *spec.files[role])
    import datasets

    split = spec.splits[role]
    files = {split: spec.data_files[role]} if role in spec.data_files else None
    try:
        rows = datasets.load_dataset(spec.dataset, spec.config, split=split, data_files=files)
    except Exception as err:  # no network, Hub down: the user can switch to the packaged set
        raise UserError(f"cannot load data set '{name}' ({spec.dataset}, {split}) from the Hugging Face Hub: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                        f"use {key}.name=wikitext2 (shipped with compress) or a local file") from err
    limit = spec.max_records.get(role)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return spec.join.join(str(text) for text in rows[spec.text_field] if text)
