"""bench.quality.rebase: it never trains the contributors' fine-tunes itself (they are
bench.quality's cached ones); a missing one is refused before the base moves, with the path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.quality import rebase, stages


def test_missing_contributor_finetune_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rebase.main(["--out", str(tmp_path)]) == 2
    key = stages.finetune_config("fortune_topic", 0, 200).key()
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: fortune_topic: no cached fine-tune fortune_topic-{key} under {tmp_path}/finetunes"
    )
    assert not [p.name for p in tmp_path.iterdir() if p.name != "_home"]  # no v2, no fine-tune
