"""Formats are registered handlers: save / load / info dispatch through the registry, a format
declares the methods it holds, and a new format is one registration."""
import json
from pathlib import Path

import pytest

import modelpress
from modelpress.errors import ModelpressError
from modelpress.formats import check_destination, describe, detect, formats, registry
from modelpress.formats.registry import Format, register_format
from modelpress.record import record


def test_every_format_is_registered():
    names = set(formats())
    assert names == {"modelpress", "transformers", "gptq", "awq", "compressed-tensors", "bitsandbytes", "gguf"}
    writable = {n for n, f in formats().items() if f.save}
    assert writable == {"modelpress", "gptq", "awq", "compressed-tensors", "gguf"}
    readers = {f.quant_method for f in formats().values() if f.read}
    assert readers == {"gptq", "awq", "compressed-tensors", "bitsandbytes"}


def test_a_format_refuses_methods_it_cannot_hold(tmp_path, tiny):
    model, tok = tiny
    with pytest.raises(ModelpressError, match="cannot hold a nf4 model"):
        check_destination("gptq", "nf4", tmp_path / "o")
    with pytest.raises(ModelpressError, match="unknown format"):
        check_destination("onnx", "rtn", tmp_path / "o")
    modelpress.quantize(model, modelpress.NF4Config())
    with pytest.raises(ModelpressError, match="holds gptq, awq, rtn models, not nf4"):
        modelpress.save(model, tok, tmp_path / "o", format="gptq")
    assert not (tmp_path / "o").exists()


def test_save_detect_describe_and_load_go_through_the_registry(tmp_path, tiny):
    model, tok = tiny
    modelpress.quantize(model, modelpress.RTNConfig(bits=4, group_size=32))
    for fmt, kind in (("modelpress", "modelpress"), ("gptq", "gptq"), ("compressed-tensors", "compressed-tensors")):
        out = modelpress.save(model, tok, tmp_path / fmt, format=fmt)
        assert detect(Path(out)) == kind
        info = describe(Path(out))
        assert info["format"] == ("modelpress" if fmt == "modelpress" else "transformers") and info["tensors"] > 0
        loaded, _ = modelpress.load(out)
        assert record(loaded).config.bits == 4


def test_a_new_format_is_one_registration(tmp_path, tiny):
    model, tok = tiny
    written = []

    def save(m, t, path):
        Path(path).write_text(json.dumps({"layers": len(m.model.layers)}))
        written.append(path)
        return Path(path)

    register_format(Format("toy", "a test format", save=save))
    try:
        out = modelpress.save(model, tok, tmp_path / "m.toy", format="toy")
        assert written == [tmp_path / "m.toy"] and json.loads(out.read_text()) == {"layers": 2}
        with pytest.raises(ValueError, match="registered twice"):
            register_format(Format("toy", "again"))
    finally:
        registry._FORMATS.pop("toy")
