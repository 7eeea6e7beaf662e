"""GGUF export: llama.cpp loads what modelpress writes and computes the same logits (names,
metadata and the q/k row order right); modelpress reads it back to the weights it wrote."""
import pytest
import torch

import modelpress
from modelpress.core import kquants
from modelpress.formats.gguf_reader import read_gguf
from modelpress.formats.gguf_writer import gguf_tensors, write_gguf
from tests.conftest import tiny_llama

VOCAB = 49152  # the default model's tokenizer, copied into the file


@pytest.fixture(scope="module")
def source_gguf():
    from modelpress.model.load import default_model_path

    try:
        return default_model_path()
    except modelpress.ModelpressError as e:
        pytest.skip(f"the default model's GGUF supplies the tokenizer: {e}")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_llama_cpp_runs_an_f32_export_with_our_logits(tmp_path, source_gguf):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model = tiny_llama(vocab_size=VOCAB)
    path = tmp_path / "tiny-f32.gguf"
    types = write_gguf(path, model, "F32", source_gguf, progress=False)
    assert set(types.values()) == {"F32"}
    ids = [1, 504, 3000, 17, 42, 9000, 7]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[:len(ids)])
    ours = _logits(model, ids)
    # llama.cpp keeps K and V in fp16: differences of ~1e-3 on logits spread ~0.5 (a wrong q/k row
    # order or a missing tensor changes them by their own size)
    assert ours.std() > 0.3
    torch.testing.assert_close(theirs, ours, rtol=0, atol=5e-3)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M", "BF16"])
def test_modelpress_reads_back_what_it_wrote(tmp_path, source_gguf, mix):
    model = tiny_llama(vocab_size=VOCAB, tied=False)
    path = tmp_path / f"tiny-{mix}.gguf"
    types = write_gguf(path, model, mix, source_gguf, progress=False)
    assert not (tmp_path / f"tiny-{mix}.gguf.part").exists()
    meta, tensors = read_gguf(path)
    assert meta["general.file_type"] == {"Q8_0": 7, "Q4_K_M": 15, "BF16": 32}[mix]
    assert {t.name: t for t in tensors}.keys() == types.keys()
    back, _ = modelpress.load(path)
    sd = back.state_dict()
    for name, w in gguf_tensors(model):  # GGUF order and q/k permutation, undone by the loader
        kind = types[name]
        if kind in kquants.BLOCK:
            want = kquants.dequantize(kquants.quantize(w, kind), kind, w.shape[-1])
        else:
            want = w.to(torch.bfloat16).float() if kind == "BF16" else w
        got = dict(gguf_tensors(back))[name]
        assert torch.equal(got, want), (name, kind)
    assert sd["lm_head.weight"].shape == (VOCAB, 96)


def test_export_refuses_what_it_cannot_write(tmp_path, source_gguf):
    with pytest.raises(ValueError, match="unknown GGUF mix"):
        write_gguf(tmp_path / "x.gguf", tiny_llama(), "Q4_K_X", source_gguf)


def test_a_transformers_model_exports_with_its_own_tokenizer(tmp_path, tiny_hf_dir):
    """No source GGUF: the tokenizer's fields come from the transformers tokenizer; llama.cpp
    tokenizes like it and computes our logits, and modelpress reads the tokenizer back."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    d, model, tok = tiny_hf_dir
    path = tmp_path / "hf-f32.gguf"
    write_gguf(path, model, "F32", tokenizer=tok, progress=False)
    text = "the thing in the winter"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    torch.testing.assert_close(torch.tensor(llm.scores[:len(ids)]), _logits(model, ids), rtol=0, atol=5e-3)
    _, back = modelpress.load(path)
    assert back(text, add_special_tokens=False)["input_ids"] == ids
    assert back.eos_token_id == tok.eos_token_id


def test_the_default_models_tokenizer_keeps_its_pre_tokenizer(tmp_path, source_gguf):
    from modelpress.formats.gguf_vocab import tokenizer_fields

    _, tok = modelpress.load()
    fields = {k: v for k, v, *_ in tokenizer_fields(tok, VOCAB)}
    assert fields["tokenizer.ggml.pre"] == "smollm" and len(fields["tokenizer.ggml.tokens"]) == VOCAB


def test_fast_array_packing_writes_the_gguf_packages_bytes(tmp_path, source_gguf, monkeypatch):
    import gguf

    from modelpress.formats import gguf_writer

    model = tiny_llama(vocab_size=VOCAB)
    ours, stock = tmp_path / "ours.gguf", tmp_path / "stock.gguf"
    write_gguf(ours, model, "Q8_0", source_gguf, progress=False)
    monkeypatch.setattr(gguf_writer, "_writer", lambda path, arch: gguf.GGUFWriter(str(path), arch))
    write_gguf(stock, model, "Q8_0", source_gguf, progress=False)
    assert ours.read_bytes() == stock.read_bytes()
