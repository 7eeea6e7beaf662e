"""The W8A8 auto-tuner (kernels/tune.py): every variant it may choose gives the reference's numbers, the
timing cache is per CPU and kernel build and survives a new process, layers follow its choices, and
`modelpress tune` / `info --tuning` show the table."""
import json

import pytest
import torch

from modelpress import kernels
from modelpress.kernels import ops, tune
from modelpress.nn.w8a8_linear import W8A8Linear

pytestmark = pytest.mark.skipif(kernels.lib() is None, reason="no C compiler here: there are no kernels to tune")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty timing cache in tmp_path, quick timings, tuning on; the real cache untouched."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tune, "_cache", None)
    monkeypatch.setattr(tune, "BUDGET_S", 0.0002)
    monkeypatch.setattr(tune, "_enabled", True)
    return tmp_path


def test_row_buckets_round_up_and_cap():
    assert [tune.bucket(m) for m in (1, 2, 8, 9, 64, 65, 512, 4096)] == [1, 8, 8, 64, 64, 512, 512, 512]
    assert tune.key(576, 1536, 100) == "w8a8 576x1536 m512"


@pytest.mark.parametrize("mode", ["static", "token", "tensor"])
def test_every_variant_name_runs_the_same_numbers(mode):
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (70, 40), generator=gen, dtype=torch.int8)
    x, ws, bias = torch.randn(19, 40, generator=gen), torch.rand(70, generator=gen) / 50, torch.randn(70, generator=gen)
    xs = torch.tensor([0.01])
    packed, colsum = ops.w8a8_pack(kernels.lib(), w)
    names = tune.variants()
    assert tune.TORCH in names and tune.default_name() in names and len(names) >= 5
    want = tune.run_variant(tune.DEFAULT, x, w, packed, colsum, ws, bias, mode, xs)
    for name in names:
        assert torch.equal(tune.run_variant(name, x, w, packed, colsum, ws, bias, mode, xs), want), name


def test_tune_writes_a_cache_per_cpu_and_build_that_a_new_process_reads(cache):
    table, path = tune.tune([(40, 70)], rows=[1, 30])
    assert path.parent == cache / "modelpress" / "tuning" and kernels.build_id() in path.name
    assert [(r["shape"], r["rows"]) for r in table] == [("40x70", 1), ("40x70", 64)]
    for r in table:
        assert r["variants"] == len(tune.variants()) and r["choice"] in tune.variants() and r["timed_now"]
        assert r["best_us"] <= r["default_us"] and r["gain"] >= 1.0
    saved = json.loads(path.read_text())
    assert saved["cpu"] == kernels.cpu_name() and saved["build"] == kernels.build_id()
    assert set(saved["entries"]) == {"w8a8 40x70 m1", "w8a8 40x70 m64"}
    tune._cache = None  # as a new process: read back from the file
    assert tune.choice(40, 70, 20) == saved["entries"]["w8a8 40x70 m64"]["choice"]
    assert tune.choice(40, 71, 20) is None
    again, _ = tune.tune([(40, 70)], rows=[1])
    assert not again[0]["timed_now"]  # cached shapes are not timed again unless forced
    assert tune.tune([(40, 70)], rows=[1], force=True)[0][0]["timed_now"]


@pytest.mark.parametrize("chosen", ["torch", "last tile, rows outer, 1 thread"])
def test_a_layer_runs_the_cached_choice_with_unchanged_output(cache, monkeypatch, chosen):
    torch.manual_seed(0)
    layer = W8A8Linear.from_weight(torch.randn(48, 36), torch.randn(48), None, "token")
    x = torch.randn(5, 36)
    want = layer(x)
    name = tune.TORCH if chosen == "torch" else f"{ops.w8a8_tiles(kernels.lib())[-1]}/rows/t1"
    tune._load()[tune.key(36, 48, 5)] = {"choice": name, "us": {name: 1.0, tune.default_name(): 2.0}}
    seen = []
    real = tune.run_variant
    monkeypatch.setattr(tune, "run_variant", lambda n, *a: seen.append(n) or real(n, *a))
    assert torch.equal(layer(x), want) and seen == [name]
    layer(torch.randn(100, 36))  # another bucket: not tuned, the default call
    tune.set_enabled(False)
    layer(x)
    assert seen[1:] == [tune.DEFAULT, tune.DEFAULT]


def test_cli_tune_and_info_list_the_choices(cache, capsys, tmp_path):
    from modelpress.cli import main
    from tests.conftest import byte_tokenizer, tiny_llama
    from tests.model.test_load import write_tiny_gguf

    gguf = tmp_path / "tiny.gguf"
    model = tiny_llama()
    write_tiny_gguf(gguf, model, byte_tokenizer())
    assert main(["tune", str(gguf), "--rows", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    table = json.loads(out)
    shapes = {f"{m.in_features}x{m.out_features}" for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "layers" in name}
    assert {r["shape"] for r in table} == shapes and {r["rows"] for r in table} == {1} and "tuning" in err
    assert main(["info", str(gguf), "--tuning", "--json"]) == 0
    info = json.loads(capsys.readouterr()[0])
    assert f"{len(table)} shape x rows choices" in info["kernel_tuning"]
    assert {(c["shape"], c["choice"]) for c in info["kernel_choices"]} == {(r["shape"], r["choice"]) for r in table}
    assert main(["info", str(gguf), "--tuning"]) == 0
    assert "default_us" in capsys.readouterr()[0]
    assert main(["tune", str(gguf), "--rows", "0"]) == 2
