"""Property tests of everything modelpress reads from a user's files: a small valid GGUF, safetensors
file, config.json and modelpress.json are mutated byte-wise and field-wise, and each mutant must
either load to a model that runs, or be refused with a ModelpressError (the CLI's one line and exit
code 2; `info` is run on each too). Never another exception, never longer than a time limit, never
memory beyond a bound.

MODELPRESS_FUZZ_EXAMPLES sets the examples per property (default 40; the resolving note of issue 19
gives a run with more)."""
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import struct

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st

import modelpress  # noqa: E402
from modelpress.cli import main  # noqa: E402
from modelpress.errors import ModelpressError  # noqa: E402
from tests.conftest import byte_tokenizer, tiny_llama  # noqa: E402
from tests.gguf_craft import fields, patched  # noqa: E402

EXAMPLES = int(os.environ.get("MODELPRESS_FUZZ_EXAMPLES", "40"))
SECONDS = 30            # per mutant: load, one forward pass, info (a valid tiny file takes ~0.3 s)
RSS_GROWTH_KIB = 2 << 20  # the whole test may not raise the process's peak memory by 2 GiB
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
INTERESTING = [0, 1, 2, 3, 7, 31, 32, 33, 255, 2 ** 15, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 62,
               2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
JSON_VALUES = [0, -1, 1, 2, 3, 4, 6, 95, 97, 10 ** 9, 10 ** 12, 2 ** 63, 2 ** 64, 0.5, -1e308, float("nan"),
               float("inf"), "", "x", "12", None, True, [], [1], {}, {"a": 1}]


class _TimeUp(BaseException):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def ring(*_):
        raise _TimeUp(f"more than {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Tally:
    """What the mutants did; printed at the end of each property (pytest -s shows it)."""

    def __init__(self, name):
        self.name, self.loaded, self.refused, self.info_ok, self.info_refused = name, 0, 0, 0, 0
        self.by_net = 0  # refusals from load()'s last net (a library's exception about the file), not a check of ours
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def check(self, path):
        with time_limit(SECONDS):
            try:
                model, _ = modelpress.load(path)
            except ModelpressError as e:
                self.refused += 1
                self.by_net += "cannot be loaded (" in str(e)
            else:  # loaded: it must be a model that runs
                with torch.inference_mode():
                    logits = model(torch.tensor([[1, 2, 3]])).logits
                assert logits.shape[:2] == (1, 3)
                self.loaded += 1
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["info", str(path)])
        assert code in (0, 2), err.getvalue()
        if code == 2:
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("modelpress: error:"), err.getvalue()
        self.info_ok += code == 0
        self.info_refused += code == 2

    def report(self):
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss
        print(f"\nfuzz {self.name}: {self.loaded + self.refused} mutants, {self.loaded} loaded, {self.refused} refused "
              f"({self.by_net} by load()'s last net); "
              f"info {self.info_ok} ok, {self.info_refused} refused; peak memory +{growth // 1024} MiB")
        assert growth < RSS_GROWTH_KIB


def _tally(name):
    t = Tally(name)
    yield t
    t.report()


# -- GGUF ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from tests.model.test_load import write_tiny_gguf

    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    write_tiny_gguf(path, tiny_llama(), byte_tokenizer())
    return path


@pytest.fixture(scope="module")
def gguf_tally():
    yield from _tally("gguf")


def _poke(raw, data, top, most):
    """Set 1 to `most` bytes of `raw` (a bytearray) at positions up to `top` to drawn values."""
    for pos, byte in data.draw(st.lists(st.tuples(st.integers(0, top), st.integers(0, 255)), min_size=1,
                                        max_size=most)):
        raw[pos] = byte


@FUZZ
@given(data=st.data())
def test_gguf_byte_mutations(gguf_file, gguf_tally, tmp_path, data):
    raw = bytearray(gguf_file.read_bytes())
    _, end = fields(gguf_file)
    kind = data.draw(st.sampled_from(["header bytes", "any bytes", "truncate"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        _poke(raw, data, end + 64 if kind == "header bytes" else len(raw) - 1, 8)
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(raw))
    gguf_tally.check(path)


@FUZZ
@given(data=st.data())
def test_gguf_field_mutations(gguf_file, gguf_tally, tmp_path, data):
    table, _ = fields(gguf_file)
    raw = gguf_file.read_bytes()
    for _ in range(data.draw(st.integers(1, 3))):
        name, off, fmt = data.draw(st.sampled_from(table))
        old = struct.unpack_from(fmt, raw, off)[0]
        value = data.draw(st.sampled_from(INTERESTING + [old - 1, old + 1, old * 2, old ^ (1 << 63)])
                          | st.integers(0, 2 ** 64 - 1))
        raw = patched(raw, off, fmt, value)
    path = tmp_path / "m.gguf"
    path.write_bytes(raw)
    gguf_tally.check(path)


# -- transformers folder: safetensors and config.json ---------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "hf"
    tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_tally():
    yield from _tally("transformers folder")


def _copy(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def _safetensors_header(raw):
    n = struct.unpack_from("<Q", raw, 0)[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@FUZZ
@given(data=st.data())
def test_safetensors_mutations(hf_folder, hf_tally, tmp_path, data):
    d = _copy(hf_folder, tmp_path / "m")
    raw = bytearray((d / "model.safetensors").read_bytes())
    header, body = _safetensors_header(bytes(raw))
    kind = data.draw(st.sampled_from(["bytes", "field", "truncate"]))
    if kind == "bytes":
        _poke(raw, data, 8 + struct.unpack_from("<Q", raw, 0)[0] + 64, 6)
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        entry = header[name]
        what = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "rename"]))
        if what == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "I8", "U8", "I64", "F64", "BOOL", "F8_E4M3", "Q"]))
        elif what == "shape":
            entry["shape"] = data.draw(st.lists(st.sampled_from([0, 1, 2, 96, 160, 261, 10 ** 9, 2 ** 40]), max_size=4))
        elif what == "data_offsets":
            a, b = entry["data_offsets"]
            entry["data_offsets"] = [data.draw(st.sampled_from([0, a, b, a + 4, 2 ** 40])),
                                     data.draw(st.sampled_from([0, a, b, b - 4, b + 4, 2 ** 40]))]
        else:
            header[data.draw(st.sampled_from(["model.layers.7.mlp.up_proj.weight", "model.norm.bias", "x"]))] = \
                header.pop(name)
        head = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(head)) + head + body)
    (d / "model.safetensors").write_bytes(bytes(raw))
    hf_tally.check(d)


CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim", "tie_word_embeddings",
               "model_type", "quantization_config", "architectures", "torch_dtype", "rope_scaling", "bos_token_id"]


@FUZZ
@given(data=st.data())
def test_config_json_mutations(hf_folder, hf_tally, tmp_path, data):
    d = _copy(hf_folder, tmp_path / "m")
    if data.draw(st.booleans()):
        config = json.loads((d / "config.json").read_text())
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.sampled_from(CONFIG_KEYS))
            value = data.draw(st.sampled_from(JSON_VALUES + ["llama", "bert", {"quant_method": "gptq"},
                                                             {"quant_method": "awq", "bits": 3}]))
            config[key] = value
        text = json.dumps(config)
    else:
        raw = bytearray((d / "config.json").read_bytes())
        _poke(raw, data, len(raw) - 1, 4)
        text = bytes(raw).decode("latin-1")
    (d / "config.json").write_text(text, encoding="latin-1" if not text.isascii() else "utf-8")
    hf_tally.check(d)


# -- modelpress checkpoint: modelpress.json ------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tok = tiny_llama(), byte_tokenizer()
    modelpress.quantize(model, modelpress.RTNConfig(bits=4, group_size=32))
    return modelpress.save(model, tok, tmp_path_factory.mktemp("fuzz") / "ckpt")


@pytest.fixture(scope="module")
def ckpt_tally():
    yield from _tally("modelpress.json")


MODULE_KEYS = ["class", "in_features", "out_features", "bits", "group_size", "symmetric", "bias", "permuted", "extra"]


@FUZZ
@given(data=st.data())
def test_manifest_mutations(checkpoint, ckpt_tally, tmp_path, data):
    d = _copy(checkpoint, tmp_path / "m")
    manifest = json.loads((d / "modelpress.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "module", "quantization"]))
        value = data.draw(st.sampled_from(JSON_VALUES + ["IntxLinear", "GGUFLinear", "Code4Linear", "modelpress"]))
        if where == "top":
            manifest[data.draw(st.sampled_from(["format", "format_version", "modules", "quantization", "files"]))] = value
        elif where == "module" and isinstance(manifest.get("modules"), dict) and manifest["modules"]:
            fqn = data.draw(st.sampled_from(sorted(manifest["modules"])))
            if isinstance(manifest["modules"][fqn], dict):
                manifest["modules"][fqn][data.draw(st.sampled_from(MODULE_KEYS))] = value
            else:
                manifest["modules"][fqn] = value
        elif where == "quantization" and isinstance(manifest.get("quantization"), dict):
            manifest["quantization"][data.draw(st.sampled_from(["method", "bits", "group_size", "version",
                                                                "symmetric", "targets"]))] = value
    (d / "modelpress.json").write_text(json.dumps(manifest))
    ckpt_tally.check(d)
