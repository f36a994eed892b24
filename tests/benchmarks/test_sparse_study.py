"""benchmarks/sparse_study.py runs end to end at its smallest (accuracies are reported, not asserted):
the hand-written MCUNetV3 scheme fine-tunes through a compiled step (the other schemes go the same
way; lite residual's numerics: tests/test_lite_residual.py), the search runs at its memory, and the
table, goals, plot and JSON are written."""

import json

from conftest import FAST_HOST, load_example_module


def test_sparse_study_small(tmp_path, capsys):
    study = load_example_module("benchmarks/sparse_study.py", "sparse_study")
    schemes = ["MCUNetV3 hand-written"]
    outcome = study.main(["--small", "--build-target", json.dumps(FAST_HOST), "--plot", str(tmp_path / "study.png"),
                          "--json", str(tmp_path / "study.json")] + [a for s in schemes for a in ("--scheme", s)])
    rows = outcome["digits"]["rows"]
    assert list(rows) == schemes + ["searched at hand-written's memory"]
    searched = rows["searched at hand-written's memory"]
    assert searched.memory <= rows["MCUNetV3 hand-written"].memory  # the search's choice fits its budget
    assert 0 < searched.trained < 130_533  # SmallCNN's parameters (5 classes)
    assert all(0 <= a <= 1 for row in rows.values() for a in row.accuracies)
    saved = json.loads((tmp_path / "study.json").read_text())["digits"]
    assert [r["label"] for r in saved["rows"]] == list(rows)
    assert (tmp_path / "study.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert "digits goals:" in out and "searched at the hand-written scheme's memory vs it" in out
