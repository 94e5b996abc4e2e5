"""Running a multi-process command (torchrun and its workers) from a test without ever hanging the
suite: output goes to a file, not a pipe (a pipe held open by a stray worker blocks the reader forever),
and a launch past its time limit is killed whole. torchrun starts each worker in a session of its own,
so killing torchrun's process group would leave the workers running; the launch's processes are found
instead by a marker that every one of them inherits in its environment."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

MARKER = "QTARGET_TEST_LAUNCH"


def launch_env(**extra: str) -> dict[str, str]:
    """The environment for a launch: one thread per process, and gloo on loopback (the host name may
    resolve to an address no peer can reach, in sandboxes and CI)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), **extra}


def kill_launch(marker: str) -> None:
    """SIGKILL every process whose environment carries MARKER=marker."""
    needle = f"{MARKER}={marker}".encode()
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            if needle in (proc_dir / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except OSError:
            continue  # gone already, or not ours


def run_launch(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: float, log: Path,
               attempts: int = 1, outputs: tuple[Path, ...] = ()) -> int | None:
    """Run `cmd` with its output appended to `log`; its return code, or None when it ran past `timeout_s`
    and was killed with every process it started. A failed run is repeated up to `attempts` times in
    all (gloo's TCP pairs can abort a process at exit on a loaded 2-core machine: "terminate called
    without an active exception", SIGABRT); a real failure fails every attempt, and `log` keeps them all.
    `outputs` (files or folders the command writes) are removed before each attempt."""
    code: int | None = None
    for attempt in range(attempts):
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        marker = uuid.uuid4().hex
        with open(log, "a") as out:
            out.write(f"=== attempt {attempt + 1} of {attempts}: {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=cwd, env={**env, MARKER: marker}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
                out.write(f"\n=== timed out after {timeout_s:.0f} s\n")
            kill_launch(marker)  # after a timeout; or a worker its launcher failed to reap
            proc.wait(timeout=30)
        if code == 0:
            break
    return code
