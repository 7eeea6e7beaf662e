"""Issue 19's defects, each reproduced: nothing a user owns is deleted, no number in a file makes
modelpress hang or allocate without bound, corrupt files are refused, and every user mistake is one
line and exit code 2."""
import json
import os
import resource
import subprocess
import sys

import gguf
import pytest

import modelpress
from tests.conftest import byte_tokenizer, tiny_llama
from tests.gguf_craft import field_offset, patched, rewrite
from tests.test_cli import _one_line_error, _run

V = gguf.GGUFValueType


@pytest.fixture
def tiny_gguf(tmp_path):
    from tests.model.test_load import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_llama(), byte_tokenizer())
    return path


@pytest.fixture
def ckpt(tmp_path, tiny):
    model, tok = tiny
    modelpress.quantize(model, modelpress.RTNConfig(bits=4, group_size=32))
    return modelpress.save(model, tok, tmp_path / "ckpt")


def refused(capsys, *argv, says=None):
    capsys.readouterr()  # what came before (a fixture's progress bar)
    code, _, err = _run(capsys, *argv)
    _one_line_error(code, err)
    if says is not None:
        assert says in err, err
    return err


# -- 3: data loss --------------------------------------------------------------------------------------
def test_a_folder_with_a_stray_manifest_is_not_replaced(tmp_path, capsys, tiny_gguf):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("notes")
    (d / "modelpress.json").write_text("{}")
    refused(capsys, "quantize", str(tiny_gguf), "--method", "rtn", "--bits", "4", "--out", str(d),
            says="other than a modelpress checkpoint")
    assert (d / "notes.txt").read_text() == "notes" and (d / "modelpress.json").read_text() == "{}"


def test_a_checkpoint_holding_a_user_file_is_not_replaced(tmp_path, capsys, tiny_gguf, ckpt):
    (ckpt / "my-notes.md").write_text("mine")
    refused(capsys, "quantize", str(tiny_gguf), "--bits", "4", "--out", str(ckpt), says="my-notes.md")
    assert (ckpt / "my-notes.md").read_text() == "mine"
    (ckpt / "my-notes.md").unlink()
    (ckpt / "sub").mkdir()
    refused(capsys, "quantize", str(tiny_gguf), "--bits", "4", "--out", str(ckpt), says="sub is not part")
    (ckpt / "sub").rmdir()
    code, _, err = _run(capsys, "quantize", str(tiny_gguf), "--bits", "8", "--out", str(ckpt))  # a checkpoint: replaced
    assert code == 0, err
    manifest = json.loads((ckpt / "modelpress.json").read_text())
    assert manifest["quantization"]["bits"] == 8 and set(os.listdir(ckpt)) == set(manifest["files"])
    assert not [p for p in os.listdir(ckpt.parent) if p.startswith(".ckpt")]  # no temporary folder left


def test_an_unwritable_destination_fails_before_any_work(tmp_path, capsys, tiny_gguf, monkeypatch):
    ro = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permission bits: a file system that takes no new files
        ro = "/proc"
    else:
        ro.mkdir(mode=0o555)
    # refused up front: the model is never loaded
    monkeypatch.setattr("modelpress.cli._load", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    refused(capsys, "quantize", str(tiny_gguf), "--method", "gptq", "--out", f"{ro}/new/q", says="cannot write")
    refused(capsys, "export", str(tiny_gguf), "--out", f"{ro}/q.gguf", says="cannot write")
    refused(capsys, "imatrix", str(tiny_gguf), "--out", f"{ro}/q.gguf", says="cannot write")
    (tmp_path / "afile").write_text("x")
    refused(capsys, "quantize", str(tiny_gguf), "--out", str(tmp_path / "afile" / "q"), says="not a folder")


# -- 4: one number that sizes memory --------------------------------------------------------------------
def test_a_huge_block_count_is_refused_at_once(tmp_path, capsys, tiny_gguf):
    bad = rewrite(tiny_gguf, tmp_path / "b.gguf", {"llama.block_count": (10 ** 9, V.UINT32, None)})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(capsys, "eval", str(bad), says="block_count")
    bad = rewrite(tiny_gguf, tmp_path / "c.gguf", {"llama.block_count": (3, V.UINT32, None)})
    refused(capsys, "eval", str(bad), says="tensors hold 2")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 1 << 20  # KiB: refused before allocating


def test_a_huge_config_is_refused_at_once(tmp_path, capsys, tiny_hf_dir):
    d, _, _ = tiny_hf_dir
    config = json.loads((d / "config.json").read_text())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for field, value in (("num_hidden_layers", 10 ** 9), ("hidden_size", 0), ("hidden_size", -96),
                         ("num_attention_heads", 0), ("vocab_size", 10 ** 12), ("num_hidden_layers", 3),
                         ("num_key_value_heads", 4), ("intermediate_size", 200), ("quantization_config", "gptq")):
        (d / "config.json").write_text(json.dumps({**config, field: value}))
        refused(capsys, "eval", str(d))
        refused(capsys, "info", str(d)) if field == "quantization_config" else None
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 1 << 20  # KiB: under 1 GiB more
    (d / "config.json").write_text("{not json")
    refused(capsys, "info", str(d), says="not valid JSON")


def test_a_manifest_cannot_make_modelpress_allocate(tmp_path, capsys, ckpt):
    m = json.loads((ckpt / "modelpress.json").read_text())
    fqn = next(iter(m["modules"]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for change, says in ((dict(in_features=10 ** 9), "features"), (dict(bogus=1), "bogus"),
                         (dict(group_size=0), "cannot be rebuilt"), (dict(**{"class": "Nope"}), "no class")):
        bad = json.loads(json.dumps(m))
        bad["modules"][fqn].update(change)
        (ckpt / "modelpress.json").write_text(json.dumps(bad))
        refused(capsys, "eval", str(ckpt), says=says)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 1 << 20
    for bad in ({**m, "format_version": "1"}, {**m, "modules": []}, [1], {**m, "modules": {"lm_head.nope": {}}}):
        (ckpt / "modelpress.json").write_text(json.dumps(bad))
        refused(capsys, "eval", str(ckpt))
        refused(capsys, "info", str(ckpt)) if isinstance(bad, list) or bad.get("format_version") == "1" else None


# -- 5: corrupt GGUFs accepted silently -----------------------------------------------------------------
def _tensor_pair(path):
    """Two tensors whose names have the same length (renaming one to the other keeps the layout)."""
    from modelpress.formats.gguf_reader import read_gguf

    names = [t.name for t in read_gguf(path)[1]]
    return next((a, b) for a in names for b in names if a != b and len(a) == len(b))


def test_corrupt_ggufs_are_refused(tmp_path, capsys, tiny_gguf):
    data = tiny_gguf.read_bytes()
    a, b = _tensor_pair(tiny_gguf)
    dup = data.replace(b.encode(), a.encode(), 1)                       # a duplicated tensor name
    off, fmt = field_offset(tiny_gguf, f"{a} type")
    q8 = next(t for t in modelpress.formats.gguf_reader.read_gguf(tiny_gguf)[1] if t.ggml_type == 8)
    off8, _ = field_offset(tiny_gguf, f"{q8.name} type")
    overlap = patched(data, off8, "<I", 0)                              # Q8_0 -> F32: runs into the next tensor
    cases = {"dup.gguf": (dup, "appears twice"), "overlap.gguf": (overlap, "overlap")}
    for name, (content, says) in cases.items():
        (tmp_path / name).write_bytes(content)
        refused(capsys, "eval", str(tmp_path / name), says=says)
        refused(capsys, "info", str(tmp_path / name), says=says)
    for align, says in ((7, "power of two"), (0, "power of two")):
        bad = rewrite(tiny_gguf, tmp_path / f"a{align}.gguf", {"general.alignment": (align, V.UINT32, None)})
        refused(capsys, "eval", str(bad), says=says)
    bad = rewrite(tiny_gguf, tmp_path / "as.gguf", {"general.alignment": ("32", V.STRING, None)})
    refused(capsys, "eval", str(bad), says="alignment")
    for dim, value in (("dim 0", 2 ** 64 - 1), ("dim 0", 0), ("dim 1", 2 ** 63), ("dim 1", 2 ** 63 + 5)):
        off, fmt = field_offset(tiny_gguf, f"{a} {dim}")
        (tmp_path / "d.gguf").write_bytes(patched(data, off, fmt, value))
        refused(capsys, "info", str(tmp_path / "d.gguf"))
        refused(capsys, "eval", str(tmp_path / "d.gguf"))


# -- 7: tracebacks instead of one line ------------------------------------------------------------------
def test_damaged_gguf_headers_are_one_line(tmp_path, capsys, tiny_gguf):
    data = tiny_gguf.read_bytes()
    a, _ = _tensor_pair(tiny_gguf)
    (tmp_path / "empty.gguf").write_bytes(b"")
    refused(capsys, "eval", str(tmp_path / "empty.gguf"), says="not a GGUF file")
    for field, value in (("n_tensors", 2 ** 62), ("n_kv", 2 ** 62), (f"{a} n_dims", 0), (f"{a} n_dims", 9)):
        off, fmt = field_offset(tiny_gguf, field)
        (tmp_path / "h.gguf").write_bytes(patched(data, off, fmt, value))
        refused(capsys, "eval", str(tmp_path / "h.gguf"))
        refused(capsys, "info", str(tmp_path / "h.gguf"))
    tokens = [str(i) for i in range(261)]
    for change in ({"llama.attention.head_count": (0, V.UINT32, None)},
                   {"llama.embedding_length": (0, V.UINT32, None)},
                   {"llama.embedding_length": (100, V.UINT32, None)},
                   {"llama.attention.head_count": ("six", V.STRING, None)},
                   {"tokenizer.ggml.token_type": ([1, 1], V.ARRAY, V.INT32)},
                   {"tokenizer.ggml.tokens": (list(range(261)), V.ARRAY, V.INT32)},
                   {"tokenizer.ggml.merges": ("h e", V.STRING, None)},
                   {"tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING), "tokenizer.ggml.eos_token_id": (999, V.UINT32, None)}):
        refused(capsys, "eval", str(rewrite(tiny_gguf, tmp_path / "m.gguf", change)))
    # dims that are not a whole number of blocks (Q8_0 rows of 32)
    off, fmt = field_offset(tiny_gguf, f"{a} dim 0")
    (tmp_path / "blk.gguf").write_bytes(patched(data, off, fmt, 33))
    refused(capsys, "eval", str(tmp_path / "blk.gguf"))


def test_cli_mistakes_are_one_line(tmp_path, capsys, tiny_gguf):
    (tmp_path / "c.jsonl").write_text('{"text": 5}\n')
    refused(capsys, "quantize", str(tiny_gguf), "--method", "gptq", "--calib", str(tmp_path / "c.jsonl"),
            "--out", str(tmp_path / "o"), says="text")
    refused(capsys, "generate", str(tiny_gguf), "-p", "", "--raw", says="empty")
    refused(capsys, "info", str(tmp_path / "nothing-here"))
    tok = byte_tokenizer()
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"   # the sandbox refuses it
    d = tmp_path / "hf"
    tiny_llama().save_pretrained(d)
    tok.save_pretrained(d)
    refused(capsys, "generate", str(d), "-p", "hi", says="chat template")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").unlink()
    refused(capsys, "eval", str(d))  # transformers' message about the missing tokenizer runs over lines
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "mine", "auto_map": {"AutoConfig": "m.C"}}))
    refused(capsys, "eval", str(d))  # remote code: refused, in one line


def test_generate_grows_its_cache(tmp_path, capsys, tiny_gguf):
    # 8: -n 1000000000 allocated 768 GB up front; the cache now grows as tokens come
    from modelpress.eval.speed import greedy_ids
    from modelpress.serve.runner import ModelRunner

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out, err = _run(capsys, "generate", str(tiny_gguf), "-p", "the", "--raw", "-n", "1000000000")
    assert code == 0 and out.strip() and "context" in err, err  # stops at the model's context, saying so
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 1 << 19  # KiB: under 512 MiB more
    # a runner started with one block grows to what the tokens need, giving what a large one gives
    model = tiny_llama()
    ids = __import__("torch").tensor([[5, 6, 7]])
    small, big = ModelRunner(model, 1, 4), ModelRunner(model, 64, 4)
    assert list(greedy_ids(small, ids, 60)) == list(greedy_ids(big, ids, 60))
    assert small.num_blocks == 16 and small.k_cache[0].shape[0] == 16


def test_the_installed_command_prints_one_line(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "modelpress.cli", "eval", str(tmp_path / "empty.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
