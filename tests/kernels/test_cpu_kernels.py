"""The hand-written kernels, SIMD and plain C builds, against torch references."""
import threading
from pathlib import Path

import pytest
import torch

from modelpress import kernels
from modelpress.core import int8_rowwise
from modelpress.core.codebook4 import CODES, dequantize_4bit, quantize_4bit
from modelpress.kernels import ops


@pytest.fixture(params=[True, "avx2", False], ids=["simd", "avx2", "plain"])
def lib(request):
    k = kernels.lib(simd=request.param)
    if k is None:
        pytest.skip("no C compiler here: the kernels cannot be built (layers use their reference path)")
    if request.param and k.mp_simd() == 0:
        pytest.skip("this CPU lacks AVX2/FMA/F16C: only the plain C build runs")
    if request.param == "avx2" and kernels.lib().mp_simd() < 2:
        pytest.skip("this CPU lacks AVX-512 VNNI: its best build is the AVX2 one, tested as 'simd'")
    return k


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n,k,bs", [(1536, 576, 64), (96, 96, 64), (160, 96, 32), (50, 576, 128), (7, 4096, 4096)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_code4_gemv(lib, quant_type, n, k, bs, m):
    gen = torch.Generator().manual_seed(n + m)
    w = torch.randn(n, k, generator=gen)
    packed, absmax = quantize_4bit(w, bs, quant_type)
    x = torch.randn(m, k, generator=gen)
    y = torch.empty(m, n)
    lib.mp_code4_gemv(x.data_ptr(), m, k, packed.data_ptr(), absmax.data_ptr(), CODES[quant_type].data_ptr(),
                      n, bs, y.data_ptr())
    ref = (x.double() @ dequantize_4bit(packed, absmax, (n, k), bs, quant_type).double().t())
    # fp32 sums in another order: observed <= 9e-6 relative to the row scale
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n,k,bs", [(1536, 576, 64), (33, 41, 64), (7, 4096, 4096), (5, 9, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_code4_dequant_is_bit_identical_to_codebook4(lib, quant_type, n, k, bs, dtype):
    """The dense weight as core/codebook4 computes it (odd counts and a partial last block included),
    bf16 as torch rounds those fp32 values; inf and NaN scales too."""
    from modelpress.kernels import ops

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 40
    packed, absmax = quantize_4bit(w, bs, quant_type)
    absmax[0] = float("inf") if absmax.numel() > 1 else absmax[0]
    absmax[-1] = float("nan") if absmax.numel() > 2 else absmax[-1]
    out = ops.code4_dequant(lib, packed, absmax, CODES[quant_type], (n, k), bs, dtype)
    ref = dequantize_4bit(packed, absmax, (n, k), bs, quant_type).to(dtype)
    assert out.dtype == dtype and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("n,k", [(1536, 576), (576, 1536), (100, 96), (33, 40)])
@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_int8_linear(lib, n, k, m, threshold):
    gen = torch.Generator().manual_seed(n + m)
    cb, scb = int8_rowwise.quantize_rows(torch.randn(n, k, generator=gen) * 0.05)
    x = torch.randn(m, k, generator=gen)
    x[:, 5] *= 8  # an outlier column when threshold > 0
    bias = torch.randn(n, generator=gen)
    y = torch.empty(m, n)
    lib.mp_int8_linear(x.data_ptr(), m, k, cb.data_ptr(), scb.data_ptr(), bias.data_ptr(), n, threshold, y.data_ptr())
    ref = int8_rowwise.int8_linear(x, cb, scb, bias, threshold)
    # integer products are exact; the scaling matches bitsandbytes' op order, the outlier sum
    # adds in another order: observed <= 4e-6
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cc = kernels._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    first = kernels._build(cc, kernels.FLAGS)
    assert first.parent == tmp_path / "modelpress" / "kernels" and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert kernels._build(cc, kernels.FLAGS) == first and first.stat().st_mtime_ns == mtime
    assert kernels._build(cc, [*kernels.FLAGS, "-DMP_NO_SIMD"]) != first
    assert [p.name for p in first.parent.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def _voluntary_switches() -> int:
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        try:
            total += int(status.read_text().split("voluntary_ctxt_switches:")[1].split()[0])
        except (OSError, IndexError):  # a thread that ended meanwhile
            pass
    return total


def test_release_threads_lets_another_thread_run_parallel_work_without_sleeping():
    """The HTTP server loads the model on its main thread and steps the engine on another. With the
    main thread's OpenMP pool alive, libgomp manages more threads than CPUs and its workers sleep
    between parallel regions: ~2 context switches per kernel call (80000 in a 32 x 128 batch).
    After release_threads() on the main thread, the other thread's workers spin as usual."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("counts context switches from /proc (Linux)")
    from modelpress.core import kquants

    k = kernels.lib()
    if k is None:
        pytest.skip("no C compiler here")
    data = kquants.quantize(torch.randn(512, 512), "Q8_0")
    x, y = torch.randn(8, 512), torch.empty(8, 512)
    calls = 400
    counts = []

    def run() -> None:
        counts.append(_voluntary_switches())
        for _ in range(calls):
            k.mp_block_gemv(x.data_ptr(), 8, 512, data.data_ptr(), 3, 512, y.data_ptr())
        counts.append(_voluntary_switches())

    run()  # this (the main) thread's pool exists now, as after loading a model
    kernels.release_threads()
    counts.clear()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert counts[1] - counts[0] < calls // 4


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_affine_gemv_runs_every_gguf_type(lib, kind, m):
    from modelpress.core import kquants

    gen = torch.Generator().manual_seed(m)
    n, k = 96, 512
    w = torch.randn(n, k, generator=gen)
    data = kquants.quantize(w, kind)
    q, scale, offset = kquants.affine(data, kind, k)
    x = torch.randn(m, k, generator=gen)
    y = torch.empty(m, n)
    lib.mp_affine_gemv(x.data_ptr(), m, k, q.data_ptr(), scale.data_ptr(), offset.data_ptr(), n,
                       kquants.GROUP[kind], y.data_ptr())
    ref = x.double() @ kquants.dequantize(data, kind, k).double().t()
    # fp32 sums in another order: observed <= 3e-6 relative to the largest output
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0", "Q8_0"])
def test_quantize_legacy_equals_the_torch_reference(lib, kind, monkeypatch):
    from modelpress.core import kquants

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(40, 256, generator=gen)
    w[0] *= 1e-6            # d a subnormal fp16
    w[1] *= 1e-9            # d rounds to zero
    w[2, :32] = 3e6         # d past fp16's range: inf
    w[3] = -0.0
    w[4, 5] = 1e4           # one outlier
    w[5, :32] = 0.5 * torch.arange(32)  # ties in x / d + 8.5
    with kquants.torch_reference():
        want = kquants.quantize(w, kind)
    got = torch.empty_like(want)
    lib.mp_quantize_legacy(w.contiguous().data_ptr(), w.numel() // 32, kernels.KIND[kind],
                           got.data_ptr())
    assert torch.equal(got, want)


def _int8_activations(x):
    """ggml's quantize_row_q8_0 as its x86 build runs it, in torch: per 32, q = round(x * (127 /
    amax)) with halves to even, d = amax / 127 kept in fp16; returns the values d * q the kernels
    multiply."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax != 0, 127 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127).half().float()).reshape(x.shape)


def _int8_activations_k(x):
    """ggml's quantize_row_q8_K_ref in torch (the K types' activations): per 256, mx the value of
    largest magnitude (the first), iscale = -127 / mx, q = min(127, round(iscale * x)) with halves to
    even, d = 1 / iscale in fp32; returns d * q."""
    xb = x.reshape(x.shape[0], -1, 256)
    mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))   # argmax: the first of equal magnitudes
    iscale = torch.where(mx != 0, -127 / mx, torch.zeros_like(mx))
    q = torch.round(iscale * xb).clamp(max=127)
    d = torch.where(mx != 0, 1 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(x.shape)


# k = 800: an odd number of 32-blocks (the AVX-512 dots take two at a time)
@pytest.mark.parametrize("kind,code,k", [("Q8_0", 3, 768), ("Q8_0", 3, 800), ("Q5_0", 4, 768), ("Q5_0", 4, 800),
                                         ("Q4_K", 5, 768), ("Q6_K", 6, 768)])
@pytest.mark.parametrize("m", [1, 3, 6])
def test_block_gemv_is_int8_activations_times_the_blocks(lib, kind, code, k, m):
    from modelpress.core import kquants

    gen = torch.Generator().manual_seed(m)
    n = 70
    w = torch.randn(n, k, generator=gen)
    w[0, :32] = 0                                         # an all-zero block
    data = kquants.quantize(w, kind)
    x = torch.randn(m, k, generator=gen) * 3
    x[:, 32:64] = 0                                       # an all-zero activation block: d = 0
    y = torch.empty(m, n)
    lib.mp_block_gemv(x.data_ptr(), m, k, data.data_ptr(), code, n, y.data_ptr())
    xr = _int8_activations(x) if code <= 4 else _int8_activations_k(x)
    ref = xr.double() @ kquants.dequantize(data, kind, k).double().t()
    # exact integer block sums; only the fp32 sum over the blocks differs in order
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())
    # and the rounding of x is the approximation: within 1 % of the float product here
    full = x.double() @ kquants.dequantize(data, kind, k).double().t()
    assert (y.double() - full).abs().max() < 0.01 * full.abs().max()


@pytest.mark.parametrize("m", [1, 20])
def test_int8_activations_round_halves_to_even(lib, m):
    """The per-32 rounding (Q8_0 / Q5_0 layers) on exact halves, as ggml's x86 quantize_row_q8_0
    (_mm256_round_ps, nearest even): amax 127 gives a scale of 1, so x itself is rounded; a one-hot
    Q8_0 weight row j reads back activation j."""
    from modelpress.core import kquants

    halves = [127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5, 0.49999997, -0.49999997, 3.4999998, -0.0]
    x = torch.zeros(m, 64)
    x[:, :len(halves)] = torch.tensor(halves)
    x[:, 32:64] = torch.linspace(-0.5, 0.5, 32) * 254      # a second block: d = 1 again, halves again
    data = kquants.quantize(torch.eye(64), "Q8_0")
    y = torch.empty(m, 64)
    lib.mp_block_gemv(x.data_ptr(), m, 64, data.data_ptr(), 3, 64, y.data_ptr())
    wd = kquants.dequantize(data, "Q8_0", 64).diagonal()    # the one-hot weights as stored (fp16 d x 127)
    want = torch.round(x.double())
    torch.testing.assert_close(y.double(), want * wd.double(), rtol=1e-7, atol=0)
    assert want[0, :13].tolist() == [127, 2, -2, 0, 0, 2, -2, 126, -126, 0, 0, 3, 0]


@pytest.mark.parametrize("kind,code,k", [("Q8_0", 3, 512), ("Q8_0", 3, 544), ("Q5_0", 4, 512), ("Q5_0", 4, 544),
                                         ("Q4_K", 5, 512), ("Q6_K", 6, 512)])
def test_block_gemv_rows_together_equal_each_row_alone(lib, kind, code, k):
    """Nine rows go through the four-row kernels (twice) and the one-row kernel (once): each row's
    outputs are bit for bit what that row computes alone, so that a sequence's numbers in the engine
    do not depend on what shares its batch."""
    from modelpress.core import kquants

    gen = torch.Generator().manual_seed(5)
    n, m = 37, 9
    data = kquants.quantize(torch.randn(n, k, generator=gen), kind)
    x = torch.randn(m, k, generator=gen) * 2
    together = torch.empty(m, n)
    lib.mp_block_gemv(x.data_ptr(), m, k, data.data_ptr(), code, n, together.data_ptr())
    for r in range(m):
        alone = torch.empty(1, n)
        lib.mp_block_gemv(x[r:r + 1].contiguous().data_ptr(), 1, k, data.data_ptr(), code, n, alone.data_ptr())
        assert torch.equal(together[r], alone[0]), r


@pytest.mark.parametrize("n,k", [(64, 768), (48, 800), (160, 576)])
def test_q8_0_packed_by_16_rows_is_the_same_product(lib, n, k):
    """Kind 7: Q8_0 rows repacked 16 at a time (the fused decode's form of Q8_0 on AVX-512 VNNI, as
    many bytes as the blocks) multiply as the blocks do: the int8 activations times the blocks
    (exact integer block sums), and each of 37 rows (through the 16-, 4- and 1-row kernels) bit for
    bit what it computes alone."""
    from modelpress.core import kquants

    gen = torch.Generator().manual_seed(n)
    data = kquants.quantize(torch.randn(n, k, generator=gen), "Q8_0")
    packed = torch.empty_like(data)
    lib.mp_pack_q8_0x16(data.data_ptr(), n, k, packed.data_ptr())
    assert not torch.equal(packed, data) and packed.sum() != data.sum()  # moved and re-signed
    m = 37
    x = torch.randn(m, k, generator=gen) * 3
    x[:, 32:64] = 0                                       # an all-zero activation block: d = 0
    y = torch.empty(m, n)
    lib.mp_block_gemv(x.data_ptr(), m, k, packed.data_ptr(), 7, n, y.data_ptr())
    ref = _int8_activations(x).double() @ kquants.dequantize(data, "Q8_0", k).double().t()
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())
    for r in (0, 20, 36):
        alone = torch.empty(1, n)
        lib.mp_block_gemv(x[r:r + 1].contiguous().data_ptr(), 1, k, packed.data_ptr(), 7, n, alone.data_ptr())
        assert torch.equal(y[r], alone[0]), r


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_1", "Q8_0", "Q3_K", "Q6_K"])
def test_affine_dequant_is_bit_identical_to_kquants(lib, kind):
    from modelpress.core import kquants

    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(1))
    data = kquants.quantize(w, kind)
    q, scale, offset = kquants.affine(data, kind, 512)
    out = torch.empty(48, 512)
    lib.mp_affine_dequant(q.data_ptr(), scale.data_ptr(), offset.data_ptr(), 48, 512, kquants.GROUP[kind], out.data_ptr())
    assert torch.equal(out, kquants.dequantize(data, kind, 512))


@pytest.mark.parametrize("n_heads,n_kv", [(6, 2), (4, 4)])
@pytest.mark.parametrize("hd", [16, 64, 128])
def test_paged_attention_equals_sdpa_over_gathered_keys(lib, n_heads, n_kv, hd):
    """Sequences of different lengths (full groups of eight positions and a rest), their positions
    scattered over the cache's slots; head sizes through the generic loop (16) and the 64-lane one."""
    gen = torch.Generator().manual_seed(n_heads)
    slots_total, lens = 200, [1, 7, 33, 64]
    kc = torch.randn(slots_total, n_kv, hd, generator=gen)
    vc = torch.randn(slots_total, n_kv, hd, generator=gen)
    q = torch.randn(len(lens), n_heads, hd, generator=gen)
    lmax = max(lens)
    slots = torch.zeros(len(lens), lmax, dtype=torch.long)
    for b, L in enumerate(lens):
        slots[b, :L] = torch.randperm(slots_total, generator=gen)[:L]
    out, lengths = torch.empty_like(q), torch.tensor(lens)
    lib.mp_paged_attention(q.data_ptr(), len(lens), n_heads, n_kv, hd, kc.data_ptr(), vc.data_ptr(), slots.data_ptr(),
                           lengths.data_ptr(), lmax, out.data_ptr())
    for b, L in enumerate(lens):
        k = kc[slots[b, :L]].transpose(0, 1).double()          # (n_kv, L, hd)
        v = vc[slots[b, :L]].transpose(0, 1).double()
        ref = torch.nn.functional.scaled_dot_product_attention(q[b][:, None].double(), k, v, enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[b].double(), ref, rtol=0, atol=1e-5)


def test_softmax_exponential_is_within_two_ulp(lib):
    x = torch.cat([torch.linspace(-87, 0, 100003), torch.tensor([0.0, -1e-8, -0.5, -1.0, -20.0, -86.99])])
    y = torch.empty_like(x)
    lib.mp_exp_f32(x.data_ptr(), x.numel(), y.data_ptr())
    ref = torch.exp(x.double())
    assert ((y.double() - ref).abs() / ref).max() < 2.5 * 2.0 ** -23
    assert y[100003] == 1.0


def test_one_numbering_of_kinds_in_c_and_python():
    """cpu_kernels.c's enum of weight kinds and its Python mirror (kernels.KIND) say the same."""
    import re

    source = kernels.HEADER.read_text()
    enum = dict(re.findall(r"MP_(\w+) = (\d+)", source[source.index("enum {"):source.index("};", source.index("enum {"))]))
    assert {name.upper(): int(v) for name, v in enum.items()} == {k.upper(): v for k, v in kernels.KIND.items()}


def _w8a8_reference(x, w, ws, bias, mode, xs):
    """gemm_int8.c's definition in torch: row scales, int8 rows, int64 sums, the fp32 epilogue."""
    if mode == "static":
        s = xs.expand(x.shape[0])
    else:
        mx = x.abs().amax(-1) if mode == "token" else x.abs().amax().expand(x.shape[0])
        s = torch.where(mx > 0, mx / 127.0, torch.ones_like(mx))
    q = torch.round(x / s[:, None]).clamp(-128, 127)
    acc = q.to(torch.int64) @ w.to(torch.int64).t()
    y = acc.to(torch.int32).float() * (s[:, None] * ws[None, :])
    return acc, (y if bias is None else y + bias)


@pytest.mark.parametrize("m,n,k", [(1, 1536, 576), (7, 576, 1536), (37, 40, 33), (130, 100, 96), (5, 3, 5)])
@pytest.mark.parametrize("mode", ["static", "token", "tensor"])
def test_w8a8_linear_sums_are_exact_and_its_output_is_the_reference_s(lib, m, n, k, mode):
    from modelpress.kernels import ops

    gen = torch.Generator().manual_seed(m * n + k)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w[0, :] = 127  # the extreme sums: 127 * 127 * k
    x = torch.randn(m, k, generator=gen) * 3
    x[0] = 0.0 if m > 1 else x[0]  # a zero row: scale 1
    ws = torch.rand(n, generator=gen) / 100
    bias = torch.randn(n, generator=gen) if n % 2 == 0 else None
    xs = torch.tensor([0.02])  # static: clips the tail (|x| > 2.54), -128 included
    packed, colsum = ops.w8a8_pack(lib, w)
    y, acc = ops.w8a8_linear(lib, x, packed, colsum, ws, bias, n, mode, xs, with_sums=True)
    ref_acc, ref_y = _w8a8_reference(x, w, ws, bias, mode, xs)
    assert torch.equal(acc.to(torch.int64), ref_acc)
    assert torch.equal(y, ref_y)


@pytest.mark.parametrize("m,n,k", [(1, 200, 68), (29, 150, 36), (13, 16 * 9, 8)])
def test_every_w8a8_tile_loop_order_and_thread_count_gives_the_same_exact_numbers(lib, m, n, k):
    """The auto-tuner picks among these variants by time alone: each must be the reference, edge tiles included."""
    from modelpress.kernels import ops

    gen = torch.Generator().manual_seed(m + n + k)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    x, ws, bias = torch.randn(m, k, generator=gen), torch.rand(n, generator=gen) / 100, torch.randn(n, generator=gen)
    packed, colsum = ops.w8a8_pack(lib, w)
    ref_acc, ref_y = _w8a8_reference(x, w, ws, bias, "token", None)
    tiles = ops.w8a8_tiles(lib)
    assert len(tiles) >= (1 if lib.mp_simd() == 0 else 5) and all(t.count("x") == 1 for t in tiles)
    for tile in range(len(tiles)):
        for order in (0, ops.W8A8_ROWS_OUTER):
            for threads in (0, 1):
                y, acc = ops.w8a8_linear(lib, x, packed, colsum, ws, bias, n, "token", with_sums=True,
                                         variant=tile + order, threads=threads)
                assert torch.equal(acc.to(torch.int64), ref_acc), (tiles[tile], order, threads)
                assert torch.equal(y, ref_y), (tiles[tile], order, threads)


@pytest.mark.parametrize("n,k", [(1536, 576), (576, 1536), (37, 8), (33, 72), (5, 4096)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_sparse24_gemv_multiplies_the_packed_weight(lib, n, k, m):
    """The kept values times x at their stored positions (k: whole 64-steps, 16-steps and the 8-wide tail),
    including groups with extra zeros; the packed bytes are 17/32 of the dense ones."""
    from modelpress.core import sparsity

    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g)
    w[sparsity.magnitude_mask(w, 0, 2, 4)] = 0
    w[::3, ::5] = 0  # some groups keep fewer than two
    values, idx = sparsity.pack_24(w)
    assert values.numel() * 4 + idx.numel() == 17 / 32 * w.numel() * 4
    x = torch.randn(m, k, generator=g)
    y = ops.sparse24_gemv(lib, x, values, idx)
    ref = (x.double() @ w.double().T).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * k ** 0.5)
    # bf16 / fp16 values (a bf16 / fp16 model's packed layers): widened exactly, so the same sums as their fp32
    # copy, bit for bit
    for dtype in (torch.bfloat16, torch.float16):
        half = values.to(dtype)
        assert half.numel() * 2 + idx.numel() == 9 / 32 * w.numel() * 4
        assert torch.equal(ops.sparse24_gemv(lib, x, half, idx), ops.sparse24_gemv(lib, x, half.float(), idx))
