"""The package's layout, read from the source: imports flow down (core ← data ← techniques; core ←
strategies), no technique package imports another, and private Lightning/torch attributes are touched only in
``core/lightning_internals.py``."""

import ast
import re
from pathlib import Path

import pytest

import lit_efficient

PACKAGE = Path(lit_efficient.__file__).parent
TECHNIQUES = {"sparsity", "freezing", "reweighting", "lowrank", "continual"}
# who may import whom, by the first part of the module path inside lit_efficient
# strategies (data parallelism) stand on core alone: they learn what a technique reads through its protocols
ALLOWED = {"core": {"core"}, "data": {"core", "data"}, **{t: {"core", "data", t} for t in TECHNIQUES},
           "strategies": {"core", "strategies"}}
SEAM = PACKAGE / "core" / "lightning_internals.py"
PRIVATE = re.compile(r"\b(_data_source|_update_dataloader|_gather_all_tensors|_logger_connector|_ddp_kwargs|_opt_called"
                     r"|_wrapped_by_lr_sched|_compiler_ctx|_schedulers|_parameters\[)|\"_trainer\"")


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def room(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("lit_efficient."):
                rooms.add(name.split(".")[1])
    return rooms


@pytest.mark.parametrize("path", [p for p in modules() if room(p) in ALLOWED],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_down(path):
    wrong = imported_rooms(path) - ALLOWED[room(path)]
    assert not wrong, f"{path.relative_to(PACKAGE)} ({room(path)}) imports {sorted(wrong)}"


def test_every_module_lives_in_a_room():
    loose = [p.name for p in PACKAGE.glob("*.py")]
    assert sorted(loose) == ["__init__.py", "cli.py"]
    assert {room(p) for p in modules()} - {"__init__", "cli"} == set(ALLOWED)


def test_private_attributes_only_in_the_seam():
    found = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in modules() if p != SEAM
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if PRIVATE.search(line) and not line.lstrip().startswith("#")]
    assert not found, "private attributes outside core/lightning_internals.py:\n" + "\n".join(found)
    assert PRIVATE.search(SEAM.read_text())  # the pattern still finds what the seam holds


def test_every_public_name_imports_from_the_package():
    for name in lit_efficient.__all__:
        assert getattr(lit_efficient, name).__module__.startswith("lit_efficient."), name
