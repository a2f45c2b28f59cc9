"""pipelines/monuseg_ablations.py: paired differences read from each experiment, drawn and tabled."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "pipelines" / "monuseg_ablations.py"


@pytest.fixture(scope="module")
def ablations(monkeypatch_module):
    monkeypatch_module.syspath_prepend(str(SCRIPT.parent))  # as when run as a script: its neighbours import
    spec = importlib.util.spec_from_file_location("monuseg_ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _experiment(folder: Path, per_seed: dict[str, list[float]], key: str = "distance/difference@0.1") -> None:
    folder.mkdir(parents=True)
    table = {key: {k: {"mean": sum(v) / len(v), "std": float("nan") if len(v) == 1 else 0.01, "per_seed": v}
                   for k, v in per_seed.items()}}
    (folder / "results.json").write_text(json.dumps({"settings": {"seeds": list(range(len(per_seed["dice"])))},
                                                     "table": table}))


def test_rows_table_and_picture(ablations, tmp_path):
    _experiment(tmp_path / "a", {"dice": [0.01, 0.03], "aji": [0.02, -0.04], "pq": [0.0, 0.02]})
    _experiment(tmp_path / "b", {"dice": [-0.02], "aji": [0.05], "pq": [0.01]})
    out = tmp_path / "fig" / "ablations.png"
    ablations.main(["-o", str(out), f"long run=x={tmp_path / 'a'}", f"one seed={tmp_path / 'b'}"])
    assert out.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    text = out.with_suffix(".md").read_text()
    # a label may hold "="; the folder is what follows the last one
    assert "| long run=x | +0.020 ± 0.010 (+0.010, +0.030) | -0.010 ± 0.010 (+0.020, -0.040) |" in text
    # one seed has no spread: the mean alone
    assert "| one seed | -0.020 (-0.020) | +0.050 (+0.050) | +0.010 (+0.010) |" in text


def test_refusals_say_what_to_do(ablations, tmp_path):
    with pytest.raises(SystemExit, match="LABEL=DIR"):
        ablations.read_rows(["no-label"], "distance", 0.1)
    with pytest.raises(SystemExit, match="run pipelines/monuseg_experiment.py --out"):
        ablations.read_rows([f"x={tmp_path / 'missing'}"], "distance", 0.1)
    _experiment(tmp_path / "scratch-only", {"dice": [0.0], "aji": [0.0], "pq": [0.0]}, key="distance/difference@1")
    with pytest.raises(SystemExit, match="needs both starts"):
        ablations.read_rows([f"x={tmp_path / 'scratch-only'}"], "distance", 0.1)
