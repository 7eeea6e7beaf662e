"""The command line: user mistakes give one line and exit code 2; the commands run end to end."""
import json
import os
import subprocess
import sys

import pytest

import modelpress
from modelpress.cli import main
from tests.conftest import byte_tokenizer, tiny_llama
from tests.model.test_load import write_tiny_gguf


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("modelpress: error:"), err
    assert "Traceback" not in err


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_llama(), byte_tokenizer())
    return path


def test_bad_input_one_line_exit_2(tmp_path, capsys, tiny_gguf):
    _one_line_error(*_run(capsys, "eval", str(tmp_path / "missing"))[::2])
    data = tiny_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    _one_line_error(*_run(capsys, "eval", str(tmp_path / "cut.gguf"))[::2])
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text(json.dumps(tiny_llama().config.to_dict()))
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"not safetensors at all")
    _one_line_error(*_run(capsys, "info", str(tmp_path / "garbage"))[::2])
    _one_line_error(*_run(capsys, "eval", str(tmp_path / "garbage"))[::2])
    _one_line_error(*_run(capsys, "quantize", str(tiny_gguf), "--group-size", "0", "--out", str(tmp_path / "o"))[::2])
    _one_line_error(*_run(capsys, "quantize", str(tiny_gguf), "--method", "magic", "--out", str(tmp_path / "o"))[::2])
    _one_line_error(*_run(capsys, "quantize", str(tiny_gguf), "--bits", "5", "--out", str(tmp_path / "o"))[::2])
    _one_line_error(*_run(capsys, "eval", "--bogus-flag")[::2])
    _one_line_error(*_run(capsys, "quantize", str(tiny_gguf), "--calib", str(tmp_path / "no.txt"), "--out", str(tmp_path / "o"))[::2])
    _one_line_error(*_run(capsys, "eval", str(tiny_gguf), "--ctx", "0")[::2])
    assert not (tmp_path / "o").exists()


def test_quantize_eval_info_generate(tmp_path, capsys, tiny_gguf):
    out = tmp_path / "q"
    code, _, err = _run(capsys, "quantize", str(tiny_gguf), "--bits", "4", "--group-size", "32", "--out", str(out))
    assert code == 0 and "saved to" in err
    (tmp_path / "t.txt").write_text("the thing in the winter " * 60)
    code, stdout, _ = _run(capsys, "eval", str(out), "--text", str(tmp_path / "t.txt"), "--ctx", "64",
                           "--max-windows", "4", "--decode-tokens", "8", "--json")
    r = json.loads(stdout)
    assert code == 0 and {"ppl", "windows", "size_bytes", "bits_per_weight", "tokens_per_s"} <= set(r)
    assert r["windows"] == 4 and r["ppl"] > 1 and r["tokens_per_s"] > 0 and r["compute_dtype"] == "float32"
    code, stdout, _ = _run(capsys, "eval", str(out), "--text", str(tmp_path / "t.txt"), "--ctx", "64",
                           "--max-windows", "4", "--decode-tokens", "0", "--compute-dtype", "bfloat16", "--json")
    bf16 = json.loads(stdout)
    assert code == 0 and bf16["compute_dtype"] == "bfloat16" and abs(bf16["ppl"] / r["ppl"] - 1) < 0.02
    code, stdout, _ = _run(capsys, "info", str(out), "--json")
    info = json.loads(stdout)
    assert info["method"] == "rtn" and info["bits"] == 4 and info["quantized_modules"] == 14
    code, stdout, _ = _run(capsys, "generate", str(out), "-p", "the", "-n", "5", "--raw")
    assert code == 0 and stdout.endswith("\n")


@pytest.mark.parametrize("args,bits,group", [((), 4, 64), (("--bits", "8"), 8, None),
                                             (("--bits", "8", "--group-size", "32"), 8, 32),
                                             (("--bits", "3", "--group-size", "channel"), 3, None)])
def test_quantize_group_size_defaults(tmp_path, capsys, tiny_gguf, args, bits, group):
    out = tmp_path / "q"
    assert _run(capsys, "quantize", str(tiny_gguf), *args, "--out", str(out))[0] == 0
    code, stdout, _ = _run(capsys, "info", str(out), "--json")
    info = json.loads(stdout)
    assert (info["bits"], info["group_size"]) == (bits, group)


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "modelpress.cli", "info", str(tmp_path / "nothing.gguf")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


@pytest.mark.parametrize("args,expect", [
    (("--method", "nf4"), {"method": "nf4", "blocksize": 64, "double_quant": False, "compute_dtype": "float32"}),
    (("--method", "nf4", "--blocksize", "128", "--double-quant", "--compute-dtype", "bfloat16"),
     {"method": "nf4", "blocksize": 128, "double_quant": True, "compute_dtype": "bfloat16"}),
    (("--method", "fp4", "--blocksize", "32"), {"method": "fp4", "blocksize": 32}),
    (("--method", "int8"), {"method": "int8", "threshold": 6.0}),
    (("--method", "int8", "--threshold", "0"), {"method": "int8", "threshold": 0.0}),
])
def test_quantize_bitsandbytes_methods(tmp_path, capsys, tiny_gguf, args, expect):
    out = tmp_path / "q"
    code, _, err = _run(capsys, "quantize", str(tiny_gguf), *args, "--out", str(out))
    assert code == 0 and f"quantized with {expect['method']} (" in err
    info = json.loads(_run(capsys, "info", str(out), "--json")[1])
    assert {k: info[k] for k in expect} == expect and info["quantized_modules"] == 14
    (tmp_path / "t.txt").write_text("the thing in the winter " * 60)
    code, stdout, _ = _run(capsys, "eval", str(out), "--text", str(tmp_path / "t.txt"), "--ctx", "64",
                           "--max-windows", "2", "--decode-tokens", "4", "--json")
    assert code == 0 and json.loads(stdout)["ppl"] > 1
    code, stdout, _ = _run(capsys, "generate", str(out), "-p", "the", "-n", "4", "--raw")
    assert code == 0


@pytest.mark.parametrize("args,says", [
    (("--method", "nf4", "--bits", "4"), "--bits does not apply to --method nf4"),
    (("--method", "rtn", "--double-quant"), "--double-quant does not apply to --method rtn"),
    (("--method", "nf4", "--blocksize", "48"), "blocksize must be one of"),
    (("--method", "int8", "--threshold", "-1"), "threshold must be"),
    (("--method", "fp4", "--compute-dtype", "float16"), "invalid choice"),
])
def test_quantize_bad_method_options(tmp_path, capsys, tiny_gguf, args, says):
    code, _, err = _run(capsys, "quantize", str(tiny_gguf), *args, "--out", str(tmp_path / "o"))
    _one_line_error(code, err)
    assert says in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method,fmt", [("gptq", "modelpress"), ("gptq", "gptq"), ("awq", "awq"), ("awq", "modelpress")])
def test_quantize_calibrated(tmp_path, capsys, tiny_gguf, method, fmt):
    (tmp_path / "c.txt").write_text("the thing in the winter, then the thing in the spring. " * 80)
    out = tmp_path / "q"
    extra = ("--act-order", "--no-static-groups") if fmt != "awq" and method == "gptq" else ()
    bits = "4" if fmt == "awq" else "3"
    code, _, err = _run(capsys, "quantize", str(tiny_gguf), "--method", method, "--bits", bits, *extra,
                        "--calib", str(tmp_path / "c.txt"), "--samples", "4", "--ctx", "64", "--format", fmt,
                        "--out", str(out))
    assert code == 0 and f"quantized with {method} (" in err
    info = json.loads(_run(capsys, "info", str(out), "--json")[1])
    if fmt != "modelpress":
        assert info["format"] == "transformers" and info["quantization"] == fmt
    else:
        assert info["method"] == method and info["bits"] == 3
    code, stdout, _ = _run(capsys, "generate", str(out), "-p", "the", "-n", "4", "--raw")
    assert code == 0


def test_quantize_w8a8(tmp_path, capsys, tiny_gguf):
    (tmp_path / "c.txt").write_text("the thing in the winter, then the thing in the spring. " * 80)
    out = tmp_path / "q"
    code, _, err = _run(capsys, "quantize", str(tiny_gguf), "--method", "w8a8", "--smoothquant", "search",
                        "--calibrator", "entropy", "--calib", str(tmp_path / "c.txt"), "--samples", "4", "--ctx", "64",
                        "--out", str(out))
    assert code == 0 and "quantized with w8a8 (activations static, granularity tensor, calibrator entropy" in err
    assert json.loads(_run(capsys, "info", str(out), "--json")[1])["method"] == "w8a8"
    assert _run(capsys, "generate", str(out), "-p", "the", "-n", "4", "--raw")[0] == 0
    _one_line_error(*_run(capsys, "quantize", str(tiny_gguf), "--method", "w8a8", "--granularity", "token",
                          "--calib", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o"))[::2])
    _one_line_error(*_run(capsys, "quantize", str(tiny_gguf), "--method", "w8a8", "--smoothquant", "lots",
                          "--calib", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o"))[::2])


def test_gptq_layout_refuses_other_methods(tmp_path, capsys, tiny_gguf):
    code, _, err = _run(capsys, "quantize", str(tiny_gguf), "--method", "nf4", "--format", "gptq",
                        "--out", str(tmp_path / "o"))
    _one_line_error(code, err)
    assert "--format gptq" in err


def test_export_gguf(tmp_path, capsys, tiny_gguf):
    import torch

    import modelpress

    out = tmp_path / "tiny-q8.gguf"
    code, _, err = _run(capsys, "export", str(tiny_gguf), "--type", "Q8_0", "--out", str(out))
    assert code == 0 and "Q8_0" in err and out.is_file(), err
    a, _ = modelpress.load(tiny_gguf)
    b, _ = modelpress.load(out)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert 0 < (la - lb).abs().max() < 0.05  # Q8_0 rounding, nothing more
    capsys.readouterr()
    text = tmp_path / "eval.txt"
    text.write_text("the thing in the winter and the summer. " * 40)
    ppl = []
    for extra in ([], ["--gguf-blocks"]):  # on the blocks: the same ppl as on the fp32 copy
        code, printed, err = _run(capsys, "eval", str(out), "--text", str(text), "--ctx", "64", "--decode-tokens",
                                  "4", "--json", *extra)
        assert code == 0, err
        ppl.append(json.loads(printed))
    assert abs(ppl[1]["ppl"] / ppl[0]["ppl"] - 1) < 1e-5, ppl
    assert ppl[1]["linear_bits_per_weight"] < 9 < ppl[0]["linear_bits_per_weight"]  # Q8_0: 8.5 bits
    _one_line_error(*_run(capsys, "export", str(tiny_gguf), "--type", "Q9", "--out", str(out))[::2])
    _one_line_error(*_run(capsys, "export", str(tiny_gguf), "--out", str(tmp_path / "no" / "x.gguf"))[::2])
    _one_line_error(*_run(capsys, "export", str(tiny_gguf), "--imatrix", str(tmp_path / "none.gguf"),
                          "--out", str(out))[::2])
    _one_line_error(*_run(capsys, "export", str(tiny_gguf), "--imatrix", "a.gguf", "--calib", "b.txt",
                          "--out", str(out))[::2])


def test_imatrix_then_export_with_it(tmp_path, capsys, tiny_gguf):
    from modelpress.formats.gguf_reader import read_gguf
    from modelpress.formats.imatrix import load_imatrix

    calib = tmp_path / "calib.txt"
    calib.write_text("the thing in the winter and the summer. " * 200)
    im_path = tmp_path / "imatrix.gguf"
    code, _, err = _run(capsys, "imatrix", str(tiny_gguf), "--calib", str(calib), "--ctx", "64",
                        "--samples", "4", "--out", str(im_path))
    assert code == 0 and im_path.is_file(), err
    im = load_imatrix(im_path)
    assert im.chunk_count == 4 and im.datasets == ["calib.txt"] and set(im.counts.values()) == {256}
    a, b = tmp_path / "plain.gguf", tmp_path / "imat.gguf"
    assert _run(capsys, "export", str(tiny_gguf), "--type", "Q4_0", "--out", str(a))[0] == 0
    code, _, err = _run(capsys, "export", str(tiny_gguf), "--type", "Q4_0", "--imatrix", str(im_path), "--out", str(b))
    assert code == 0 and "with an imatrix" in err, err
    meta, tensors = read_gguf(b)
    assert meta["quantize.imatrix.entries_count"] == len(im.sums) and meta["quantize.imatrix.dataset"] == "calib.txt"
    _, plain = read_gguf(a)
    differ = [t.name for t, p in zip(tensors, plain) if t.ggml_type == 2 and bytes(t.data) != bytes(p.data)]
    assert differ and all(n.startswith("blk.") for n in differ)  # the weighted search moved blocks


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_export_from_a_calibrated_method(tmp_path, capsys, tiny_gguf, method):
    import modelpress
    from modelpress.model.walker import dense_weight

    calib = tmp_path / "calib.txt"
    calib.write_text("the thing in the winter and the summer. " * 200)
    out = tmp_path / f"{method}.gguf"
    code, _, err = _run(capsys, "export", str(tiny_gguf), "--type", "Q8_0", "--from-method", method,
                        "--calib", str(calib), "--ctx", "64", "--samples", "4", "--out", str(out))
    assert code == 0 and method in err and "with an imatrix" in err, err
    exported, _ = modelpress.load(out)
    original, tok = modelpress.load(tiny_gguf)
    calibrated, _ = modelpress.load(tiny_gguf)
    config = (modelpress.AWQConfig(bits=4, group_size=32, scales_only=True) if method == "awq" else
              modelpress.GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True))
    from modelpress.data import calibration_windows

    modelpress.quantize(calibrated, config, calibration_windows(tok, calib, 64, 4))
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        got = dense_weight(exported.get_submodule(name))
        want = dense_weight(calibrated.get_submodule(name))
        # Q8_0 re-rounds the method's 4-bit weights by < half an 8-bit step; the method moved them far more
        assert (got - want).abs().max() < 0.6 * want.abs().max() / 127
        assert (got - original.get_submodule(name).weight).abs().max() > 4 * (got - want).abs().max()


def test_export_a_transformers_folder(tmp_path, capsys, tiny_hf_dir):
    d, _, _ = tiny_hf_dir
    out = tmp_path / "hf-q8.gguf"
    code, _, err = _run(capsys, "export", str(d), "--type", "Q8_0", "--out", str(out))
    assert code == 0 and out.is_file(), err


def test_quantize_auto_then_export_keeps_the_types(tmp_path, capsys, tiny_gguf):
    from gguf import GGUFReader

    (tmp_path / "c.txt").write_text("the thing in the winter, then the thing in the spring. " * 80)
    common = ("--calib", str(tmp_path / "c.txt"), "--samples", "4", "--ctx", "64")
    code, _, err = _run(capsys, "quantize", str(tiny_gguf), "--method", "auto", "--target-bpw", "6",
                        "--formats", "q4_0,q5_1,q8_0", *common, "--out", str(tmp_path / "auto"))
    assert code == 0 and "auto: chosen types" in err and "blk.1" in err, err
    assert "bits/weight for a budget of 6.000" in err
    code, _, err = _run(capsys, "export", str(tmp_path / "auto"), "--out", str(tmp_path / "auto.gguf"))
    assert code == 0, err
    code, _, err = _run(capsys, "quantize", str(tiny_gguf), "--method", "auto", "--target-bpw", "6",
                        "--formats", "q4_0,q5_1,q8_0", *common, "--format", "gguf", "--out", str(tmp_path / "direct.gguf"))
    assert code == 0, err
    a = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "auto.gguf")).tensors}
    b = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "direct.gguf")).tensors}
    assert a == b and {"Q4_0", "Q8_0"} <= set(a.values())
    _one_line_error(*_run(capsys, "quantize", str(tiny_gguf), "--method", "auto", "--out", str(tmp_path / "x"))[::2])
    _one_line_error(*_run(capsys, "quantize", str(tiny_gguf), "--method", "rtn", "--format", "gguf",
                          "--out", str(tmp_path / "y.gguf"))[::2])


def test_compare_runs_resumes_and_reports(tmp_path, capsys, tiny_gguf):
    out = tmp_path / "cmp"
    (tmp_path / "c.txt").write_text("the thing in the winter, then the thing in the spring. " * 80)
    args = ("compare", str(tiny_gguf), "--methods", "fp32,q8_0", "--ctx", "64", "--eval-windows", "3",
            "--samples", "2", "--decode-tokens", "4", "--text", str(tmp_path / "c.txt"), "--out", str(out))
    code, stdout, err = _run(capsys, *args)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} >= {"report.md", "results.json", "pareto.png", "speed.png", "report.html",
                                               "rows"}
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3  # size, speed and the sensitivity map, in the page
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["fp32", "q8_0"]
    fp32 = res["rows"][0]
    assert fp32["kl_mean"] < 1e-6 and fp32["top1_agreement"] == 1.0 and abs(fp32["ppl"] / res["reference_ppl"] - 1) < 1e-5
    assert "| q8_0" in stdout and "2 to run" in err
    assert stdout.splitlines()[2] == "## Recommendation" and "Make it: `modelpress" in stdout
    code, _, err = _run(capsys, *args[:3], "fp32,q8_0,rtn-w4", *args[4:])  # one more method: only it runs
    assert code == 0 and "2 reused" in err and "1 to run" in err and "rtn-w4: running" in err
    _one_line_error(*_run(capsys, "compare", str(tiny_gguf), "--methods", "fp32,bogus", "--out", str(out))[::2])


def test_an_interrupted_compare_reruns_only_the_unfinished_rows(tmp_path, capsys, tiny_gguf):
    import signal
    import time

    out = tmp_path / "cmp"
    args = ["compare", str(tiny_gguf), "--methods", "fp32,q8_0,rtn-w4", "--ctx", "64", "--eval-windows", "2",
            "--samples", "2", "--decode-tokens", "2", "--out", str(out)]
    # the rows after the first wait a minute before they run, so that the interrupt lands during the
    # second row however fast the machine (on a fast one all three rows finished before it landed)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.pop('MODELPRESS_TEST_SLOW_ROWS', None):  # this process only, not its children\n"
        "    import time\n"
        "    import modelpress.eval.compare as c\n"
        "    real = c._run_row\n"
        "    def slow(r, *a, **k):\n"
        "        if r.name != 'fp32':\n"
        "            time.sleep(60)\n"
        "        return real(r, *a, **k)\n"
        "    c._run_row = slow\n")
    env = {**os.environ, "MODELPRESS_TEST_SLOW_ROWS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "modelpress.cli", *args], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background
    # shell starts its jobs with SIGINT ignored, and children inherit that
    deadline = time.time() + 300
    while not any((out / "rows").glob("*.json")):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no row finished in 5 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # as Ctrl-C: during the second row
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "rerun the same command" in err and "Traceback" not in err, err
    done = len(list((out / "rows").glob("*.json")))
    assert done == 1
    code, _, err = _run(capsys, *args)
    assert code == 0 and f"{done} reused" in err and f"{3 - done} to run" in err


def test_a_new_config_field_is_a_new_flag(tmp_path, capsys):
    """The quantize flags are made from the config fields (flags.py): a config class defined here,
    with no edit of the CLI, gets its flags, their help, and the error for a flag it does not take."""
    import dataclasses

    from modelpress import config as config_module
    from modelpress import flags
    from modelpress.cli import build_parser
    from modelpress.config import BaseConfig, config_types, option

    @dataclasses.dataclass(frozen=True)
    class ToyConfig(BaseConfig):
        method = "toy"
        strength: float = option(0.5, "how hard to squeeze")
        layers_kept: tuple[str, ...] = option(("a", "b"), "layers to keep")
        careful: bool = option(True, "take care")

    try:
        parser = build_parser()
        help_text = parser._subparsers._group_actions[0].choices["quantize"].format_help()
        assert "--strength" in help_text and "toy: how hard to squeeze (default: 0.5)" in " ".join(help_text.split())
        a = parser.parse_args(["quantize", "--method", "toy", "--strength", "2", "--layers-kept", "x,y",
                               "--no-careful", "--out", str(tmp_path / "o")])
        assert flags.method_config(a, config_types()) == ToyConfig(strength=2.0, layers_kept=("x", "y"), careful=False)
        a = parser.parse_args(["quantize", "--method", "toy", "--bits", "4", "--out", str(tmp_path / "o")])
        with pytest.raises(modelpress.ModelpressError, match="--bits does not apply to --method toy .*--strength"):
            flags.method_config(a, config_types())
    finally:
        config_module._CONFIG_TYPES.pop("toy")


def test_qat_writes_the_format_it_trained_for(tmp_path, capsys, tiny_gguf):
    """qat --type Q4_0 --out x.gguf: a GGUF whose blocks are Q4_0; --method rtn --format gptq: the GPTQ
    layout; a float folder for --type with a folder; bad combinations: one-line errors, nothing written."""
    from gguf import GGUFReader

    text = tmp_path / "t.txt"
    text.write_text("the thing in the winter " * 80)
    common = ["--calib", str(text), "--ctx", "32", "--samples", "4", "--steps", "2", "--batch", "2"]
    code, _, err = _run(capsys, "qat", str(tiny_gguf), "--type", "Q4_0", *common, "--out", str(tmp_path / "q.gguf"))
    assert code == 0 and "qat: 2 steps" in err
    kinds = {t.tensor_type.name for t in GGUFReader(tmp_path / "q.gguf").tensors if t.name.startswith("blk.")}
    assert "Q4_0" in kinds
    code, _, _ = _run(capsys, "qat", str(tiny_gguf), "--method", "rtn", "--bits", "4", "--group-size", "32",
                      "--format", "gptq", *common, "--out", str(tmp_path / "gptq"))
    assert code == 0 and json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"][
        "quant_method"] == "gptq"
    code, _, _ = _run(capsys, "qat", str(tiny_gguf), "--type", "Q4_K_M", *common, "--out", str(tmp_path / "float"))
    assert code == 0 and (tmp_path / "float").is_dir()
    _one_line_error(*_run(capsys, "qat", str(tiny_gguf), "--type", "Q4_0", "--method", "rtn", "--out",
                          str(tmp_path / "o.gguf"))[::2])
    _one_line_error(*_run(capsys, "qat", str(tiny_gguf), "--out", str(tmp_path / "o.gguf"))[::2])
    _one_line_error(*_run(capsys, "qat", str(tiny_gguf), "--method", "nf4", "--out", str(tmp_path / "o.gguf"))[::2])
    _one_line_error(*_run(capsys, "qat", str(tiny_gguf), "--type", "Q9_9", *common, "--out",
                          str(tmp_path / "o.gguf"))[::2])
    _one_line_error(*_run(capsys, "qat", str(tiny_gguf), "--type", "Q4_0", "--lora-rank", "-1", "--out",
                          str(tmp_path / "o.gguf"))[::2])
    assert not (tmp_path / "o.gguf").exists()


def test_prune_writes_a_pruned_checkpoint(tmp_path, capsys, tiny_gguf):
    """prune --method wanda --pattern 2:4: a checkpoint whose decoder linears are 2:4; a bad pattern: one line."""
    import modelpress
    from modelpress.methods.prune import weight_sparsity

    text = tmp_path / "t.txt"
    text.write_text("the thing in the winter " * 80)
    code, _, err = _run(capsys, "prune", str(tiny_gguf), "--method", "wanda", "--pattern", "2:4", "--calib",
                        str(text), "--ctx", "32", "--samples", "4", "--out", str(tmp_path / "p"))
    assert code == 0, err
    model, _ = modelpress.load(tmp_path / "p")
    assert weight_sparsity(model) == 0.5
    _one_line_error(*_run(capsys, "prune", str(tiny_gguf), "--pattern", "x", "--out", str(tmp_path / "q"))[::2])
    assert not (tmp_path / "q").exists()


def test_prune_structured_spec_is_the_structured_method(tmp_path, capsys, tiny_gguf):
    """--structured mlp=F,heads=F (the issue's spelling) cuts those fractions, as --method structured --mlp F
    --heads F; a part it leaves out is not cut; a wrong part, a second spelling of a cut or another method: one line."""
    import modelpress

    text = tmp_path / "t.txt"
    text.write_text("the thing in the winter " * 80)
    calib = ["--calib", str(text), "--ctx", "32", "--samples", "4", "--multiple", "16"]
    code, _, err = _run(capsys, "prune", str(tiny_gguf), "--structured", "mlp=0.5,heads=0.5", *calib,
                        "--out", str(tmp_path / "s"))
    assert code == 0, err
    cfg = modelpress.load(tmp_path / "s")[0].config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (80, 3, 1)
    code, _, err = _run(capsys, "prune", str(tiny_gguf), "--structured", "heads=0.5", *calib, "--out",
                        str(tmp_path / "h"))
    assert code == 0, err
    cfg = modelpress.load(tmp_path / "h")[0].config
    assert (cfg.intermediate_size, cfg.num_attention_heads) == (160, 3)
    for bad in (["--structured", "mlp:0.5"], ["--structured", "depth=2"], ["--structured", "mlp=0.5", "--mlp", "0.25"],
                ["--structured", "mlp=0.5", "--method", "wanda"]):
        _one_line_error(*_run(capsys, "prune", str(tiny_gguf), *bad, "--out", str(tmp_path / "x"))[::2])
    assert not (tmp_path / "x").exists()
