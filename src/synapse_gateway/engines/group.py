"""An engine's process group: stopped as a whole, and killed as a whole if Synapse itself dies.

An engine runs in its own session, so its group holds the engine and every worker it forks (vLLM's
tensor-parallel workers, llama.cpp's helpers). PR_SET_PDEATHSIG kills only the direct child when Synapse
is SIGKILLed; the workers would live on, holding GPU memory. So each engine gets a guard: a tiny process
that blocks reading a pipe from Synapse. The kernel closes that pipe however Synapse ends, SIGKILL and
OOM kill included, and the guard then SIGKILLs the whole group.

Not covered: a worker that leaves the group (calls setsid itself), a guard killed on its own, and the
moment between the engine's start and its guard's. Under systemd (KillMode=control-group) or in a
container the cgroup is the stronger boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

# Run with -I -S: no site-packages and no environment, so it starts in a few milliseconds.
_GUARD = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    try:
        if not os.read(0, 4096):
            break
    except InterruptedError:
        continue
    except OSError:
        break
try:
    os.killpg(int(sys.argv[1]), signal.SIGKILL)
except OSError:
    pass
"""
_POLL = 0.05


class GroupGuard:
    """Kills process group `pgid` if Synapse dies before `disarm` is called."""

    def __init__(self, process: asyncio.subprocess.Process, lifeline: int) -> None:
        self._process = process
        self._lifeline = lifeline  # the pipe's write end: only the kernel closes it while we run

    @classmethod
    async def start(cls, pgid: int) -> GroupGuard:
        """Start a guard for group `pgid`."""
        read_end, write_end = os.pipe()  # not inherited by other children (PEP 446)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-c", _GUARD, str(pgid), stdin=read_end,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        return cls(process, write_end)

    async def disarm(self) -> None:
        """Stop the guard without letting it act: SIGKILL cannot run its kill path."""
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()
        try:
            await self._process.wait()
        finally:
            os.close(self._lifeline)


def signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to the group; False when no process is left in it."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # the id was reused by someone else's group: ours is gone
        return False
    return True


async def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Poll until no process is left in the group; False if some remain after `timeout`."""
    deadline = time.monotonic() + timeout
    while signal_group(pgid, 0):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL)
    return True


async def end_group(pgid: int, grace: float) -> bool:
    """SIGTERM what is left of the group, SIGKILL it after `grace`; False if something survived both."""
    if not signal_group(pgid, signal.SIGTERM):
        return True
    if await wait_group_gone(pgid, grace):
        return True
    signal_group(pgid, signal.SIGKILL)
    return await wait_group_gone(pgid, 2.0)
