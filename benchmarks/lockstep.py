"""Fresh processes timed in lockstep: each one builds and warms up on its own, then they take turns on the
cores, one timed repeat each, round robin. On a shared machine throughput drifts by up to 2x over seconds
(docs/performance.md, "Noise"); one process after another sees different machines, but repeats a fraction of
a second apart see the same one, so per-turn ratios between the sides are what the benchmarks quote.

The protocol ($NNCOMPARE_TURNS="GO_FD,DONE_FD", spoken by nncompare's cells and benchmarks/native_loops.py):
a process says "ready" on DONE when it reaches its timed loop, then per repeat waits for a byte on GO and
answers with its samples/s, or "-" for a repeat dropped as too short (a latency turn: a block of single calls
lasting at least 50 ms, answered with 1 / its median seconds per call, so higher is faster there too). EOF on GO
ends the turns.
Never imports nncompare.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import tempfile
import time

TURNS_VARIABLE = "NNCOMPARE_TURNS"
# After a process answers, the next turn waits until it is idle: OpenMP pool threads spin for some
# milliseconds after their last parallel region (libgomp: ~8 ms a thread here), and spinning on a core the
# next process needs slows that process's repeat. Idle: under IDLE_SHARE of one core used over IDLE_WINDOW_S.
IDLE_WINDOW_S = 0.002
IDLE_SHARE = 0.05
SETTLE_MAX_S = 0.25  # a process busy for longer between its turns is not waited for: see spill()
# CPU a process uses after answering its turn, as a share of its turns' CPU: pool threads spinning down
# use a few per cent (libgomp at 2 threads: ~7 %); beyond this, work was still queued when it answered (MXNet's
# engine runs a step's backward and update after its loss is ready: ~13 %), so its repeats were timed short.
SPILL_BOUND = 0.10
# Turns a side may answer "-" beyond its dropped short repeats: a cell choosing its thread count takes a turn per
# probe repeat (MXNet: 6 rounds of 2 counts, started over when a repeat is short), all before its first timed one.
UNTIMED_TURNS = 48


def spill(runs: list[dict]) -> float | None:
    """Share of a side's CPU time (over its rounds) that it used after answering its turns rather than in them."""
    cpu_in = sum(r.get("cpu_in_turns_s", 0) for r in runs)
    return sum(r.get("cpu_after_turns_s", 0) for r in runs) / cpu_in if cpu_in > 0 else None


def spill_note(runs: list[dict]) -> str | None:
    """What the benchmarks print about a side whose spill() is over SPILL_BOUND, else None."""
    share = spill(runs)
    if share is None or share <= SPILL_BOUND:
        return None
    return (f"used {share:.0%} of its turns' CPU time after answering them: work still queued when a repeat "
            "ends times it short")


class Side:
    """One process of a lockstep round."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], result_prefix: str = ""):
        self.name, self.prefix, self.error, self.turns, self.buf = name, result_prefix, None, [], b""
        self.cpu_in = self.cpu_out = 0.0  # CPU seconds the process used in its turns / after answering them
        self._cpu_at_answer: float | None = None
        go_r, self.go = os.pipe()
        self.done, done_w = os.pipe()
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env={**env, TURNS_VARIABLE: f"{go_r},{done_w}"}, pass_fds=(go_r, done_w),
                                     stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err,
                                     start_new_session=True)
        os.close(go_r)
        os.close(done_w)

    @property
    def alive(self) -> bool:
        return self.error is None

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer in {timeout:g} s")
            if select.select([self.done], [], [], min(left, 1.0))[0]:
                chunk = os.read(self.done, 4096)
                if not chunk:
                    raise EOFError("exited before its turns ended")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def _fail(self, e: BaseException) -> None:
        self.error = str(e) or type(e).__name__
        self._kill()

    def ready(self, timeout: float) -> None:
        try:
            line = self._line(timeout)
            if line != "ready":
                raise ValueError(f"said {line!r} instead of ready")
        except (OSError, TimeoutError, EOFError, ValueError) as e:
            self._fail(e)

    def cpu(self) -> float | None:
        """CPU seconds every thread of the process has run so far (/proc schedstat, nanoseconds); None once
        it is gone."""
        total = 0
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                try:
                    with open(f"/proc/{self.proc.pid}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
                except (OSError, ValueError, IndexError):
                    pass  # a thread that just ended
        except OSError:
            return None
        return total / 1e9

    def settle(self) -> None:
        """Wait (up to SETTLE_MAX_S) until the process is idle."""
        deadline = time.monotonic() + SETTLE_MAX_S
        last = self.cpu()
        while last is not None and time.monotonic() < deadline:
            time.sleep(IDLE_WINDOW_S)
            now = self.cpu()
            if now is None or now - last < IDLE_SHARE * IDLE_WINDOW_S:
                return
            last = now

    def turn(self, timeout: float) -> None:
        try:
            before = self.cpu()
            if before is not None and self._cpu_at_answer is not None:
                self.cpu_out += before - self._cpu_at_answer
            os.write(self.go, b"g")
            line = self._line(timeout)
            after = self.cpu()
            if before is not None and after is not None:
                self.cpu_in += after - before
            self._cpu_at_answer = after
            self.turns.append(None if line == "-" else float(line))
        except (OSError, TimeoutError, EOFError, ValueError) as e:
            self._fail(e)
        else:
            self.settle()

    def values(self) -> list[float]:
        return [v for v in self.turns if v is not None]

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self, timeout: float) -> dict:
        """Ends the turns; the process's own result line (JSON), with the per-turn samples/s and any error."""
        for fd in (self.go, self.done):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            self.proc.wait()
            self.error = self.error or f"did not exit within {timeout:g} s of its turns"
        self.out.seek(0)
        self.err.seek(0)
        out, err = self.out.read().decode(errors="replace"), self.err.read().decode(errors="replace")
        result: dict = {}
        for line in reversed(out.splitlines()):
            if line.startswith(self.prefix) and line[len(self.prefix):].lstrip().startswith("{"):
                result = json.loads(line[len(self.prefix):])
                break
        if self.error is None and "error" in result:
            self.error = str(result["error"])
        last = next((l.strip()[:160] for l in reversed(err.splitlines()) if l.strip()), "")
        if self.error is None and not result:
            self.error = f"exit code {self.proc.returncode}" + (f": {last}" if last else "")
        if self.error is not None and self.proc.returncode:
            rc = self.proc.returncode
            self.error += f" (killed by signal {-rc})" if rc < 0 else f" (exit code {rc})"
        if self.error is not None and last and last not in self.error:
            self.error += f" (stderr: {last})"
        return {**result, "turns": self.turns, "cpu_in_turns_s": round(self.cpu_in, 3),
                "cpu_after_turns_s": round(self.cpu_out, 3), **({"error": self.error} if self.error else {})}


def run_round(sides: dict[str, tuple[list[str], dict[str, str], str]], turns: int, timeout: float,
              start: int = 0) -> dict[str, dict]:
    """Start every side ({name: (command, environment, result-line prefix)}), wait until all are ready, then
    take turns until each live side has `turns` timed repeats (dropped short ones do not count). The sides
    start in their order rotated by `start` (pass the round's index), so over rounds each side is started
    first, second... equally often: the processes of a round build at the same time, and a side always started
    in one place must not carry whatever that place costs (none was found: docs/performance.md)."""
    names = list(sides)
    k = start % len(names) if names else 0
    started = [Side(name, *sides[name]) for name in names[k:] + names[:k]]
    try:
        for s in started:
            s.ready(timeout)
        cap, cycle = 4 * turns + 8 + UNTIMED_TURNS, 0
        while any(s.alive and len(s.values()) < turns for s in started) and cycle < cap:
            # the order rotates: each side follows each other side equally often (a turn right after another
            # process's may meet its pool threads still spinning, or its data in the caches)
            k = cycle % len(started)
            cycle += 1
            for s in started[k:] + started[:k]:
                if s.alive:
                    s.turn(timeout)
        return {s.name: s.finish(timeout) for s in started}
    finally:
        for s in started:
            if s.proc.poll() is None:
                s._kill()
                s.proc.wait()


def median(values: list[float | None]) -> float | None:
    """Median of the values that are there (a dropped turn or a failed round is None)."""
    values = [v for v in values if v]
    return statistics.median(values) if values else None


def paired(a: list[float | None], b: list[float | None]) -> float | None:
    """Median over turns of a / b, each turn's two repeats a fraction of a second apart."""
    return median([x / y for x, y in zip(a, b) if x and y])


def positive(text: str) -> int:
    """argparse type: a whole number >= 1 (0 rounds or turns would time nothing and print an empty verdict)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value
