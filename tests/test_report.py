"""The Markdown of ``potluck report``: escaping and layer grouping (the report of a real
repository is tested in test_gate.py, on its story repository)."""

from __future__ import annotations

from potluck.ops.evals.report import layer_of, md


def test_markdown_escaping_and_layers() -> None:
    assert md("a|b") == "a\\|b"
    assert md("<img src=x onerror=alert(1)>") == "\\<img src=x onerror=alert(1)\\>"
    # control characters: a \uXXXX escape whose backslash is itself escaped (renders as text)
    assert md("x\ny\x1b[31m\u202e") == "x\\\\u000ay\\\\u001b\\[31m\\\\u202e"
    assert md("@team *bold* `code` ![i](u)") == "\\@team \\*bold\\* \\`code\\` \\!\\[i\\](u)"
    assert [layer_of(n) for n in ("h.3.mlp.fc.weight", "model.layers.11.q", "wte", "x.1")] == [
        "h.3", "model.layers.11", "wte", "x.1",
    ]  # fmt: skip
