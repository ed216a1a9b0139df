"""Run a multi-rank test script (CPU, gloo) and read the JSON it writes.

Importing torch and Lightning takes most of a small run's time, and Lightning's own launcher starts
the second rank only after the first has imported both. So the scripts run on a pool of long-lived
ranks, one pool per world size, started once per test session: each rank imports everything and
joins the process group once, then runs one script after another with ``runpy`` (Lightning sees the
ranks as launched externally, as under torchrun, and reuses the process group). A pool that saw a
failure is discarded, so the next script starts on fresh ranks. ``LIT_EFFICIENT_FRESH_RANKS=1``
instead launches every script through Lightning in new processes, as a user's run would (the
examples' two-process CLI test always does).

A rendezvous that fails for reasons of the machine (a port taken between being found free and
being bound, a peer reset under load, gloo aborting the interpreter's exit) is retried once on a
fresh port; any other failure, and every result the script reports, is left to the test to judge."""

import atexit
import inspect
import json
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

_INFRA_ERRORS = ("Address already in use", "EADDRINUSE", "Connection reset by peer", "Connection refused",
                 "Socket Timeout", "DistNetworkError", "Connection closed by peer",
                 # gloo's threads aborting the interpreter's exit after the run finished (seen once in CI)
                 "terminate called without an active exception")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# set in this process by any earlier in-process Trainer(strategy="ddp"): inherited, they would make
# the script's Lightning believe it was launched externally as a lone rank, and wait for the other
_LAUNCH_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                     "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")


def _clean_environment() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("TORCHELASTIC")}
    return {**clean, "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1"}


def run_ddp_script(script: str, args: list[str], tmp_path, timeout: int = 300, ranks: int = 2) -> dict:
    """Run ``script ARGS OUT`` on ``ranks`` ranks with ``tmp_path`` as working directory; the JSON
    rank 0 wrote to OUT."""
    out = tmp_path / "result.json"
    if os.environ.get("LIT_EFFICIENT_FRESH_RANKS") == "1":
        _fresh_launch(script, [*args, str(out)], tmp_path, timeout)
        return json.loads(out.read_text())
    for attempt in range(2):
        try:
            _pool(ranks).run({"script": os.path.abspath(script), "args": [*args, str(out)]}, tmp_path, timeout)
            break
        except AssertionError as failure:  # the pool is gone: a rendezvous failure is retried on new ranks
            if attempt == 1 or not any(e in str(failure) for e in _INFRA_ERRORS):
                raise
    return json.loads(out.read_text())


def _fresh_launch(script: str, args: list[str], cwd, timeout: int) -> None:
    for attempt in range(2):
        env = {**_clean_environment(), "MASTER_PORT": str(_free_port())}
        proc = subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode == 0 or attempt == 1 or not any(e in proc.stderr for e in _INFRA_ERRORS):
            break
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
                                  f"stderr:\n{proc.stderr[-4000:]}")


class _RankPool:
    """``world`` rank processes (this file run as a script) waiting for jobs on their stdin."""

    def __init__(self, world: int):
        self.world, self.log = world, tempfile.NamedTemporaryFile("w+", prefix=f"ranks{world}-", suffix=".log")
        env = {**_clean_environment(), "MASTER_PORT": str(_free_port())}
        self.procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rank), str(world)], env=env,
                                       stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, text=True)
                      for rank in range(world)]

    def run(self, job: dict, cwd, timeout: int) -> list[dict]:
        """Send ``job`` (a ``script`` with its ``args``, or a function to ``call``) to every rank, with
        ``cwd`` as working directory; each rank's report once all finished without an error."""
        done = [cwd / f".rank{rank}.done" for rank in range(self.world)]
        line = json.dumps({**job, "cwd": str(cwd)})
        for proc in self.procs:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        deadline, failed_at = time.monotonic() + timeout, None
        while not all(path.exists() for path in done):
            reports = [json.loads(path.read_text()) for path in done if path.exists()]
            if failed_at is None and (any(r["error"] for r in reports) or not self.alive()):
                failed_at = time.monotonic()  # the other ranks may wait in a collective: give them a moment
            if time.monotonic() > deadline or (failed_at is not None and time.monotonic() > failed_at + 10):
                break
            time.sleep(0.02)
        reports = [json.loads(path.read_text()) if path.exists() else None for path in done]
        if all(r is not None and r["error"] is None for r in reports):
            return reports
        self.log.seek(0)
        pool_log = self.log.read()[-3000:]
        self.close()  # a failed job may leave collectives unmatched: the next job gets fresh ranks
        _POOLS.pop(self.world, None)
        lines = []
        for rank, report in enumerate(reports):
            log = cwd / f"rank{rank}.log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            status = "no report (hung or died)" if report is None else (report["error"] or "finished")
            lines.append(f"--- rank {rank}: {status}\n{tail}")
        raise AssertionError("\n".join(lines) + f"\n--- pool log:\n{pool_log}")

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.log.close()


_POOLS: dict[int, _RankPool] = {}


def _pool(world: int) -> _RankPool:
    pool = _POOLS.get(world)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _POOLS[world] = _RankPool(world)
    return pool


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def _serve(rank: int, world: int) -> None:
    """A pool's rank: join the process group once, then run each job sent on stdin."""
    # LOCAL_RANK tells Lightning the processes are launched externally; no RANK or LOCAL_WORLD_SIZE,
    # which would make it take the ranks for torchelastic's
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as the scripts do
    import lightning.pytorch  # noqa: F401  (the point of the pool: imported once)
    import torch.distributed as dist

    import lit_efficient  # noqa: F401

    dist.init_process_group("gloo", rank=rank, world_size=world)
    home = os.getcwd()
    for line in sys.stdin:
        job = json.loads(line)
        report = {"error": None, "failures": []}
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(os.path.join(job["cwd"], f"rank{rank}.log"), "w") as log:
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
            sys.argv, argv = [job.get("script", ""), *job.get("args", [])], sys.argv
            os.chdir(job["cwd"])
            try:
                if "script" in job:
                    runpy.run_path(job["script"], run_name="__main__")
                else:
                    path, name = job["call"]
                    runpy.run_path(path)[name](rank, world, report["failures"])
            except BaseException:  # noqa: BLE001  (a SystemExit too: reported, the rank lives on)
                report["error"] = traceback.format_exc()
                print(report["error"], flush=True)
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])
                os.chdir(home)
                sys.argv = argv
        done = os.path.join(job["cwd"], f".rank{rank}.done")
        with open(done + ".tmp", "w") as f:
            json.dump(report, f, default=str)
        os.replace(done + ".tmp", done)


# -- inside the DDP scripts ---------------------------------------------------------------------------

def gathered(tensor):
    """Every rank's copy of ``tensor`` (same shape on all ranks), in rank order."""
    import torch
    import torch.distributed as dist

    parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def equal_on_all_ranks(tensor) -> bool:
    """Whether every rank holds exactly the same ``tensor``."""
    import torch

    parts = gathered(tensor)
    return all(torch.equal(parts[0], p) for p in parts[1:])


def failures_on_gloo_ranks(check, ranks: int) -> list:
    """Run ``check(rank, world, failures)`` (a module-level function of a test file) on ``ranks`` gloo
    ranks of the pool; the failures they appended to ``failures``, rank 0's first."""
    with tempfile.TemporaryDirectory(prefix="gloo-check-") as cwd:
        reports = _pool(ranks).run({"call": [inspect.getfile(check), check.__name__]}, Path(cwd), timeout=300)
    return [failure for report in reports for failure in report["failures"]]


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
