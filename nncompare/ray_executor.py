"""Cells as Ray tasks, on a local Ray instance or a cluster (`compare.py run --executor ray [--address ...]`).

Each task still runs its cell in a fresh subprocess (runner.run_subprocess: same thread settings, Keras backend
choice, crash isolation, timeout and error rows as the local executor). Tasks ask for CPUs = the cell's thread
count and one GPU for a GPU cell. Timing cells ("measure", "peak") are pinned to nodes by this driver, at most
`concurrency` at once per node, because parallel timing on shared cores corrupts the numbers; check and train
cells are placed by Ray alone and may run side by side (their results are numbers computed, not times).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .runner import Interrupted, Task, UsageError, forwarded_env, run_subprocess

INSTALL = "pip install 'nncompare[ray]'"


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, where Ray itself retries a wrong or dead address for minutes."""
    import socket
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except ValueError:
        raise UsageError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT") from None
    except OSError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}") from None


def ray_cell(task_json: str, timeout: float, verbose: bool, env: dict[str, str]) -> dict:
    """Body of a Ray task. Ray hands a GPU task one card through CUDA_VISIBLE_DEVICES: inside, it is gpu:0."""
    task = Task.from_json(task_json)
    if task.device != "cpu":
        import dataclasses
        task = dataclasses.replace(task, device="gpu:0")
    return run_subprocess(task, timeout, verbose, env)


class RayExecutor:
    name = "ray"

    def __init__(self, timeout: float, verbose: bool = False, address: str | None = None, concurrency: int = 1):
        ray = self.ray = _ray()
        self.timeout, self.verbose, self.concurrency = timeout, verbose, concurrency
        quiet = dict(logging_level=logging.WARNING if verbose else logging.ERROR, log_to_driver=verbose)
        if address and address != "auto":
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
            raise UsageError(f"cannot {'join the Ray cluster at ' + repr(address) if address else 'start Ray'}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        self.started = address is None
        self.remote = ray.remote(max_retries=0)(ray_cell)
        self.nodes = [{"id": n["NodeID"], "host": n.get("NodeManagerHostname", "?"),
                       "cpus": n["Resources"].get("CPU", 0), "gpus": n["Resources"].get("GPU", 0)}
                      for n in ray.nodes() if n.get("Alive")]
        self.inflight: dict = {}

    def devices(self) -> list[str]:
        return ["cpu"] + (["gpu:0"] if any(n["gpus"] for n in self.nodes) else [])

    @staticmethod
    def _fits(node: dict, task: Task) -> bool:
        return node["cpus"] >= task.threads and (task.device == "cpu" or node["gpus"] >= 1)

    def _submit(self, task: Task, node: dict | None):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        options = {"num_cpus": task.threads, "num_gpus": 0 if task.device == "cpu" else 1}
        if node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node["id"], soft=False)
        return self.remote.options(**options).remote(task.to_json(), self.timeout, self.verbose, forwarded_env())

    def _schedule(self, items: list[tuple[Task, dict | None]], done: Callable[[int, dict], None]) -> None:
        """Run (task, pinned node or None); timing tasks go at most `concurrency` at once to a node."""
        queue = list(enumerate(items))
        busy = {n["id"]: 0 for n in self.nodes}
        while queue or self.inflight:
            for entry in list(queue):
                i, (task, node) = entry
                if node is None:
                    candidates = [n for n in self.nodes if self._fits(n, task)]
                    if not candidates:
                        queue.remove(entry)
                        done(i, {"error": f"no Ray node offers {task.threads} CPUs"
                                          + ("" if task.device == "cpu" else " and a GPU")})
                        continue
                    if task.exclusive:
                        free = [n for n in candidates if busy[n["id"]] < self.concurrency]
                        if not free:
                            continue
                        node = min(free, key=lambda n: busy[n["id"]])
                elif busy[node["id"]] >= self.concurrency:
                    continue
                queue.remove(entry)
                if node is not None:
                    busy[node["id"]] += 1
                self.inflight[self._submit(task, node if task.exclusive else None)] = (i, node)
            if not self.inflight:
                continue
            # a short timeout: Python runs signal handlers (Ctrl-C, SIGTERM) only between calls into Ray
            try:
                ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
            except SystemError as e:  # Ray's Cython wraps an exception our SIGTERM handler raised inside it
                if isinstance(e.__cause__ or e.__context__, (Interrupted, KeyboardInterrupt)):
                    raise (e.__cause__ or e.__context__) from None
                raise
            for ref in ready:
                i, node = self.inflight.pop(ref)
                if node is not None:
                    busy[node["id"]] -= 1
                try:
                    result = self.ray.get(ref)
                except Exception as e:  # noqa: BLE001  (a lost node or worker: the cell's error row)
                    text = str(e).strip().splitlines()
                    result = {"error": f"Ray {type(e).__name__}: {text[0] if text else ''}"}
                done(i, result)

    def peaks(self, devices: list[str], threads: int) -> dict[tuple[str, str], float | None]:
        """The GEMM peak of each device on every node that has it, measured there."""
        items = [(Task("peak", device=d, threads=int(min(threads, n["cpus"]))), n)
                 for n in self.nodes for d in devices if d == "cpu" or n["gpus"]]
        out: dict[tuple[str, str], float | None] = {}

        def done(i: int, r: dict) -> None:
            out[(r.get("host", items[i][1]["host"]), items[i][0].device)] = r.get("gemm_gflops")
        self._schedule(items, done)
        return out

    def run(self, tasks: list[Task], done: Callable[[int, dict], None]) -> None:
        self._schedule([(t, None) for t in tasks], done)

    def close(self) -> None:
        """Cancel what still runs (its cell dies with its worker) and stop the Ray instance we started."""
        for ref in list(self.inflight):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001  (already finished or gone)
                pass
        self.inflight.clear()
        if self.ray.is_initialized():
            self.ray.shutdown()
