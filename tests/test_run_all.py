"""benchmarks/run_all.py: the registry expands its seeds from data, ``--quick`` plans into a folder of
its own, and the report (the last table of each log, its numbers, the plots, and logs that are
missing, failed or smoke tests). Nothing here runs a benchmark."""

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
    log = ("noise\n| a | b |\n|---|---|\n| x | 1 |\nmore\n"
           "| method | cost |\n|---|---|\n| m | 391 ± 69 (0.70 ± 0.11) |\n")
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
    (tmp_path / "logs" / "sparse_vit.txt").write_text(
        "# command: y\n" + head + "| dense | – | 95.7 | 1 |\n| RigL | 90% | 96.9 | 0.104 |\n")
    runs = [{"method": m, "sparsity": s, "seed": 0, "step_times": [0.1] * 10, "val_steps": [5, 10],
             "val_losses": [1.0, final]}
            for m, s, final in (("dense", None, 0.5), ("rigl", 0.9, 0.4))]
    (tmp_path / "logs" / "sparse_vit.json").write_text(json.dumps(runs))
    text = run_all.report()
    for name in run_all.BENCHMARKS:
        assert f"## {name}:" in text
    assert "QUICK SMOKE TEST" in text and "| InfoBatch 0.5 | 93.3 ± 0.9 | 0.732 ± 0.046 |" in text
    assert (tmp_path / "figures" / "infobatch.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "sparse_vit.png").exists()
    assert (tmp_path / "figures" / "sparse_vit_curves.png").exists()
    assert "figures/sparse_vit_curves.png" in text
    assert "holds no table" in text and "Not run yet: `python benchmarks/run_all.py --only sparcl`" in text


# -- the registry -------------------------------------------------------------------------------------


def test_registry_expands_seed_groups_from_data(run_all):
    """One row per setting; each group of seeds becomes one benchmark (one process, one log), named
    and argued from the row's data."""
    study = run_all.Study("demo", "infobatch.py", ("--epochs", "120"), ((0, 1, 2), (5, 6, 7, 8, 9), (11,)),
                          "A question", "docs/methods/infobatch.md", "cost", "quality")
    runs = study.expand()
    assert list(runs) == ["demo", "demo_seeds_5_9", "demo_seed_11"]
    assert runs["demo"].args == ("--epochs", "120", "--seeds", "0", "1", "2")
    assert runs["demo_seeds_5_9"].args == ("--epochs", "120", "--seeds", "5", "6", "7", "8", "9")
    assert runs["demo_seed_11"].args == ("--epochs", "120", "--seeds", "11")
    assert runs["demo"].question == "A question" and runs["demo_seeds_5_9"].question == "A question, seeds 5–9"
    assert {b.card for b in runs.values()} == {"docs/methods/infobatch.md"}
    no_seeds = run_all.Study("g", "galore.py", ("--steps", "300"), (), "Q", "docs/methods/galore.md", "c", "q")
    assert no_seeds.expand()["g"].args == ("--steps", "300")


def test_registry_is_the_expanded_table(run_all):
    """BENCHMARKS is exactly the expansion of REGISTRY: no hand-written copy per seed."""
    expanded = {}
    for study in run_all.REGISTRY:
        expanded.update(study.expand())
    assert run_all.BENCHMARKS == expanded
    assert len({s.name for s in run_all.REGISTRY}) == len(run_all.REGISTRY)
    more = run_all.BENCHMARKS["infobatch_120_epochs_seeds_5_9"]
    assert more.args[-6:] == ("--seeds", "5", "6", "7", "8", "9")
    assert more.args[:-6] == run_all.BENCHMARKS["infobatch_120_epochs"].args[:-6]
    # every committed log still has its benchmark (the names did not move)
    for log in (ROOT / "benchmarks" / "logs").glob("*.txt"):
        assert log.stem in run_all.BENCHMARKS, log.name


# -- --quick ----------------------------------------------------------------------------------------


def committed(run_all):
    """Every file of the repository a run may not overwrite: the committed logs, figures and report."""
    return {run_all.RESULTS.resolve(), *(p.resolve() for p in run_all.LOGS.iterdir()),
            *(p.resolve() for p in run_all.FIGURES.glob("*"))}


def test_quick_plans_into_a_folder_of_its_own(run_all):
    where = run_all.plan(quick=True)
    assert where.quick and where.logs == run_all.LOGS / "quick"
    assert where.results == where.logs / "RESULTS.md" and where.results != run_all.RESULTS
    assert where.figures == where.logs / "figures" and where.figures != run_all.FIGURES
    for job in where.runs:
        assert job.log.parent == where.logs and job.command[2:3] == ("--quick",)
        assert job.curves is None or job.curves.parent == where.logs
        assert "--seeds" not in job.command
    # each script once: --quick ignores the settings, so a second benchmark of a script would repeat it
    scripts = [job.command[1] for job in where.runs]
    assert len(scripts) == len(set(scripts)) == len({b.script for b in run_all.BENCHMARKS.values()})


def test_quick_never_targets_the_committed_files():
    """On the real module (paths not redirected): the quick plan writes nowhere near the committed logs,
    figures or benchmarks/RESULTS.md, and refuses an --out that would."""
    spec = importlib.util.spec_from_file_location("run_all_real", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all_real"] = module
    try:
        spec.loader.exec_module(module)
        logs, results = ROOT / "benchmarks" / "logs", ROOT / "benchmarks" / "RESULTS.md"
        assert module.LOGS == logs and module.RESULTS == results
        where = module.plan(quick=True)
        written = {where.results, *(job.log for job in where.runs), *(job.curves for job in where.runs if job.curves)}
        assert where.logs != logs and results not in written
        assert not written & committed(module)
        assert all(path.is_relative_to(where.logs) for path in written | {where.figures})
        for out in (logs, ROOT / "benchmarks"):
            with pytest.raises(SystemExit, match="folder of their own"):
                module.plan(quick=True, out=out)
        # a full run still reports into the committed files
        full = module.plan()
        assert full.results == results and full.logs == logs and full.figures == module.FIGURES
    finally:
        del sys.modules["run_all_real"]


def test_quick_out_folder_and_report(run_all, tmp_path):
    """--out sends the quick logs, plots and report to that folder; the report lists what ran there and
    links to the cards from where it lies."""
    out = tmp_path / "smoke"
    where = run_all.plan(only=["infobatch", "infobatch_ablations", "sparse_vit"], quick=True, out=out)
    assert [job.name for job in where.runs] == ["infobatch", "sparse_vit"]
    assert where.results == out / "RESULTS.md" and where.figures == out / "figures"
    out.mkdir()
    (out / "infobatch.txt").write_text(
        "# command: python benchmarks/infobatch.py --quick\n# kind: QUICK SMOKE TEST (numbers mean nothing)\n"
        "| method | final val acc % | fit time vs baseline |\n|---|---|---|\n| baseline | 50 | 1.000 |\n")
    text = run_all.report(where)
    assert text.startswith("# Benchmark results — quick smoke test") and "numbers" in text
    assert "## infobatch:" in text and "## sparse_vit:" in text and "## galore:" not in text
    assert "Not run yet: `python benchmarks/run_all.py --quick --only sparse_vit`" in text
    assert (out / "figures" / "infobatch.png").exists() and not (tmp_path / "figures").exists()
    card = Path(run_all.os.path.relpath(ROOT / "docs" / "methods" / "infobatch.md", out)).as_posix()
    assert f"[infobatch.md]({card})" in text


def test_plan_mode_prints_and_writes_nothing(run_all, tmp_path, monkeypatch, capsys):
    out = tmp_path / "smoke"
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--plan", "--quick", "--out", str(out), "--only", "galore"])
    monkeypatch.setattr(run_all, "run", lambda *a, **k: pytest.fail("--plan ran a benchmark"))
    run_all.main()
    printed = capsys.readouterr().out
    assert "galore.py --quick" in printed and str(out / "RESULTS.md") in printed
    assert not out.exists()
