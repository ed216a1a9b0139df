"""Freezing under DDP (2 CPU processes, gloo): no "unused parameters" crash, the same frozen set on
every rank, and parameters that stay identical across ranks."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_freezing_script.py")


def test_frozen_sets_and_parameters_identical_on_every_rank(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["find_unused"] is True
    assert result["frozen"] == [3, 3]
    assert result["params_equal"]
