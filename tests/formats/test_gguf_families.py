"""GGUF export and import of the families llama.cpp's converter writes (formats/gguf_names.ARCH):
a round trip gives transformers' logits (F32 exactly; Q8_0 close), llama.cpp's own converter
(convert_hf_to_gguf.py from the llama-cpp-python sdist, which `bin/setup test` unpacks into .peers/)
writes the same architecture, keys, tensor names, shapes and F32 bytes, and the other families are
refused by name."""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import modelpress
from modelpress.errors import ModelpressError
from modelpress.formats.gguf_mixes import MIXES
from modelpress.formats.gguf_names import ARCH
from modelpress.model.decoder import FAMILIES
from tests.conftest import byte_tokenizer
from tests.model import families
from tests.model.families import configs, tiny

CONVERTER = Path(os.environ.get("MODELPRESS_LLAMA_CPP", Path(__file__).resolve().parents[2] / ".peers" / "llama.cpp"))
X = torch.randint(3, 261, (2, 24), generator=torch.Generator().manual_seed(4))


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def gguf_config(family, vocab_size=None):
    """The family's tiny config, with what llama.cpp derives rather than reads (gemma's sliding layers
    and query scale) as llama.cpp derives it."""
    from modelpress.formats.gguf_names import llama_cpp_layer_types

    cfg = configs()[family]
    if family == "mistral":  # llama.cpp's `llama` files hold no window (test_a_windowed_mistral_warns)
        cfg.sliding_window = None
    if "gemma" in family:
        cfg.num_hidden_layers = 6
        cfg.layer_types = llama_cpp_layer_types(ARCH[family], 6)
        cfg.query_pre_attn_scalar = cfg.head_dim
    if vocab_size:
        cfg.vocab_size = vocab_size
    return cfg


@pytest.mark.parametrize("family", sorted(ARCH))
@pytest.mark.parametrize("mix", ["F32", "Q8_0"])
def test_round_trip_gives_transformers_logits(family, mix, tmp_path):
    model = tiny(family, config=gguf_config(family))
    path = tmp_path / "m.gguf"
    modelpress.export_gguf(model, byte_tokenizer(), path, mix, progress=False)
    loaded, _ = modelpress.load(path)
    assert GGUFReader(path).fields["general.architecture"].contents() == ARCH[family]
    ref, got = _logits(model), _logits(loaded)
    if mix == "F32":  # gemma's norms go through 1 + w and back: one rounding
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    else:  # Q8_0 rounding of every linear layer
        assert (got - ref).abs().max() < 0.05 * ref.abs().max() and (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_a_windowed_mistral_warns_that_the_file_has_no_window(tmp_path):
    with pytest.warns(UserWarning, match="no sliding window, so past 12 tokens"):
        modelpress.export_gguf(tiny("mistral"), byte_tokenizer(), tmp_path / "m.gguf", "F32", progress=False)


def test_gemma_that_llama_cpp_would_compute_otherwise_is_refused(tmp_path):
    with pytest.raises(ModelpressError, match="llama.cpp derives"):  # the tiny gemma2's query scale is 24, not 16
        modelpress.export_gguf(tiny("gemma2"), byte_tokenizer(), tmp_path / "m.gguf", "F32", progress=False)
    assert not list(tmp_path.iterdir())  # nothing written


def test_every_family_has_a_gguf_architecture():
    assert set(ARCH) == set(FAMILIES)


def test_another_model_type_is_refused_by_name(tmp_path):
    model = tiny("llama")
    model.config.model_type = "olmo"  # Llama's tensors, of no family the export knows
    with pytest.raises(ModelpressError, match="'olmo'"):
        modelpress.export_gguf(model, byte_tokenizer(), tmp_path / "m.gguf", "F32", progress=False)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def spm_vocabulary(tmp_path_factory):
    """(folder, tokenizer) of tests.model.families.spm_vocabulary."""
    pytest.importorskip("sentencepiece", reason="the converter imports sentencepiece")
    pytest.importorskip("google.protobuf", reason="transformers reads a SentencePiece model with protobuf")
    folder = tmp_path_factory.mktemp("spm")
    return folder, families.spm_vocabulary(folder)


@pytest.mark.parametrize("family", sorted(ARCH))
@pytest.mark.parametrize("mix", ["F32", "Q8_0"])
def test_export_equals_llama_cpps_converter(family, mix, tmp_path, spm_vocabulary):
    if not (CONVERTER / "convert_hf_to_gguf.py").exists():
        pytest.skip(f"llama.cpp's converter is not at {CONVERTER} (bin/setup test unpacks it; or set MODELPRESS_LLAMA_CPP)")
    spm_folder, tok = spm_vocabulary
    model = tiny(family, config=gguf_config(family, len(tok)))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    shutil.copy(spm_folder / "tokenizer.model", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(CONVERTER / "gguf-py")}
    with warnings.catch_warnings():  # a windowed mistral: the file has no window (tested above)
        warnings.simplefilter("ignore")
        subprocess.run([sys.executable, str(CONVERTER / "convert_hf_to_gguf.py"), str(tmp_path), "--outfile",
                        str(tmp_path / "theirs.gguf"), "--outtype", mix.lower()], check=True, env=env, capture_output=True)
        loaded, _ = modelpress.load(tmp_path)  # (transformers gives this folder's qwen2 its own tokenizer class)
        modelpress.export_gguf(loaded, tok, tmp_path / "ours.gguf", mix, progress=False)
    ours, theirs = GGUFReader(tmp_path / "ours.gguf"), GGUFReader(tmp_path / "theirs.gguf")

    def keys(r):
        return {k: r.fields[k].contents() for k in r.fields if not k.startswith(("general.", "GGUF.", "tokenizer."))}

    assert ours.fields["general.architecture"].contents() == theirs.fields["general.architecture"].contents() == ARCH[family]
    assert keys(ours) == keys(theirs)
    a, b = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert set(a) == set(b)
    for name in b:
        assert (list(a[name].shape), a[name].tensor_type) == (list(b[name].shape), b[name].tensor_type), name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


@pytest.mark.parametrize("family", sorted(ARCH))
def test_llama_cpp_runs_our_export_with_transformers_logits(family, tmp_path, default_model):
    """llama.cpp (llama-cpp-python) on our F32 file, the default model's vocabulary: its logits are
    transformers' within its fp16 KV cache's rounding, the same top token at every position."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (a peer) is not installed")
    _, tok = default_model
    model = tiny(family, config=gguf_config(family, len(tok)))
    path = tmp_path / "m.gguf"
    modelpress.export_gguf(model, tok, path, "F32", progress=False)
    ids = [1, 504, 3000, 17, 42, 9000, 7, 311, 5]  # fewer than mistral's window of 12
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    assert ours.std() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=5e-3 * max(1.0, ours.abs().max().item()))
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


QUANTIZED_MIXES = [m for m in MIXES if m not in ("F32", "F16", "BF16")]


@pytest.mark.parametrize("family", sorted(ARCH))
@pytest.mark.parametrize("mix", QUANTIZED_MIXES)
def test_mixes_equal_llama_quantize(family, mix, tmp_path, spm_vocabulary):
    """Our export in every quantized mix and llama.cpp's quantizer run on our F32 export: the same
    type for every tensor (its rules per category, phi3's fused qkv counted as attn_v) and the same
    bytes."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (a peer) is not installed")
    _, tok = spm_vocabulary
    cfg = gguf_config(family, len(tok))
    cfg.hidden_size, cfg.intermediate_size = 256, 512  # rows of whole K blocks
    model = tiny(family, config=cfg)
    f32 = tmp_path / "f32.gguf"
    modelpress.export_gguf(model, tok, f32, "F32", progress=False)
    modelpress.export_gguf(model, tok, tmp_path / "ours.gguf", mix, progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp_path / "theirs.gguf").encode(), params) == 0
    ours = {t.name: t for t in GGUFReader(tmp_path / "ours.gguf").tensors}
    theirs = {t.name: t for t in GGUFReader(tmp_path / "theirs.gguf").tensors}
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    assert all(np.array_equal(np.asarray(ours[n].data), np.asarray(t.data)) for n, t in theirs.items())
