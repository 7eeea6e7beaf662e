"""The decoder model's fused fast path (model/fused_decode.py, kernels' mp_llama_decode) against the runner's
torch path on the same paged cache: with fp32 activations the same logits within float reordering,
the same greedy tokens, also with the two paths mixed within one sequence; with int8 activations on
Q8_0 / Q5_0 blocks (the default, llama.cpp's numerics) close logits on the same tokens; models it
cannot take keep the torch path. Several sequences decoding in one fused call compute exactly
what each computes alone."""
import ctypes

import pytest
import torch

from modelpress import kernels
from modelpress.model.fused_decode import FusedDecoder
from modelpress.nn.gguf_linear import int8_activations
from modelpress.record import record
from modelpress.serve.runner import ModelRunner
from tests.conftest import hf_greedy_ids, tiny_llama
from tests.serve.test_engine import _quantized

pytestmark = pytest.mark.skipif(kernels.lib() is None, reason="the CPU kernels did not build here (no C compiler)")


@pytest.fixture(params=[True, "avx2", False], ids=["simd", "avx2", "plain"])
def build(request, monkeypatch):
    """Every kernel build this CPU runs, as the one the runner and the layers take: the AVX-512 build
    packs Q8_0 for its own dot (kind 7), the others multiply the blocks as stored."""
    lib = kernels.lib(simd=request.param)
    if request.param and lib.mp_simd() == 0:
        pytest.skip("this CPU lacks AVX2/FMA/F16C: only the plain C build runs")
    if request.param == "avx2" and kernels.lib().mp_simd() < 2:
        pytest.skip("this CPU lacks AVX-512 VNNI: its best build is the AVX2 one, tested as 'simd'")
    monkeypatch.setattr(kernels, "lib", lambda simd=True: lib)
    return lib


class _Seq:
    def __init__(self, ids, table):
        self.token_ids, self.num_computed, self.block_table = list(ids), 0, table
        self.adapter = -1

    def _at(self, n):
        self.num_computed = n
        return self


def _decode(model, fused, steps, mix=False, int8=False, forced=None):
    """Prefill 11 tokens, then `steps` greedy tokens one at a time (or the tokens `forced`); blocks
    out of order (slots not contiguous). mix: every third step takes the torch path. Returns
    (tokens, logits)."""
    runner = ModelRunner(model, 12, 4, fused_decode=fused, int8_activations=int8)
    fast = runner.fused()
    seq = _Seq(torch.randint(1, 261, (11,), generator=torch.Generator().manual_seed(3)).tolist(),
               [7, 2, 9, 0, 11, 5, 3, 8, 1, 10, 4, 6])
    logits = runner.run([seq], [11])
    seq.num_computed, out = 11, []
    for i in range(steps):
        seq.token_ids.append(int(logits[-1].argmax()) if forced is None else forced[11 + i])
        runner.decoder.fused = None if mix and i % 3 == 0 else fast
        logits = runner.run([seq], [1])
        seq.num_computed += 1
        out.append(logits[-1])
    return seq.token_ids, torch.stack(out)


@pytest.mark.parametrize("kind", ["fp32", "gguf-Q4_K_M", "gguf-Q8_0"])
def test_fused_decode_equals_the_torch_path(kind):
    model = tiny_llama() if kind == "fp32" else _quantized(kind)
    assert FusedDecoder.build(ModelRunner(model, 4, 4).decoder) is not None
    if kind != "fp32":  # the tied head's GGUF blocks ride along, outside the state dict
        from modelpress.nn.gguf_linear import GGUFLinear

        assert isinstance(record(model).head, GGUFLinear)
        assert not any("modelpress" in k for k in model.state_dict())  # the record is no submodule
    ref_tokens, ref = _decode(model, False, 30)
    tokens, got = _decode(model, True, 30)
    assert tokens == ref_tokens
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * ref.abs().max().item())
    mixed_tokens, mixed = _decode(model, True, 30, mix=True)   # the paths share the cache
    assert mixed_tokens == ref_tokens
    torch.testing.assert_close(mixed, ref, rtol=0, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["rtn-w4", "rtn-w4-asym", "rtn-w8", "gptq-act", "awq", "llm-int8", "nf4", "fp4-dq", "nf4-b32"])
def test_every_integer_format_decodes_fused_with_its_dequantized_weights_numbers(kind, build, monkeypatch):
    """RTN / GPTQ (act order: permuted columns) / AWQ integers and LLM.int8 rows decode in C on their
    own codes (AFFINE: code * scale + offset), NF4 / FP4 on their packed indices (CODE4), with fp32
    activations: the logits of the same weights
    dequantized to fp32 through the torch path, within float reordering (the torch path's own decode
    kernels run bf16 activations, and LLM.int8's rounds them to int8 around its outliers: the fused
    path's fp32 activations are a choice, stated in model/fused_decode.py)."""
    import torch.nn.functional as F

    from modelpress.nn import Code4Linear, Int8LtLinear, IntxLinear

    model = _quantized(kind)
    layers = [m for m in model.modules() if isinstance(m, (IntxLinear, Int8LtLinear, Code4Linear))]
    assert len(layers) == 14 and (kind != "gptq-act" or all(m.perm is not None for m in layers))
    assert FusedDecoder.build(ModelRunner(model, 4, 4).decoder) is not None
    for cls in (IntxLinear, Int8LtLinear, Code4Linear):  # the torch path (prefill, reference): dequantized weights in fp32
        monkeypatch.setattr(cls, "forward", lambda self, x: F.linear(
            x if getattr(self, "perm", None) is None else x.index_select(-1, self.perm), self.dequantize(x.dtype),
            None if self.bias is None else self.bias.to(x.dtype)))
    tokens, got = _decode(model, True, 30)
    ref_tokens, ref = _decode(model, False, 30)
    assert tokens == ref_tokens
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * ref.abs().max().item())


def _q8_reference(codes, scale, zero_point, g, x):
    """AFFINE4_Q8 / AFFINE_Q8 in torch: x rounded per 32 as llama.cpp's quantize_row_q8_0, times the codes
    scaled per group (codes, scale, zero_point: (out, in), (out, groups), (out, groups)), plus each
    group's offset (-zero_point * scale) times the fp32 sum of its inputs."""
    import torch.nn.functional as F

    xb = x.reshape(*x.shape[:-1], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    xq = torch.round(xb * torch.where(d != 0, 1.0 / d, torch.zeros_like(d))) * d
    y = F.linear(xq.reshape(x.shape), codes.float() * scale.repeat_interleave(g, 1))
    return y + F.linear(x.reshape(*x.shape[:-1], -1, g).sum(-1), -zero_point * scale)


def _rounded_x_reference(self, x):
    """_q8_reference for an IntxLinear (its permutation first) or an Int8LtLinear (codes CB + 128)."""
    if hasattr(self, "SCB"):
        s = (self.SCB.float() / 127.0)[:, None]
        y = _q8_reference(self.weight.to(torch.int16) + 128, s, torch.full_like(s, 128.0), self.in_features, x)
    else:
        x = x if self.perm is None else x.index_select(-1, self.perm)
        s = self.scale.float()
        zp = torch.full_like(s, 2.0 ** (self.bits - 1)) if self.zero_point is None else self.zero_point.float()
        y = _q8_reference(self.codes(), s, zp, self.group_size or self.in_features, x)
    return y if self.bias is None else y + self.bias


@pytest.mark.parametrize("kind", ["rtn-w4", "rtn-w4-asym", "rtn-w8", "gptq-act", "awq", "llm-int8", "nf4-b32",
                                  "fp4-dq"])
@pytest.mark.parametrize("int8", [False, True])
def test_each_layer_kind_applies_as_its_torch_reference(kind, int8, build):
    """Layer by layer, as the fused decode applies them (mp_linear_apply): fp32 activations give the
    dequantized weights' product; int8 ones (4-bit integer layers: AFFINE4_Q8) give x rounded per 32
    as llama.cpp rounds it, times the codes, in torch (_rounded_x_reference)."""
    import torch.nn.functional as F

    from modelpress.kernels import KIND, ops
    from modelpress.model.fused_decode import _linear
    from modelpress.nn import Code4Linear, Int8LtLinear, IntxLinear

    model = _quantized(kind)
    layers = [m for m in model.modules() if isinstance(m, (IntxLinear, Int8LtLinear, Code4Linear))]
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(0)) * torch.rand(160) * 4
    kinds = set()
    for mod in layers:
        keep = []
        lin = _linear(mod, keep, int8)
        kinds.add(lin.kind)
        xi = x[:, :mod.in_features].contiguous()
        got = ops.linear_apply(build, lin, xi)
        if lin.kind in (KIND["AFFINE4_Q8"], KIND["AFFINE_Q8"]):
            ref = _rounded_x_reference(mod, xi)
        else:
            xp = xi if getattr(mod, "perm", None) is None else xi.index_select(-1, mod.perm)
            ref = F.linear(xp, mod.dequantize(), mod.bias)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())  # sums reordered
    byte = "AFFINE_Q8" if int8 else "AFFINE"
    want = {"rtn-w8": byte, "llm-int8": byte, "nf4-b32": "CODE4", "fp4-dq": "CODE4"}.get(
        kind, "AFFINE4_Q8" if int8 else "AFFINE4")
    assert kinds == {KIND[want]}


@pytest.mark.parametrize("bits,group,symmetric,permuted", [(4, 64, True, False), (4, 128, False, True),
                                                          (4, 32, False, False), (8, None, True, False),
                                                          (8, 64, False, True)])
def test_wide_groups_apply_as_their_reference(bits, group, symmetric, permuted, build):
    """Groups of 64 and more take the AVX-512 build's 64-code steps (the tiny model's widths do not divide
    by 64): both activation choices against their references, a permutation too. 37 rows: the int8
    kernels' groups of 16 rows and 4 rows a weight row, with remainders; each row's numbers are the
    same bits as that row alone (a sequence's arithmetic does not depend on its batch)."""
    import torch.nn.functional as F

    from modelpress.kernels import ops
    from modelpress.model.fused_decode import _linear
    from modelpress.nn import IntxLinear

    torch.manual_seed(0)
    mod = IntxLinear.from_linear(torch.nn.Linear(384, 48), bits, group, symmetric)
    if permuted:
        mod.perm = torch.randperm(384)
    x = torch.randn(37, 384) * torch.rand(384) * 4
    for int8 in (False, True):
        keep = []  # the layer's tensors, alive while C reads them
        lin = _linear(mod, keep, int8)
        got = ops.linear_apply(build, lin, x)
        ref = (_rounded_x_reference(mod, x) if int8 else
               F.linear(x if mod.perm is None else x.index_select(-1, mod.perm), mod.dequantize(), mod.bias))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        for i in (0, 5, 18, 36):
            assert torch.equal(ops.linear_apply(build, lin, x[i:i + 1].contiguous())[0], got[i])


@pytest.mark.parametrize("kind", ["gguf-Q4_K_M", "gguf-Q8_0", "rtn-w4", "gptq-act", "awq", "llm-int8"])
def test_a_fused_prefill_computes_what_decoding_token_by_token_computes(kind):
    """Where every layer multiplies with int8 activations (GGUF blocks; integer codes, AFFINE4_Q8 /
    AFFINE_Q8) the runner prefills through the fused path too (each chunk token a row): bit for bit the logits and cache of feeding the prompt one token at a time.
    (int8 rounding turns any difference in the order of sums into a jump of one step, so only the
    same code for both keeps a preempted, recomputed sequence on its course.) The second chunk, 70
    rows, goes through the kernels' row tiles (32, 32 and 6 rows)."""
    model = _quantized(kind)
    ids = torch.randint(1, 261, (75,), generator=torch.Generator().manual_seed(3)).tolist()
    chunked = ModelRunner(model, 20, 4)
    assert chunked.fused().all_int8 and chunked.kv_dtype == torch.float16   # fp16 keys and values too
    a = _Seq(ids, list(range(20)))
    got = torch.cat([chunked.run([a], [5]), chunked.run([_Seq(ids, list(range(20)))._at(5)], [70])])
    one = ModelRunner(model, 20, 4)
    b = _Seq(ids, list(range(20)))
    ref = []
    for j in range(75):
        b.num_computed = j
        ref.append(one.run([b], [1]))
    assert torch.equal(got, torch.cat([ref[4], ref[74]]))
    assert torch.equal(chunked.k_cache[1], one.k_cache[1]) and torch.equal(chunked.v_cache[0], one.v_cache[0])


@pytest.mark.parametrize("kind,tol", [("gguf-Q4_K_M", 0.05), ("gguf-Q8_0", 0.05), ("rtn-w4", 0.1), ("gptq-act", 0.1)])
def test_int8_activations_stay_close_to_the_torch_path(kind, tol):
    """Q8_0 / Q5_0 layers on their blocks, and 4-bit integers (AFFINE4_Q8), with int8 activations, fed the
    torch path's tokens: close logits (the tiny random model turns any difference at a rounding step into
    ~2 % of its logits: a 1e-6 perturbation of x alone does, so the exact check of AFFINE4_Q8 is the layer
    test)."""
    model = _quantized(kind)
    tokens, ref = _decode(model, False, 30)
    _, got = _decode(model, True, 30, int8=True, forced=tokens)
    assert not torch.equal(got, ref)                           # the rounding of x shows
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert top1 >= 0.9 and (got - ref).abs().max() < tol * ref.abs().max(), top1


@pytest.mark.parametrize("kind", ["fp32", "gguf-Q4_K_M", "gguf-Q8_0", "awq", "llm-int8"])
def test_batched_fused_decode_equals_each_sequence_alone(kind, build):
    """Four sequences of different lengths, blocks scattered over the cache: decoded together
    (one fused call per step) and one at a time, the same tokens and, where the head multiplies
    on GGUF blocks too, bit for bit the same logits."""
    model = tiny_llama() if kind == "fp32" else _quantized(kind)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 261, (n,), generator=gen).tolist() for n in (3, 9, 14, 5)]
    tables = torch.randperm(32, generator=gen).view(4, 8).tolist()

    def run(together: bool):
        runner = ModelRunner(model, 32, 4)
        assert runner.fused() is not None
        seqs = [_Seq(p, t) for p, t in zip(prompts, tables)]
        for s in seqs:
            s.token_ids.append(int(runner.run([s], [len(s.token_ids)])[-1].argmax()))
            s.num_computed = len(s.token_ids) - 1
        out = []
        for _ in range(12):
            logits = runner.run(seqs, [1] * 4) if together else torch.cat([runner.run([s], [1]) for s in seqs])
            for i, s in enumerate(seqs):
                s.num_computed += 1
                s.token_ids.append(int(logits[i].argmax()))
            out.append(logits)
        return [s.token_ids for s in seqs], torch.stack(out)

    tokens, got = run(True)
    ref_tokens, ref = run(False)
    assert tokens == ref_tokens
    if kind == "fp32":  # its head is torch's fp32 GEMM, whose order of sums may follow the row count
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("kind", ["bf16", "rtn-w3-g48"])
def test_models_it_cannot_take_keep_the_torch_path(kind):
    runner = ModelRunner(_quantized(kind), 4, 4)
    assert FusedDecoder.build(runner.decoder) is None and runner.fused() is None


@pytest.mark.parametrize("kind", ["gguf-Q4_K_M", "gguf-Q8_0"])
def test_fused_head_is_the_models_norm_then_the_block_head(kind):
    """With int8 activations the final norm and the GGUF head run in C (mp_llama_logits): the
    selected rows' logits are the model's norm then the head module's own product, up to the order
    of the norm's sums."""
    model = _quantized(kind)
    runner = ModelRunner(model, 4, 4)
    fused = runner.fused()
    assert fused.fused_head is not None
    x = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([5, 0, 3])
    head, w, eps = fused.fused_head
    got = torch.empty(3, head.n)
    fused.lib.mp_llama_logits(ctypes.byref(head), w.data_ptr(), eps, x.data_ptr(), x.shape[1], rows.data_ptr(), 3,
                              got.data_ptr())
    with torch.inference_mode(), int8_activations():  # as the runner's own forward multiplies
        ref = runner.decoder.head(model.model.norm(x[rows])).float()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert FusedDecoder.build(ModelRunner(model, 4, 4, int8_activations=False).decoder, False).fused_head is None


@pytest.mark.parametrize("kind", ["gguf-Q4_K_M", "gguf-Q8_0"])
def test_fp16_cache_holds_the_fp32_caches_keys_rounded(kind, build):
    """A model all on GGUF blocks gets an fp16 cache by default (llama.cpp's cache type): the first
    layer's keys and values are the fp32 cache's rounded to fp16 (nearest even), and the logits stay
    within the rounding of the cached values of the fp32 cache's."""
    model = _quantized(kind)
    ids = torch.randint(1, 261, (23,), generator=torch.Generator().manual_seed(7)).tolist()
    table = [5, 1, 7, 3, 0, 6, 2, 4]
    out = {}
    for dt in ("auto", "float32"):
        runner = ModelRunner(model, 8, 4, kv_dtype=dt)
        seq = _Seq(ids, table)
        logits = [runner.run([seq], [20])]
        for j in range(20, 23):
            logits.append(runner.run([seq._at(j)], [1]))
        out[dt] = runner, torch.cat(logits)
    (h, lh), (f, lf) = out["auto"], out["float32"]
    assert h.kv_dtype == torch.float16 and f.kv_dtype == torch.float32
    assert h.bytes_per_block * 2 == f.bytes_per_block
    assert torch.equal(h.k_cache[0], f.k_cache[0].half()) and torch.equal(h.v_cache[0], f.v_cache[0].half())
    torch.testing.assert_close(lh, lf, rtol=0, atol=0.02 * lf.abs().max().item())
    assert (lh.argmax(-1) == lf.argmax(-1)).float().mean() >= 0.75


def test_kv_dtype_the_model_cannot_take_is_a_clear_error():
    with pytest.raises(ValueError, match="every layer multiplying with int8 activations"):
        ModelRunner(tiny_llama(), 4, 4, kv_dtype="float16")
    with pytest.raises(ValueError, match="needs the fused CPU decode"):
        ModelRunner(tiny_llama(), 4, 4, fused_decode=False, kv_dtype="float16")
    with pytest.raises(ValueError, match="kv_dtype must be"):
        ModelRunner(tiny_llama(), 4, 4, kv_dtype="int8")
    assert ModelRunner(tiny_llama(), 4, 4).kv_dtype == torch.float32


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"])
@pytest.mark.parametrize("blocks", [False, True], ids=["fp32", "gguf-Q8_0"])
def test_other_families_take_the_fused_path_with_the_torch_paths_numbers(family, blocks, tmp_path):
    """What the families add to Llama's blocks, in C: qwen2's q / k / v biases (after the product,
    mp_linears_apply), qwen3's and gemma3's per-head q / k norms (before the rotary), mistral's and
    gemma's sliding windows (the 31 positions here pass the window of 12), gemma's scaled embedding,
    (1 + w) and sandwich norms, GELU, score scale and soft-cap, gemma3's two rotary tables, phi3's fused
    qkv and gate_up (split by rows). On fp32
    weights or Q8_0 blocks the fused decode gives the torch path's logits; with the blocks' int8
    activations, close ones."""
    import modelpress
    from tests.conftest import byte_tokenizer
    from tests.model.families import tiny

    model = tiny(family)
    if family == "qwen2":
        assert any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    if blocks:
        if "gemma" in family or family == "mistral":
            pytest.skip("the tiny model is not one a GGUF file holds (llama.cpp derives gemma's layers; no window)")
        modelpress.export_gguf(model, byte_tokenizer(), tmp_path / "q.gguf", "Q8_0", progress=False)
        model, _ = modelpress.load(tmp_path / "q.gguf", keep_blocks=True)
    assert ModelRunner(model, 4, 4).fused() is not None
    tokens, ref = _decode(model, False, 20)
    got_tokens, got = _decode(model, True, 20)
    assert got_tokens == tokens
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * ref.abs().max().item())
    if blocks:  # the blocks' own int8 kernels (and an fp16 cache), fed the same tokens: close
        _, rounded = _decode(model, True, 20, int8=True, forced=tokens)
        assert (rounded - ref).abs().max() < 0.05 * ref.abs().max()
        assert (rounded.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_symmetric_types_offsets_are_zero_times_scale():
    """The fused decode reads no offsets for these types: they must be exactly ZERO * scale."""
    from modelpress.core import kquants
    from modelpress.model.fused_decode import _ZERO

    w = torch.randn(8, 256) * 3
    for kind, zero in _ZERO.items():
        _, scale, offset = kquants.affine(kquants.quantize(w, kind), kind, 256)
        assert torch.equal(offset, zero * scale), kind


def test_decode_speed_runs_the_engine_path_with_the_same_tokens():
    from modelpress.eval.speed import decode_ids_per_s, greedy_ids

    model = tiny_llama()
    ids = torch.randint(1, 261, (1, 9), generator=torch.Generator().manual_seed(5))
    runner = ModelRunner(model, 1, 4)
    assert runner.fused() is not None
    assert list(greedy_ids(runner, ids, 20)) == hf_greedy_ids(model, ids, 20)
    assert runner.num_blocks * 4 >= 29  # the cache grew from 1 block (doubling) as the 29 positions needed
    assert decode_ids_per_s(model, ids, 8) > 0


def test_q8_0_layers_take_the_packed_form_in_the_avx512_build_only(build):
    """Kind 7 (Q8_0 repacked 16 rows at a time) where the build has the AVX-512 VNNI dot for it; the
    blocks as stored (kind 3) elsewhere. The tests above run both through the engine's paths."""
    runner = ModelRunner(_quantized("gguf-Q8_0"), 4, 4)
    layer = runner.fused().layers[0]
    kinds = {getattr(layer, n).kind for n in ("q", "k", "v", "o", "gate", "up", "down")}
    assert kinds == ({7} if build.mp_simd() == 2 else {3})
    head = runner.fused().fused_head[0]
    assert head.n == 261 and head.kind == 3  # rows not in whole groups of 16 keep the stored blocks


def test_int8_activations_are_the_runners_scoped_mode():
    """The runner multiplies GGUF layers with int8 activations inside its own forward only: the model
    it ran keeps its own numbers for every other caller (the runner used to set the mode on the layers)."""
    from types import SimpleNamespace

    from modelpress.nn.gguf_linear import GGUFLinear

    model = _quantized("gguf-Q8_0")
    layer = next(m for m in model.modules() if isinstance(m, GGUFLinear) and m.kind == "Q8_0")
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = layer(x)
        runner = ModelRunner(model, 4, 4)
        seq = SimpleNamespace(token_ids=[5, 6, 7], num_computed=0, block_table=[0, 1, 2, 3], adapter=-1)
        runner.run([seq], [3])
        after = layer(x)
        with int8_activations():
            rounded = layer(x)
    assert torch.equal(before, after)
    assert not torch.equal(rounded, before)  # the mode does change the numbers (int8 rounding)
    torch.testing.assert_close(rounded, before, rtol=0, atol=0.05 * before.abs().max().item())


def test_int8_activations_round_halves_away_from_zero(build):
    """x rounded per 32 as roundf does (halves away from zero, 0.49999997 down), on every build: through
    an identity LLM.int8 layer (W = I), a 32 whose max is 127 (d = 1) comes back as its rounded values
    (plus one shift common to the 32)."""
    from modelpress.kernels import ops
    from modelpress.model.fused_decode import _linear
    from modelpress.nn import Int8LtLinear

    mod = Int8LtLinear.from_linear(torch.nn.Linear(32, 32, bias=False))
    with torch.no_grad():
        mod.weight.copy_(torch.eye(32, dtype=torch.int8) * 127)
        mod.SCB.fill_(1.0)  # W = CB * SCB / 127 = I
    vals = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 3.4999998, 100.5, -126.5]
    x = torch.tensor(vals + [0.0] * (32 - len(vals)))[None]
    keep = []
    got = ops.linear_apply(build, _linear(mod, keep, True), x)[0, :len(vals)]
    rounded = torch.tensor([127.0, 1, 2, 3, -1, -2, -3, 0, 0, 3, 101, -127])
    # codes CB + 128 times the rounded x, minus 128 times the fp32 x's sum (the offset's term): each
    # output is its rounded x plus 128 / 127 of the 32's summed rounding (that is not a tie's size)
    drift = (rounded.double().sum() - x.double().sum()) * 128 / 127
    torch.testing.assert_close(got.double(), rounded.double() + drift, rtol=0, atol=1e-3)


@pytest.mark.parametrize("values", ["fp32", "bf16", "fp16"])
def test_packed_2_4_layers_decode_fused_on_their_values_and_positions(build, values):
    """SPARSE24 (SPARSE24_BF16 / _F16: a bf16 / fp16 model's values): the fused decode reads the kept values at their
    positions; layer by layer the dense product of the unpacked weight, and decoding gives the torch path's
    tokens and logits."""
    import torch.nn.functional as F

    from modelpress.kernels import KIND, ops
    from modelpress.model.fused_decode import _linear
    from modelpress.nn import Sparse24Linear

    model = _quantized("sparse24" if values == "fp32" else f"sparse24-{values}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[values]
    layers = [m for m in model.modules() if isinstance(m, Sparse24Linear)]
    assert len(layers) == 14
    assert {m.values.dtype for m in layers} == {dtype}
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(0))
    for mod in layers:
        lin = _linear(mod, [], False)
        assert lin.kind == KIND[{"fp32": "SPARSE24", "bf16": "SPARSE24_BF16", "fp16": "SPARSE24_F16"}[values]]
        xi = x[:, :mod.in_features].contiguous()
        ref = F.linear(xi, mod.dequantize())
        torch.testing.assert_close(ops.linear_apply(build, lin, xi), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    tokens, got = _decode(model, True, 30)
    ref_tokens, ref = _decode(model, False, 30)
    assert tokens == ref_tokens
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * ref.abs().max().item())
