"""Calibration sources: text, jsonl, Hugging Face datasets (local builder), self-generated."""

import pytest
import torch

from calibration.data import calibration_windows, read_source_text
from compress.errors import UserError
from compress.recipe import CalibrationConfig
from tests.conftest import tiny_llama, tiny_tokenizer


def test_jsonl_and_hf_sources_read_the_same_field(text_files):
    from_jsonl = read_source_text(CalibrationConfig(source="jsonl", path=str(text_files["jsonl"])))
    from_hf = read_source_text(CalibrationConfig(source="hf", path=str(text_files["jsonl"]), dataset="json"))
    assert from_jsonl == from_hf and len(from_jsonl) > 1000


def test_windows_from_text_have_the_configured_shape(text_files):
    cfg = CalibrationConfig(source="text", path=str(text_files["calibration"]), num_samples=5, seq_len=16)
    windows = calibration_windows(cfg, None, tiny_tokenizer())
    assert windows.shape == (5, 16)
    again = calibration_windows(cfg, None, tiny_tokenizer())
    assert torch.equal(windows, again)  # seeded


def test_self_generated_windows_are_seeded():
    cfg = CalibrationConfig(source="self", num_samples=3, seq_len=12, batch_size=2)
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    first = calibration_windows(cfg, model, tokenizer)
    assert first.shape == (3, 12)
    assert torch.equal(first, calibration_windows(cfg, model, tokenizer))


@pytest.mark.parametrize("source,content,message", [
    ("text", None, "file not found"),
    ("jsonl", '{"body": "x"}\n', "has no field 'text'"),
    ("jsonl", "{not json}\n", "is not valid JSON"),
])
def test_bad_sources_name_the_problem(tmp_path, source, content, message):
    path = tmp_path / "data"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_source_text(CalibrationConfig(source=source, path=str(path)))


def test_too_short_text_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only a few words")
    cfg = CalibrationConfig(source="text", path=str(path), num_samples=2, seq_len=64)
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_windows(cfg, None, tiny_tokenizer())


def test_packaged_wikitext2_is_the_benchmark_text_and_roles_never_mix():
    import hashlib

    from calibration.datasets import identity, named_text

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    valid, test = named_text("wikitext2", "calibration"), named_text("wikitext2", "eval")
    # The files' bytes are checked against ../shared/data/wikitext-2's digests on every read; the text is
    # what Path.read_text() gives for those files (wiki.test.raw has CRLF line ends, read as LF), so
    # every benchmark figure stays comparable.
    assert digest(valid) == "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"
    assert digest(test) == "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a"
    assert "\r" not in test and test.count("\n") == 2891
    assert named_text("wikitext2", "train") == valid
    for name in ("wikitext2", "wikitext2-hf", "c4"):
        assert identity(name, "eval") not in (identity(name, "calibration"), identity(name, "train"))


def test_damaged_packaged_data_is_refused(monkeypatch):
    import calibration.datasets as named

    named._packaged_text.cache_clear()
    monkeypatch.setitem(named.NAMED, "wikitext2", named.Packaged(
        "wikitext2", {"calibration": ("wiki.valid.tokens.gz", "0" * 64)}, "tampered digest"))
    try:
        with pytest.raises(UserError, match="damaged"):
            named.named_text("wikitext2", "calibration")
    finally:
        named._packaged_text.cache_clear()


def test_hub_names_fail_in_one_line_without_network(monkeypatch):
    import datasets

    from calibration.datasets import named_text

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("wikitext2-hf", "c4"):
        with pytest.raises(UserError, match="calibration.name=wikitext2") as err:
            named_text(name, "calibration")
        assert "\n" not in str(err.value)


def test_hub_names_ask_for_the_right_split_and_file(monkeypatch):
    import datasets

    from calibration.datasets import named_text

    calls = []

    def fake(dataset, config, split, data_files):
        calls.append((dataset, config, split, data_files))
        return datasets.Dataset.from_dict({"text": ["a", "", "b"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert named_text("wikitext2-hf", "eval") == "a\n\nb"
    assert named_text("c4", "calibration") == "a b"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test", None),
                     ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"})]


def test_unknown_data_set_name_suggests_the_closest():
    from compress.recipe import load_recipe

    with pytest.raises(UserError, match="did you mean 'wikitext2'"):
        load_recipe("flap_20", ["calibration.name=wikitext"])


@pytest.mark.parametrize("overrides,expect", [
    (["calibration=my.txt"], {"calibration": ("text", "my.txt")}),
    (["calibration=my.jsonl"], {"calibration": ("jsonl", "my.jsonl")}),
    (["calibration.path=my.txt"], {"calibration": ("text", "my.txt")}),
    (["eval.text=test.txt"], {"eval": ("text", "test.txt")}),
    (["calibration=self"], {"calibration": ("self", None), "lora": ("calibration", None)}),
    (["stages.1.data.path=train.jsonl", "calibration=self"], {"lora": ("jsonl", "train.jsonl")}),
    ([], {"calibration": ("builtin", None), "eval": ("builtin", None), "lora": ("builtin", None)}),
])
def test_overrides_switch_the_data_source(overrides, expect):
    from compress.recipe import load_recipe

    recipe = load_recipe("flap_50_lora", overrides)
    blocks = {"calibration": recipe.calibration, "eval": recipe.eval, "lora": recipe.stages[1].data}
    for block, (source, file) in expect.items():
        assert (blocks[block].source, blocks[block].file) == (source, file)
