import json

import pytest
import torch

from modelpress import ModelpressError
from modelpress.data import default_text, load_text, read_text, windows


def test_default_text_is_deterministic_and_disjoint():
    calib, ev = default_text("calib"), default_text("eval")
    assert default_text("calib") == calib and len(calib) > 50_000 and len(ev) > 100_000
    calib_parts, eval_parts = set(calib.split("\n\n")), set(ev.split("\n\n"))
    from pydoc_data.topics import topics

    first = topics[sorted(topics)[0]].strip()
    assert first.split("\n\n")[0] in calib_parts and first.split("\n\n")[0] not in eval_parts
    assert load_text(None, "eval") == ev


def test_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n")
    assert read_text(tmp_path / "a.txt") == "plain text\n"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_text(tmp_path / "b.jsonl") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ModelpressError, match="c.jsonl:1"):
        read_text(tmp_path / "c.jsonl")
    with pytest.raises(ModelpressError, match="does not exist"):
        read_text(tmp_path / "missing.txt")


def test_windows_drop_the_partial_last_one():
    ids = torch.arange(10)
    assert windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ModelpressError, match="fewer than one window"):
        windows(ids, 11)


def test_default_calibration_interleaves_reference_prose_and_module_docstrings():
    """Issue 28: the default calibration text mixes two kinds (help() topics and the standard library's module
    docstrings, one for one from the start), so that even its first windows are not one kind of text; the
    docstrings are read from the sources, not imported, and none of them is in the evaluation text."""
    import argparse
    from pydoc_data.topics import topics

    from modelpress.data import module_docstrings

    docs = module_docstrings()
    assert len(docs) > 50 and argparse.__doc__.strip() in docs
    calib = default_text("calib")
    first_topic = topics[sorted(topics)[0]].strip()
    assert calib.startswith(first_topic + "\n\n" + docs[0])
    assert calib.index(docs[1]) < calib.index(topics[sorted(topics)[8]].strip())
    ev = default_text("eval")
    assert not any(d in ev for d in docs[:20])
