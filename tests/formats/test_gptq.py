"""The HF GPTQ layout: what modelpress writes, read back by an independent unpacker written from
the format's definition (shifts and masks on int32 words, not modelpress' packing code), and
loaded back by modelpress with the same logits."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import modelpress
from modelpress import GPTQConfig, RTNConfig
from modelpress.formats import gptq as gptq_format
from modelpress.model.walker import dense_weight
from modelpress.record import record


def unpack_reference(qweight, qzeros, scales, g_idx, bits, v1=True):
    """W (N, K) from the HF GPTQ tensors, one shift at a time (2/4/8 bits: 32 / bits codes a word;
    3 bits: a code may straddle two words, so read the words as one bit stream)."""
    maxq = (1 << bits) - 1
    words_w = qweight.to(torch.int64) & 0xFFFFFFFF          # (K * bits / 32, N)
    K = words_w.shape[0] * 32 // bits
    N = words_w.shape[1]

    def code(words, i):  # the i-th code of a column of words
        bit = i * bits
        w0, off = words[bit // 32], bit % 32
        v = w0 >> off
        if off + bits > 32:
            v = v | (words[bit // 32 + 1] << (32 - off))
        return v & maxq

    words_z = qzeros.to(torch.int64) & 0xFFFFFFFF           # (G, N * bits / 32)
    W = torch.zeros(N, K)
    for k in range(K):
        g = int(g_idx[k])
        c = code(words_w, k).float()                        # (N,)
        z = torch.stack([code(words_z[g], n) for n in range(N)]).float()
        if v1:
            z = (z + 1) % (maxq + 1)
        W[:, k] = scales[g].float() * (c - z)
    return W


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_layout_read_by_independent_unpacker(tmp_path, tiny, bits, act_order):
    model, tok = tiny
    calib = [torch.randint(0, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    config = GPTQConfig(bits=bits, group_size=32, act_order=act_order, static_groups=False, symmetric=bits == 8)
    modelpress.quantize(model, config, calib)
    out = gptq_format.save(model, tok, tmp_path / "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"]) == ("gptq", bits, 32, act_order)
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"  # 160 inputs: five groups; 96 outputs
    assert sd[f"{name}.qweight"].dtype == torch.int32 and sd[f"{name}.qweight"].shape == (160 * bits // 32, 96)
    assert sd[f"{name}.qzeros"].shape == (5, 96 * bits // 32) and sd[f"{name}.scales"].dtype == torch.float16
    g_idx = sd[f"{name}.g_idx"]
    assert g_idx.dtype == torch.int32 and sorted(torch.bincount(g_idx.long()).tolist()) == [32] * 5
    assert (not torch.equal(g_idx.long(), torch.arange(160) // 32)) == act_order
    W = unpack_reference(sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"], g_idx, bits)
    mod = model.get_submodule(name)
    assert torch.equal(W, dense_weight(mod))
    loaded, _ = modelpress.load(out)  # and back: same logits
    x = torch.randint(0, 261, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
        torch.testing.assert_close(loaded(x[:1, :3]).logits, model(x[:1, :3]).logits, rtol=0, atol=1e-4)
    assert record(loaded).config.act_order == act_order


def test_rtn_model_in_gptq_layout_and_refusals(tmp_path, tiny):
    model, tok = tiny
    with pytest.raises(modelpress.ModelpressError, match="only a GPTQ- or RTN-quantized"):
        gptq_format.save(model, tok, tmp_path / "plain")
    modelpress.quantize(model, RTNConfig(bits=4, group_size=32))
    out = gptq_format.save(model, tok, tmp_path / "rtn")
    loaded, _ = modelpress.load(out)
    x = torch.randint(0, 261, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    with pytest.raises(modelpress.ModelpressError, match="not empty"):
        gptq_format.save(model, tok, out)


def test_default_gptq_is_activation_order_in_the_plain_layout(tmp_path, tiny):
    """Issue 28: the defaults order columns by activation with static groups; the checkpoint is still the
    plain GPTQ layout as AutoGPTQ writes it for desc_act with static_groups (g_idx = column // group: no
    permutation), which every GPTQ reader (transformers, vLLM, the independent unpacker) loads, and its
    weights differ from the stored-order sweep."""
    model, tok = tiny
    calib = [torch.randint(0, 261, (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    assert GPTQConfig().act_order and GPTQConfig().static_groups
    columns = modelpress.quantize(copy.deepcopy(model), GPTQConfig(bits=4, group_size=32, act_order=False,
                                                                   static_groups=False), calib)
    modelpress.quantize(model, GPTQConfig(bits=4, group_size=32), calib)
    out = gptq_format.save(model, tok, tmp_path / "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc.get("static_groups") is True
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(sd[f"{name}.g_idx"].long(), torch.arange(160) // 32)
    W = unpack_reference(sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"], sd[f"{name}.g_idx"], 4)
    assert torch.equal(W, dense_weight(model.get_submodule(name)))
    assert not torch.equal(W, dense_weight(columns.get_submodule(name)))
