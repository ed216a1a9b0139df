"""benchmarks/gpu_check.py's CPU-side logic, without CUDA: the command line, the table, the time
budget, the step phases and the sync-warning counting, and the skip when there is no GPU."""

import warnings

import pytest
import torch

from benchmarks import gpu_check as gc

# -- the command line ----------------------------------------------------------------------------

def test_defaults():
    args = gc.parse_args([])
    assert args.budget_s == 480.0 and args.steps == 30 and args.out is None and args.device == "cuda"
    assert args.only == list(gc.CHECKS)
    assert gc.parse_args(["--device", "cpu"]).steps == 2  # the dry run
    assert gc.parse_args(["--device", "cpu", "--steps", "5"]).steps == 5


def test_every_callback_and_mix_is_a_check():
    expected = {"granet", "rigl", "set", "nm", "sparcl", "freezeout", "adaptive", "freezeout_cached",
                "loss_reweighting", "infobatch", "galore", "galore_8bit", "galore_random", "vit_mix", "lm_mix",
                "ddpm_mix", "nm_semi_structured", "galore_memory"}
    assert set(gc.CHECKS) == expected


def test_options():
    args = gc.parse_args(["--budget-s", "60", "--steps", "12", "--only", " vit_mix, rigl ,", "--out", "t.md"])
    assert args.budget_s == 60.0 and args.steps == 12 and args.out == "t.md"
    assert args.only == ["rigl", "vit_mix"]  # registry order, whitespace and empty items ignored


@pytest.mark.parametrize("only, bad", [("rigl,nope", "'nope'"), ("", "(none given)"), ("RigL", "'RigL'")])
def test_only_refuses_unknown_names(capsys, only, bad):
    with pytest.raises(SystemExit) as exit_info:
        gc.parse_args(["--only", only])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--only: unknown check(s) {bad}" in err and "choose from granet, rigl," in err


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--budget-s", "-1"], ["--steps", "x"]])
def test_bad_numbers(capsys, argv):
    with pytest.raises(SystemExit):
        gc.parse_args(argv)
    err = capsys.readouterr().err
    assert "must be > 0" in err or "invalid int value: 'x'" in err


# -- the table -----------------------------------------------------------------------------------

def test_table():
    rows = [gc.Row("dense vit", "bf16-mixed", "1.2 ms/step; 3 syncs/step", "reference", "ViT"),
            gc.Row("rigl", "16-mixed", "error: ValueError: a | b\nc"),
            gc.Row("galore_memory", "torch AdamW", "peak 2.50 GiB", "reference", "")]
    lines = gc.format_table(rows).split("\n")
    assert lines[0] == "| check | setting | result | vs dense/baseline | note |"
    assert lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| dense vit | bf16-mixed | 1.2 ms/step; 3 syncs/step | reference | ViT |"
    assert lines[3] == "| rigl | 16-mixed | error: ValueError: a \\| b c |  |  |"  # one line, pipe escaped
    assert lines[4] == "| galore_memory | torch AdamW | peak 2.50 GiB | reference |  |"
    assert len(lines) == 5
    text = gc.report(rows, ["GPU: X", "versions"])
    assert text.startswith("GPU: X\nversions\n\n| check |") and text.endswith("|  |\n")


def test_cells():
    assert gc.format_ms(0.0123) == "12.3 ms/step" and gc.format_ms(1.5) == "1500 ms/step"
    assert gc.format_syncs([]) == "syncs n/a"
    assert gc.format_syncs([2, 2, 2]) == "2 syncs/step" and gc.format_syncs([1, 2, 9]) == "2 syncs/step (max 9)"
    assert gc.versus_dense(0.02, [3, 3], 0.01, [1, 1]) == "2.00x time, +2 syncs"
    assert gc.versus_dense(0.01, [], 0.01, []) == "1.00x time"  # the CPU dry run counts no syncs
    row = gc.error_row("x", "s", RuntimeError("y" * 1000))
    assert row.result.startswith("error: RuntimeError: yyy") and len(row.result) <= 310


# -- the budget ----------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_checks_beyond_the_budget_are_skipped():
    clock = FakeClock()
    budget = gc.Budget(10.0, clock)
    ran = []

    def unit(check, setting, seconds, estimate=1.0):
        def run():
            ran.append((check, setting))
            clock.now += seconds
            return gc.Row(check, setting, "ok")
        return gc.Unit(check, setting, run, estimate)

    units = [unit("a", "bf16", 3), unit("b", "bf16", 1, estimate=7.0),  # 7 s left: just fits
             unit("c", "bf16", 1, estimate=7.0),  # 6 s left: skipped
             unit("d", "bf16", 1), unit("d", "16", 1)]  # 6 then 5 s left
    rows = gc.run_units(units, budget)
    assert ran == [("a", "bf16"), ("b", "bf16"), ("d", "bf16"), ("d", "16")]
    assert [(r.check, r.result) for r in rows] == [("a", "ok"), ("b", "ok"), ("c", "skipped (time)"), ("d", "ok"),
                                                   ("d", "ok")]
    assert rows[2].note == "6 s of the budget left, needs ~7 s"
    clock.now += 100  # the budget is spent: everything else is skipped
    rows = gc.run_units([unit("e", "bf16", 1), unit("f", "x", 1)], budget)
    assert [r.result for r in rows] == ["skipped (time)"] * 2 and rows[0].note.startswith("0 s of the budget left")


def test_a_settings_duration_is_the_estimate_of_the_next():
    clock = FakeClock()
    budget = gc.Budget(20.0, clock)

    def slow():
        clock.now += 12  # the first setting also measured the dense baseline
        return gc.Row("rigl", "bf16-mixed", "ok")

    rows = gc.run_units([gc.Unit("rigl", "bf16-mixed", slow, 1.0), gc.Unit("rigl", "16-mixed", slow, 1.0)], budget)
    assert [r.result for r in rows] == ["ok", "skipped (time)"]
    assert rows[1].note == "8 s of the budget left, needs ~12 s"


def test_errors_and_side_rows():
    clock = FakeClock()
    pending = []

    def broken():
        pending.append(gc.Row("dense vit", "bf16-mixed", "1 ms/step"))  # measured before the failure
        raise ValueError("bad\nthing")

    def fine():
        return [gc.Row("b", "s", "ok")]

    def take():
        rows, pending[:] = list(pending), []
        return rows

    lines = []
    rows = gc.run_units([gc.Unit("a", "bf16-mixed", broken), gc.Unit("b", "s", fine)], gc.Budget(60.0, clock), take,
                        progress=lines.append)
    assert [(r.check, r.result) for r in rows] == [("dense vit", "1 ms/step"), ("a", "error: ValueError: bad thing"),
                                                   ("b", "ok")]
    assert lines[0].startswith("a [bf16-mixed]: error: ValueError") and lines[1].startswith("b [s]: ok")


def test_plan_units_cover_every_setting(tmp_path):
    ctx = gc.Context("cpu", gc.step_plan(2, "cpu"), str(tmp_path))
    units = gc.plan_units(ctx, ["rigl", "nm_semi_structured", "galore_memory"])
    assert [(u.check, u.setting) for u in units] == [
        ("rigl", "bf16-mixed"), ("nm_semi_structured", "float16"), ("nm_semi_structured", "bfloat16"),
        *[("galore_memory", m) for m in gc.GALORE_METHODS]]
    cuda = gc.Context("cuda", gc.step_plan(30, "cuda"), str(tmp_path))
    assert [u.setting for u in gc.plan_units(cuda, ["vit_mix"])] == ["bf16-mixed", "16-mixed"]


# -- steps and syncs -----------------------------------------------------------------------------

def test_step_plan_and_phases():
    plan = gc.step_plan(30, "cuda")
    assert (plan.warmup, plan.timed, plan.sync, plan.total, plan.every) == (5, 30, 8, 43, 10)
    phases = [gc.step_phase(s, plan) for s in range(45)]
    assert phases == ["warmup"] * 5 + ["timed"] * 30 + ["sync"] * 8 + ["after"] * 2
    dry = gc.step_plan(2, "cpu")
    assert (dry.warmup, dry.timed, dry.sync, dry.every) == (0, 2, 0, 1)
    assert [s for s in range(35, 43) if gc.ordinary_step(s, 10)] == [35, 36, 37, 38, 41, 42]  # 39 ends, 40 starts on 10
    assert all(gc.ordinary_step(s, 2) for s in range(6))


def _message(text, category=UserWarning):
    return warnings.WarningMessage(category(text), category, "file.py", 1)


def test_count_sync_warnings():
    records = [_message("called a synchronizing CUDA operation"), _message("something else"),
               _message("called a synchronizing CUDA operation (Triggered internally at ...)"),
               _message("deprecated", DeprecationWarning)]
    assert gc.count_sync_warnings(records) == 2
    assert gc.count_sync_warnings([]) == 0

    class Record:  # anything with a message
        message = "called a synchronizing CUDA operation"

    assert gc.count_sync_warnings([Record(), Record()]) == 2
    assert gc.sync_summary([]) is None and gc.sync_summary([0, 4, 1]) == (1.0, 4)


@pytest.fixture
def fake_cuda(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return modes


def test_sync_capture(fake_cuda):
    capture = gc.SyncCapture()
    capture.start()
    warnings.warn("called a synchronizing CUDA operation")
    warnings.warn("called a synchronizing CUDA operation")  # "always": the same place counts twice
    warnings.warn("not a sync")
    assert capture.stop() == 2 and fake_cuda == ["warn", 0]
    assert capture.stop() == 0  # stopping twice is harmless (cleanup after an exception)
    with warnings.catch_warnings(record=True) as after:  # the filters were restored
        warnings.simplefilter("always")
        warnings.warn("outside")
    assert len(after) == 1


def test_step_probe_times_and_counts(fake_cuda):
    plan = gc.StepPlan(warmup=2, timed=3, sync=4)  # every 1: all sync-window steps are ordinary
    probe = gc.StepProbe(plan, cuda=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # those outside the sync window
        for step in range(plan.total + 1):
            probe.begin(step)
            for _ in range(step):
                warnings.warn("called a synchronizing CUDA operation")
            probe.end()
    assert len(probe.times) == 3 and all(t >= 0 for t in probe.times)
    assert probe.syncs == [5, 6, 7, 8]
    assert fake_cuda == ["warn", 0] * 4

    cpu = gc.StepProbe(gc.step_plan(2, "cpu"), cuda=False)
    for step in range(3):
        cpu.begin(step)
        cpu.end()
    assert len(cpu.times) == 2 and cpu.syncs == []


# -- no GPU --------------------------------------------------------------------------------------

def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main([]) == 0
    out = capsys.readouterr().out
    assert out == gc.SKIP_MESSAGE + "\n" and "skipped" in out and "CUDA" in out
    assert gc.main(["--only", "rigl", "--steps", "3"]) == 0
