"""The command line: user mistakes give one line and exit code 2; the commands run end to end."""
import json
import subprocess
import sys

import pytest

from modelpress.cli import main
from tests.model.test_load import write_tiny_gguf
from tests.conftest import byte_tokenizer, tiny_llama


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
    assert r["windows"] == 4 and r["ppl"] > 1 and r["tokens_per_s"] > 0
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
