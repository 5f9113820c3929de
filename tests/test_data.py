import json

import pytest
import torch

from slimlm.data import (Split, builtin_documents, calibration_windows, eval_windows, read_task_file,
                         read_text_file)
from slimlm.errors import SlimlmError


def test_builtin_split_is_deterministic_and_disjoint():
    cal, ev = builtin_documents(Split.CALIBRATION), builtin_documents(Split.EVALUATION)
    assert cal and ev
    assert {d.key for d in cal}.isdisjoint({d.key for d in ev})
    assert {d.text for d in cal}.isdisjoint({d.text for d in ev})
    # topics repeat each other's paragraphs: no evaluation paragraph of 80+ characters
    # appears verbatim anywhere in the calibration text
    cal_text = "\n\n".join(d.text for d in cal)
    paragraphs = [p.strip() for d in ev for p in d.text.split("\n\n") if len(p.strip()) >= 80]
    assert len(paragraphs) > 100 and not any(p in cal_text for p in paragraphs)
    share = sum(len(d.text) for d in ev) / sum(len(d.text) for d in cal + ev)
    assert 0.15 < share <= 0.25
    assert len(cal) + len(ev) == len(builtin_documents(Split.ALL))
    assert [d.key for d in ev] == [d.key for d in builtin_documents("evaluation")]


def test_eval_windows_protocol(tiny):
    text = "\n\n".join(d.text for d in builtin_documents("evaluation"))
    ws = eval_windows(tiny.tokenizer, text, seq_len=64, max_tokens=1000)
    assert sum(w.numel() for w in ws) == 1000
    assert all(w.numel() == 64 for w in ws[:-1]) and ws[-1].numel() == 1000 - 64 * 15
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"][:1000]
    assert torch.equal(torch.cat(ws), torch.tensor(ids))  # non-overlapping, in order


def test_calibration_windows_are_seeded(tiny):
    text = "\n\n".join(d.text for d in builtin_documents("calibration"))
    a = calibration_windows(tiny.tokenizer, text, 8, 32, seed=1)
    b = calibration_windows(tiny.tokenizer, text, 8, 32, seed=1)
    c = calibration_windows(tiny.tokenizer, text, 8, 32, seed=2)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(SlimlmError, match="holds only"):
        calibration_windows(tiny.tokenizer, "short text " * 20, 100, 32)


def test_text_file_errors(tmp_path):
    with pytest.raises(SlimlmError, match="no such file"):
        read_text_file(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(SlimlmError, match="empty"):
        read_text_file(tmp_path / "e.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SlimlmError, match="not UTF-8"):
        read_text_file(tmp_path / "b.txt")


@pytest.mark.parametrize("line, msg", [
    ("{", "not valid JSON"),
    ("[1]", "not a JSON object"),
    ('{"choices": ["a", "b"], "gold": 0}', "context"),
    ('{"context": "x", "choices": ["a"], "gold": 0}', "at least two"),
    ('{"context": "x", "choices": ["a", "b"], "gold": 2}', "gold"),
    ('{"context": "x", "choices": ["a", "b"], "gold": true}', "gold"),
])
def test_task_file_errors_name_the_line(tmp_path, line, msg):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"context": "ok", "choices": ["a", "b"], "gold": 1}) + "\n" + line + "\n")
    with pytest.raises(SlimlmError, match=f"line 2.*{msg}|{msg}.*line 2|line 2"):
        read_task_file(f)
    with pytest.raises(SlimlmError, match=msg):
        read_task_file(f)
