import json

import pytest
import torch

import modelpress
from modelpress import ModelpressError, RTNConfig
from modelpress.formats import checkpoint
from modelpress.record import record


@pytest.mark.parametrize("config", [RTNConfig(bits=4, group_size=32), RTNConfig(bits=8, group_size=None, symmetric=True),
                                    RTNConfig(bits=3, group_size=64), RTNConfig(bits=2, group_size=16, symmetric=True)])
def test_save_load_gives_identical_logits(tmp_path, tiny, config):
    model, tok = tiny
    modelpress.quantize(model, config)
    out = modelpress.save(model, tok, tmp_path / "ckpt")
    loaded, tok2 = modelpress.load(out)
    x = torch.randint(0, 261, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)          # reference path
        assert torch.equal(model(x[:1, :8]).logits, loaded(x[:1, :8]).logits)  # kernel path
    assert record(loaded).config == config
    assert tok2("the thing")["input_ids"] == tok("the thing")["input_ids"]
    manifest = json.loads((out / "modelpress.json").read_text())
    assert manifest["quantization"]["bits"] == config.bits and len(manifest["modules"]) == 14
    assert not (out / "pytorch_model.bin").exists()


def test_unquantized_model_round_trips(tmp_path, tiny):
    model, tok = tiny
    loaded, _ = modelpress.load(modelpress.save(model, tok, tmp_path / "f"))
    x = torch.randint(0, 261, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_interrupted_save_leaves_nothing(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    out = tmp_path / "ckpt"
    modelpress.save(model, tok, out)
    before = sorted(p.name for p in out.iterdir())

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model.config), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        modelpress.save(model, tok, out)
    assert sorted(p.name for p in out.iterdir()) == before          # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]         # no temporary folder left


def test_garbage_safetensors_is_a_user_error(tmp_path, tiny):
    model, tok = tiny
    out = modelpress.save(model, tok, tmp_path / "ckpt")
    (out / checkpoint.WEIGHTS).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelpressError, match="not a valid safetensors"):
        modelpress.load(out)


def test_newer_format_is_refused(tmp_path, tiny):
    model, tok = tiny
    out = modelpress.save(model, tok, tmp_path / "ckpt")
    m = json.loads((out / "modelpress.json").read_text())
    m["format_version"] = 99
    (out / "modelpress.json").write_text(json.dumps(m))
    with pytest.raises(ModelpressError, match="newer modelpress"):
        modelpress.load(out)


def test_save_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, tiny):
    model, tok = tiny
    precious = tmp_path / "docs"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(ModelpressError, match="other than a modelpress checkpoint"):
        modelpress.save(model, tok, precious)
    assert (precious / "thesis.txt").read_text() == "years of work"
