"""Run a 2-process DDP script (CPU, gloo) in a subprocess and read the JSON it writes.

A rendezvous that fails for reasons of the machine (a port taken between being found free and
being bound, a peer reset under load, gloo aborting the interpreter's exit) is retried once on a
fresh port; any other failure, and every result the script reports, is left to the test to judge."""

import json
import os
import socket
import subprocess
import sys

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


def run_ddp_script(script: str, args: list[str], tmp_path, timeout: int = 300) -> dict:
    out = tmp_path / "result.json"
    clean = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("TORCHELASTIC")}
    for attempt in range(2):
        env = {**clean, "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        proc = subprocess.run([sys.executable, script, *args, str(out)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode == 0 or attempt == 1 or not any(e in proc.stderr for e in _INFRA_ERRORS):
            break
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
                                  f"stderr:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


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


def _gloo_rank(rank: int, world: int, port: int, check, failures) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        check(rank, world, failures)
    finally:
        dist.destroy_process_group()


def failures_on_gloo_ranks(check, ranks: int) -> list:
    """Run ``check(rank, world, failures)`` (a module-level function) on ``ranks`` spawned gloo
    processes; the failures they appended to ``failures``."""
    import torch.multiprocessing as mp

    failures = mp.Manager().list()
    mp.spawn(_gloo_rank, args=(ranks, _free_port(), check, failures), nprocs=ranks, join=True)
    return list(failures)
