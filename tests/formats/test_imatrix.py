"""llama.cpp's imatrix files: both formats round-trip, and each matches the layout llama.cpp
writes (the legacy bytes built here from imatrix.cpp's save_imatrix_legacy, the GGUF one read by
the gguf package's own reader)."""
import struct

import numpy as np
import pytest
import torch

from modelpress import ModelpressError
from modelpress.formats.imatrix import Imatrix, load_imatrix, save_imatrix


def _sample() -> Imatrix:
    g = torch.Generator().manual_seed(0)
    return Imatrix({"blk.0.attn_q.weight": torch.rand(64, generator=g) * 3,
                    "blk.1.ffn_down.weight": torch.rand(160, generator=g)},
                   {"blk.0.attn_q.weight": 1536, "blk.1.ffn_down.weight": 1536}, 3, 512, ["calib.txt"])


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_round_trip_keeps_the_importance(tmp_path, suffix):
    im = _sample()
    back = load_imatrix(save_imatrix(tmp_path / f"imatrix{suffix}", im))
    assert (back.chunk_count, back.chunk_size, back.datasets) == (3, 512, ["calib.txt"])
    assert back.counts == im.counts
    for name, v in im.importance().items():
        # legacy files keep sum/count * ncall: the importance comes back within fp32 rounding
        torch.testing.assert_close(back.importance()[name], v, rtol=2e-7 if suffix == ".dat" else 0, atol=0)


def test_gguf_layout_is_llama_cpps(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    path = save_imatrix(tmp_path / "imatrix.gguf", _sample())
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    assert r.fields["imatrix.datasets"].contents() == ["calib.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 3 and r.fields["imatrix.chunk_size"].contents() == 512
    t = {x.name: x for x in r.tensors}
    assert sorted(t) == ["blk.0.attn_q.weight.counts", "blk.0.attn_q.weight.in_sum2",
                         "blk.1.ffn_down.weight.counts", "blk.1.ffn_down.weight.in_sum2"]
    # ggml shapes, innermost first: in_sum2 (n_cols, n_mat), counts (1, n_mat), both F32
    assert list(t["blk.1.ffn_down.weight.in_sum2"].shape) == [160, 1]
    assert list(t["blk.1.ffn_down.weight.counts"].shape) == [1, 1]
    assert t["blk.1.ffn_down.weight.counts"].tensor_type == gguf.GGMLQuantizationType.F32
    assert float(t["blk.1.ffn_down.weight.counts"].data.reshape(-1)[0]) == 1536.0


def test_reads_a_legacy_file_as_llama_imatrix_writes_it(tmp_path):
    # save_imatrix_legacy: n_entries; per entry: len, name, ncall, nval, (sum/count)*ncall; then
    # the chunk count and the dataset name
    vals = np.array([0.5, 2.0, 4.0], np.float32)
    raw = struct.pack("<i", 1) + struct.pack("<i", 19) + b"blk.0.attn_v.weight" + struct.pack("<ii", 6, 3)
    raw += (vals * 6).astype("<f4").tobytes() + struct.pack("<ii", 6, 9) + b"wiki.test"
    (tmp_path / "old.dat").write_bytes(raw)
    im = load_imatrix(tmp_path / "old.dat")
    assert im.datasets == ["wiki.test"] and im.chunk_count == 6
    assert torch.equal(im.importance()["blk.0.attn_v.weight"], torch.from_numpy(vals))  # what llama-quantize uses
    assert save_imatrix(tmp_path / "again.dat", im).read_bytes() == raw


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(ModelpressError, match="no imatrix file"):
        load_imatrix(tmp_path / "missing.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\x01\x00")
    with pytest.raises(ModelpressError, match="not a llama.cpp imatrix file"):
        load_imatrix(tmp_path / "junk.dat")
