"""End to end on the real default model, SmolLM2-135M-Instruct (tier 3). About a minute and a half."""
import copy
import os

import pytest
import torch

import modelpress
from modelpress.data import tokenize, windows
from modelpress.eval.perplexity import perplexity_of_windows, transformers_perplexity
from modelpress.model.load import default_model_path
from tests.conftest import shared_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eval_windows(default_model):
    _, tok = default_model
    return windows(tokenize(tok, shared_text("eval.txt")), 512, 4)


def test_weights_equal_transformers_gguf_loader(default_model):
    from transformers import AutoModelForCausalLM

    model, _ = default_model
    path = default_model_path()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "every tensor bit-identical"


def test_tokenizer_equals_llama_cpp(default_model):
    """llama.cpp is the reference for a GGUF's tokenizer. (transformers' GGUF converter differs: it
    drops the 'smollm' pre-tokenizer's digit split, so "\n\n1" becomes two newline tokens there;
    the original SmolLM2 tokenizer.json splits digits as llama.cpp and modelpress do.)"""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (a peer) is not installed")
    _, tok = default_model
    llm = llama_cpp.Llama(str(default_model_path()), vocab_only=True, verbose=False)
    text = shared_text("eval.txt")[:50000] + " 1234567 <|im_start|>user\nhi<|im_end|>  x\n\n\n 42"
    ours = tok(text, add_special_tokens=False)["input_ids"]
    assert ours == llm.tokenize(text.encode(), add_bos=False, special=True)
    assert len(ours) > 10000


def test_fp32_perplexity_agrees_with_transformers(default_model, eval_windows):
    model, _ = default_model
    ours = perplexity_of_windows(model, eval_windows, progress=False)
    ref = transformers_perplexity(model, eval_windows, progress=False)
    assert abs(ours.ppl / ref.ppl - 1) < 1e-3
    assert 5 < ours.ppl < 80  # observed 42.3 (eval.txt), 14.6 (pydoc fallback)


def test_rtn_int8_within_one_percent_and_int4_round_trip(default_model, eval_windows, tmp_path):
    model, tok = default_model
    base = perplexity_of_windows(model, eval_windows, progress=False).ppl
    int8 = modelpress.quantize(copy.deepcopy(model), modelpress.RTNConfig(bits=8, group_size=None, symmetric=True))
    assert abs(perplexity_of_windows(int8, eval_windows, progress=False).ppl / base - 1) < 0.01
    del int8
    int4 = modelpress.quantize(copy.deepcopy(model), modelpress.RTNConfig(bits=4, group_size=64))
    q_ppl = perplexity_of_windows(int4, eval_windows, progress=False).ppl
    assert base < q_ppl < 1.6 * base  # observed +36 % on 8 windows
    out = modelpress.save(int4, tok, tmp_path / "int4")
    loaded, tok2 = modelpress.load(out)
    x = eval_windows[:1, :64]
    with torch.no_grad():
        assert torch.equal(int4(x).logits, loaded(x).logits)
        assert torch.equal(int4(x[:, :8]).logits, loaded(x[:, :8]).logits)
    assert os.path.getsize(out / "model.safetensors") < 0.35 * 538e6


def test_generate_answers(default_model):
    from modelpress.generate import stream_text

    model, tok = default_model
    text = "".join(stream_text(model, tok, "What is the capital of France?", max_new_tokens=20))
    assert "Paris" in text


def test_bitsandbytes_formats_bit_exact_on_every_linear_weight(default_model):
    """NF4, NF4 + double quant, FP4 and LLM.int8 weights of all 210 linear layers, byte for byte."""
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (a peer) is not installed")
    from modelpress.core import dynamic8, int8_rowwise
    from modelpress.core.codebook4 import quantize_4bit

    model, _ = default_model
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            w = mod.weight.detach()
            for quant_type in ("nf4", "fp4"):
                packed, absmax = quantize_4bit(w, 64, quant_type)
                ref, state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type)
                assert torch.equal(packed, ref.reshape(-1)) and torch.equal(absmax, state.absmax), name
            q, absmax2, offset = dynamic8.double_quantize(quantize_4bit(w, 64, "nf4")[1])
            _, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            assert torch.equal(q, state.absmax) and torch.equal(absmax2, state.state2.absmax), name
            assert float(offset) == float(state.offset), name
            cb, scb = int8_rowwise.quantize_rows(w)
            ref_cb, ref_scb, _ = bnb.int8_vectorwise_quant(w.to(torch.float16))
            assert torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb), name
            checked += 1
    assert checked == 210


def test_gguf_q4_k_m_identical_to_llama_cpp(default_model, tmp_path):
    """modelpress' Q4_K_M of the fp32 weights against llama.cpp's quantizer run on modelpress'
    F32 export of the same weights: every tensor's type and bytes (272 tensors)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (a peer) is not installed")
    import ctypes

    import numpy as np

    from modelpress.formats.gguf_reader import read_gguf
    from modelpress.formats.gguf_writer import write_gguf

    model, _ = default_model
    source = default_model_path()
    write_gguf(tmp_path / "f32.gguf", model, "F32", source, progress=False)
    write_gguf(tmp_path / "ours.gguf", model, "Q4_K_M", source, progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(tmp_path / "theirs.gguf").encode(),
                                          ctypes.byref(params)) == 0
    _, ours = read_gguf(tmp_path / "ours.gguf")
    _, theirs = read_gguf(tmp_path / "theirs.gguf")
    theirs = {t.name: t for t in theirs}
    assert len(ours) == len(theirs) == 272
    differ = [t.name for t in ours if t.ggml_type != theirs[t.name].ggml_type
              or not np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data))]
    assert differ == []
