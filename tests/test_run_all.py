"""benchmarks/run_all.py's report: the last table of each log, its numbers, the plots, and logs
that are missing, failed or smoke tests."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_all(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_all", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(module, "FIGURES", tmp_path / "figures")
    (tmp_path / "logs").mkdir()
    return module


def test_last_table_and_numbers(run_all):
    log = "noise\n| a | b |\n|---|---|\n| x | 1 |\nmore\n| method | cost |\n|---|---|\n| m | 391 ± 69 (0.70 ± 0.11) |\n"
    assert run_all.last_table(log) == ["| method | cost |", "|---|---|", "| m | 391 ± 69 (0.70 ± 0.11) |"]
    assert run_all.number("391 ± 69 (0.70 ± 0.11)") == 0.70
    assert run_all.number("93.33 ± 0.94") == 93.33 and run_all.number("-") is None


def test_report_covers_every_benchmark(run_all, tmp_path):
    bench = run_all.BENCHMARKS["infobatch"]
    (tmp_path / "logs" / "infobatch.txt").write_text(
        "# command: python benchmarks/infobatch.py --quick\n# date: 2026-12-01 10:00\n# machine: test box\n"
        "# kind: QUICK SMOKE TEST (numbers mean nothing)\n"
        f"| method | {bench.quality} | {bench.cost} |\n|---|---|---|\n| baseline | 93.3 ± 1.8 | 1.000 |\n"
        f"| InfoBatch 0.5 | 93.3 ± 0.9 | 0.732 ± 0.046 |\n")
    (tmp_path / "logs" / "galore.txt").write_text("# command: x\nTraceback: it failed\n")
    head = "| method | sparsity | val acc % | training FLOPs |\n|---|---|---|---|\n"
    (tmp_path / "logs" / "sparse_vit.txt").write_text("# command: y\n" + head + "| dense | – | 95.7 | 1 |\n| RigL | 90% | 96.9 | 0.104 |\n")
    runs = [{"method": m, "sparsity": s, "seed": 0, "step_times": [0.1] * 10, "val_steps": [5, 10], "val_losses": [1.0, l]}
            for m, s, l in (("dense", None, 0.5), ("rigl", 0.9, 0.4))]
    (tmp_path / "logs" / "sparse_vit.json").write_text(json.dumps(runs))
    text = run_all.report()
    for name in run_all.BENCHMARKS:
        assert f"## {name}:" in text
    assert "QUICK SMOKE TEST" in text and "| InfoBatch 0.5 | 93.3 ± 0.9 | 0.732 ± 0.046 |" in text
    assert (tmp_path / "figures" / "infobatch.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "sparse_vit.png").exists() and (tmp_path / "figures" / "sparse_vit_curves.png").exists()
    assert "figures/sparse_vit_curves.png" in text
    assert "holds no table" in text and "Not run yet: `python benchmarks/run_all.py --only sparcl`" in text
