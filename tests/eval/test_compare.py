"""The comparison (eval/compare.py, eval/report.py) on the tiny model, rows run in this process."""
import json

import pytest
import torch

from modelpress.errors import ModelpressError
from modelpress.eval.compare import compare, recipe
from modelpress.eval.divergence import divergence, reference, token_kl
from modelpress.eval.perplexity import perplexity_of_windows
from modelpress.eval.report import pareto_front


def test_divergence_against_a_direct_computation(tiny):
    model, _ = tiny
    wins = torch.randint(0, 261, (3, 40), generator=torch.Generator().manual_seed(0))
    ref = reference(model, wins, progress=False)
    same = divergence(model, wins, ref, progress=False)
    assert same.kl_mean < 1e-6 and same.top1_agreement == 1.0
    assert abs(same.ppl / perplexity_of_windows(model, wins, progress=False).ppl - 1) < 1e-5
    assert abs(same.ppl / __import__("math").exp(ref.nll / same.tokens_scored) - 1) < 1e-9
    other = type(model)(model.config).eval()  # another random model
    d = divergence(other, wins, ref, progress=False)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=wins).logits[:, :-1].double(), -1)
        q = torch.log_softmax(other(input_ids=wins).logits[:, :-1].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert abs(d.kl_mean - kl.mean().item()) < 1e-5 * kl.mean().item() + 1e-7
    assert abs(d.top1_agreement - (p.argmax(-1) == q.argmax(-1)).double().mean().item()) < 1e-12
    assert torch.allclose(token_kl(p, q), kl)
    # +- as llama-perplexity: ppl x sqrt(var(token loss) / n), and the KL's standard error
    loss = -q.gather(-1, wins[:, 1:, None]).squeeze(-1).flatten()
    n = loss.numel()
    assert abs(d.ppl_stderr / (d.ppl * (loss.var() / n).sqrt().item()) - 1) < 1e-4
    assert abs(d.kl_stderr / (kl.flatten().var() / n).sqrt().item() - 1) < 1e-4


def test_the_report_shows_errors_and_rows_within_noise():
    from modelpress.eval.report import markdown, within_noise

    rows = [{"method": "a", "size_bytes": 3e6, "ppl": 10.0, "ppl_stderr": 0.3, "kl_mean": 0.01, "kl_stderr": 0.001},
            {"method": "b", "size_bytes": 2e6, "ppl": 10.2, "ppl_stderr": 0.3, "kl_mean": 0.02, "kl_stderr": 0.002},
            {"method": "c", "size_bytes": 1e6, "ppl": 12.0, "ppl_stderr": 0.4, "kl_mean": 0.05, "kl_stderr": 0.003}]
    assert within_noise(rows) == {"b": "a"}  # 0.2 < 0.42; c is 1.8 past b (0.5)
    speeds = {"a": 50.0, "b": 80.0, "c": 60.0}
    for r in rows:
        r["decode_tokens_per_s"] = speeds[r["method"]]
    assert pareto_front(rows) == ["a", "b", "c"] and pareto_front(rows, "speed") == ["a", "b"]  # c: slower, worse
    md = markdown({"model": "m", "rows": rows, "settings": {"eval_windows": 2, "ctx": 8, "eval_text": None,
                                                          "samples": 1, "calib_text": None, "decode_tokens": 1}})
    assert "10.2000 ± 0.30 (≈ a)" in md and "12.0000 ± 0.40 |" in md and "0.05000 ± 0.00300" in md


def test_pareto_front():
    rows = [{"method": "a", "size_bytes": 10, "ppl": 5.0}, {"method": "b", "size_bytes": 20, "ppl": 4.0},
            {"method": "c", "size_bytes": 20, "ppl": 6.0}, {"method": "d", "size_bytes": 30, "ppl": 4.0}]
    assert pareto_front(rows) == ["a", "b"]


def test_recipes():
    assert recipe("GPTQ-W4").args["act_order"] is True
    assert recipe("q4_k_m-imat").args == {"mix": "Q4_K_M", "imatrix": True}
    assert recipe("auto-q3_k_m").args["target_mix"] == "Q3_K_M"
    assert recipe("auto-4.5").args["target_bpw"] == 4.5
    assert recipe("auto-q4_k_m@q4_0+q8_0").args["formats"] == ["Q4_0", "Q8_0"]
    for bad in ("q9_k", "auto-x", "gptq-w5", "auto-4.5@q9_0"):
        with pytest.raises(ModelpressError):
            recipe(bad)


def test_fresh_recomputes_and_rows_survive(tmp_path, tiny_hf_dir):
    d, _, _ = tiny_hf_dir
    kw = dict(out=tmp_path / "c", eval_windows=2, samples=2, ctx=32, decode_tokens=2, isolate=False, progress=False)
    first = compare(str(d), ["fp32", "nf4", "auto-q8_0"], **kw)
    rows = sorted(p.name for p in (tmp_path / "c" / "rows").iterdir())
    assert len(rows) == 3 and not (tmp_path / "c" / "work").exists()
    again = compare(str(d), ["fp32", "nf4", "auto-q8_0"], fresh=True, **kw)
    for a, b in zip(first["rows"], again["rows"]):  # deterministic: the same figures
        assert a["ppl"] == b["ppl"] and a["size_bytes"] == b["size_bytes"]
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["fp32", "nf4", "auto-q8_0"]
    assert saved["rows"][2]["kl_mean"] < 0.01  # at Q8_0's size: nearly the original (observed 1e-4)
    md = (tmp_path / "c" / "report.md").read_text()
    assert md.index("| nf4") < md.index("| fp32")  # sorted by size
    assert "<img" in (tmp_path / "c" / "report.html").read_text()


def test_a_row_failing_in_its_process_reports_why(tmp_path):
    from safetensors.torch import save_file

    from modelpress.eval import compare as c

    save_file({"eval": torch.zeros(1, 8, dtype=torch.long)}, str(tmp_path / "ids.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "ref.safetensors"))
    data = {"ids": tmp_path / "ids.safetensors", "ref": tmp_path / "ref.safetensors"}
    setup = c.Setup(str(tmp_path / "missing.gguf"), None, None)
    row = tmp_path / "row.json"
    err = c._run_row(c.recipe("fp32"), setup, "k", row, data, tmp_path, isolate=True, progress=False)
    assert "missing.gguf does not exist" in err and not row.exists()    # a user's mistake: its message
    data["ids"] = tmp_path / "absent.safetensors"
    err = c._run_row(c.recipe("fp32"), setup, "k", row, data, tmp_path, isolate=True, progress=False)
    assert err.startswith(("FileNotFoundError", "SafetensorError")), err  # a crash: its traceback's last line


def test_w8a8_rows(tmp_path, tiny_hf_dir):
    d, _, _ = tiny_hf_dir
    assert recipe("w8a8-sq").args["smoothquant"] == "search" and recipe("w8a8-dyn").args["granularity"] == "token"
    out = compare(str(d), ["fp32", "w8a8", "w8a8-dyn", "w8a8-sq"], out=tmp_path / "c", eval_windows=2, samples=4,
                  ctx=32, decode_tokens=2, isolate=False, progress=False)
    rows = {r["method"]: r for r in out["rows"]}
    for name in ("w8a8", "w8a8-dyn", "w8a8-sq"):
        assert rows[name]["kl_mean"] < 0.02, rows[name]  # int8 both ways: near the float model (observed 2e-4 to 5e-3)
        assert rows[name]["size_bytes"] < 0.5 * rows["fp32"]["size_bytes"]


def test_qat_rows(tmp_path, tiny_hf_dir):
    """qat-q4_0 / qat-w4: trained on the calibration windows, then written by the target's own quantizer
    (a Q4_0 GGUF; RTN w4 g64 codes): the rows' sizes are those of the plain rows, their time includes
    the training."""
    d, _, _ = tiny_hf_dir
    assert recipe("qat-q4_0").args["target"] == "Q4_0" and recipe("qat-w4").args["target"]["bits"] == 4
    out = compare(str(d), ["fp32", "q4_0", "qat-q4_0", "rtn-w4", "qat-w4"], out=tmp_path / "c", eval_windows=2,
                  samples=4, ctx=32, decode_tokens=2, isolate=False, progress=False)
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["qat-q4_0"]["size_bytes"] == rows["q4_0"]["size_bytes"]
    assert rows["qat-w4"]["bits_per_weight"] == rows["rtn-w4"]["bits_per_weight"]
    assert rows["qat-q4_0"]["ppl"] != rows["q4_0"]["ppl"] and rows["qat-w4"]["ppl"] != rows["rtn-w4"]["ppl"]
    assert rows["qat-q4_0"]["quantize_seconds"] > rows["q4_0"]["quantize_seconds"]


def test_prune_rows(tmp_path, tiny_hf_dir):
    d, _, _ = tiny_hf_dir
    out = compare(str(d), ["fp32", "magnitude-50", "sparsegpt-50", "sparsegpt-2:4-w4"], out=tmp_path / "c",
                  eval_windows=2, samples=4, ctx=32, decode_tokens=2, isolate=False, progress=False)
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["sparsegpt-50"]["kl_mean"] < rows["magnitude-50"]["kl_mean"]
    assert rows["sparsegpt-2:4-w4"]["size_bytes"] < 0.5 * rows["fp32"]["size_bytes"]


def test_the_html_table_sorts_by_a_clicked_column(tmp_path):
    """report.html's script (run in node against a minimal stand-in for the page's table): a click on a
    header sorts the rows by that column, numbers as numbers; a second click reverses them."""
    import shutil
    import subprocess

    from modelpress.eval.report import _SORT_JS

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (Debian's nodejs); the script is not run")
    harness = """
const rows = [['head', ''], ['q8_0', '145.2'], ['q4_k_m', '99.5'], ['nf4', '1000.0']].map(
  ([a, b]) => ({cells: [{textContent: a}, {textContent: b}]}));
const table = {get rows() { return rows; }, appendChild(r) { rows.splice(rows.indexOf(r), 1); rows.push(r); }};
const ths = [{dataset: {}}, {dataset: {}}];
global.document = {querySelectorAll: () => ths, getElementById: () => table};
""" + _SORT_JS + """
ths[1].onclick(); const up = rows.slice(1).map(r => r.cells[0].textContent).join(',');
ths[1].onclick(); const down = rows.slice(1).map(r => r.cells[0].textContent).join(',');
console.log(up + ' ' + down);
"""
    (tmp_path / "t.js").write_text(harness)
    out = subprocess.run([node, str(tmp_path / "t.js")], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["q4_k_m,q8_0,nf4", "nf4,q8_0,q4_k_m"]  # 99.5 < 145.2 < 1000 (not as text: "1000" < "145")


def test_other_text_gives_every_row_an_out_of_domain_ppl(tmp_path, tiny_hf_dir):
    """compare --other-text: every row also evaluated on a second text, its change against the original's ppl
    on it in the table; fp32's change is 0; without it the columns are absent. The packed 2:4 row is smaller
    than fp32."""
    from modelpress.eval.report import markdown

    d, _, _ = tiny_hf_dir
    other = tmp_path / "other.txt"
    other.write_text(" ".join(f"the {w} of winter {i}" for i, w in enumerate(["cat", "tree", "stone"] * 60)))
    out = compare(str(d), ["fp32", "rtn-w4", "gptq-w4", "sparsegpt-2:4-packed"], out=tmp_path / "c", eval_windows=2,
                  samples=4, ctx=32, decode_tokens=2, isolate=False, progress=False, other_text=str(other))
    rows = {r["method"]: r for r in out["rows"]}
    assert abs(rows["fp32"]["ppl_other_change_pct"]) < 1e-3  # the same weights (sums in another order)
    ref = rows["fp32"]["ppl_other"]
    for name in ("rtn-w4", "gptq-w4"):
        assert rows[name]["ppl_other"] != ref
        assert abs(rows[name]["ppl_other_change_pct"] - 100 * (rows[name]["ppl_other"] / ref - 1)) < 1e-3
    assert rows["sparsegpt-2:4-packed"]["size_bytes"] < 0.75 * rows["fp32"]["size_bytes"]
    md = markdown(out)
    assert "ppl other text" in md and str(other) in md
    # the sensitivity map: every decoder linear, a PNG, in the page and named in the report
    assert len(out["sensitivity"]) == 14 and (tmp_path / "c" / "sensitivity.png").is_file()
    assert "per-layer sensitivity map" in (tmp_path / "c" / "report.html").read_text() and "Most sensitive" in md
    plain = compare(str(d), ["fp32"], out=tmp_path / "p", eval_windows=2, samples=4, ctx=32, decode_tokens=2,
                    isolate=False, progress=False)
    assert "ppl other text" not in markdown(plain)
    assert plain["source_format"] is None and "The original is" not in markdown(plain)  # a float original
    with pytest.raises(ModelpressError, match="does not exist"):
        compare(str(d), ["fp32"], out=tmp_path / "q", ctx=32, isolate=False, progress=False,
                other_text=str(tmp_path / "missing.txt"))


def test_a_quantized_original_is_named_in_the_report(tmp_path):
    """A GGUF original whose weights are blocks (the default model: Q4_1): the report says the reference is
    that file dequantized, and a row of the same type re-quantizes it exactly (the same ppl); an F32 GGUF
    is a float original."""
    import modelpress
    from modelpress.eval.compare import source_format
    from modelpress.eval.report import markdown
    from tests.conftest import byte_tokenizer, tiny_llama

    path, f32 = tmp_path / "m.gguf", tmp_path / "f.gguf"
    modelpress.export_gguf(tiny_llama(), byte_tokenizer(), path, "Q8_0", progress=False)
    modelpress.export_gguf(tiny_llama(), byte_tokenizer(), f32, "F32", progress=False)
    assert source_format(str(path)) == "Q8_0" and source_format(str(f32)) is None
    out = compare(str(path), ["fp32", "q8_0", "q4_0"], out=tmp_path / "c", eval_windows=2, samples=4, ctx=32,
                  decode_tokens=2, isolate=False, progress=False)
    md = markdown(out)
    assert out["source_format"] == "Q8_0" and "The original is a Q8_0 GGUF, dequantized" in md
    assert "The original is a Q8_0 GGUF" in (tmp_path / "c" / "report.html").read_text()
    ppl = {r["method"]: r["ppl"] for r in out["rows"]}
    assert ppl["q8_0"] == ppl["fp32"] != ppl["q4_0"]
