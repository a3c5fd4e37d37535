"""Cells as Ray tasks, on a local Ray instance or a cluster (`compare.py run --executor ray [--address ...]`).

Each task still runs its cell in a fresh subprocess (runner.run_subprocess: same thread settings, Keras backend
choice, crash isolation, timeout and error rows as the local executor). Tasks ask for CPUs = the cell's thread
count and one GPU for a GPU cell. Timing cells ("measure", "peak") are pinned to live nodes by this driver, at
most `concurrency` at once per node, because parallel timing on shared cores corrupts the numbers; the cells one
ratio compares (one model, device, batch and settings) run on one node. Check and train cells are placed by Ray
alone and may run side by side (their results are numbers computed, not times). The node view is refreshed
every few seconds and whenever a task fails: a cell lost with its node (or its Ray worker) runs once more on
another node.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable

from .cell import Task, forwarded_env
from .errors import Interrupted, UsageError
from .runner import run_subprocess

INSTALL = "pip install 'nncompare[ray]'"
REFRESH_S = 2.0  # how often the driver re-reads the node list
PROBE_S = 5.0  # how long a connection check may wait for an answer
SWEEP_VARIABLE = "NNCOMPARE_RAY_SWEEP"  # marks every cell process of one driver, so close() can find and kill them


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


class HeadLost(Interrupted):
    """The cluster's head node (its GCS) is gone: the sweep stops, its finished cells are written, exit 1."""

    def __init__(self, why: str):
        Exception.__init__(self, why)
        self.code = 1


# --- connecting ------------------------------------------------------------------------------------
def _split(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise UsageError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), number


def _auth_metadata() -> tuple:
    """The token header Ray itself would send (RAY_AUTH_MODE=token), else nothing."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:
        return ()
    try:
        loader = AuthenticationTokenLoader.instance()
        return tuple(loader.get_token_for_http_header().items()) if loader.has_token() else ()
    except Exception as e:  # noqa: BLE001  (RAY_AUTH_MODE=token without a token: Ray's AuthenticationError)
        raise UsageError(f"RAY_AUTH_MODE=token is set but {str(e).split('. ')[0].split(' but ')[-1]}: set "
                         "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or write the token to ~/.ray/auth_token") from None


def check_address(address: str, timeout: float = PROBE_S) -> None:
    """Fail in seconds, with one line, where Ray itself retries for minutes: nothing listening, not a Ray
    endpoint (or the wrong one of Ray's two ports), or a cluster that wants a token the driver does not send."""
    host, port = _split(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}") from None
    import grpc
    client = address.startswith("ray://")
    # One empty unary call: a GCS answers GetClusterId, a Ray Client server knows ClusterInfo; anything that is
    # not gRPC fails the HTTP/2 handshake at once.
    method = "/ray.rpc.RayletDriver/ClusterInfo" if client else "/ray.rpc.NodeInfoGcsService/GetClusterId"
    metadata = _auth_metadata()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            channel.unary_unary(method)(b"", timeout=timeout, metadata=metadata)
            return
        except grpc.RpcError as e:
            code, details = e.code(), (e.details() or "").strip()
    other = "/ray.rpc.NodeInfoGcsService/GetClusterId" if client else "/ray.rpc.RayletDriver/ClusterInfo"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if metadata:
            raise UsageError(f"the Ray cluster at {address!r} refused this driver's token (RAY_AUTH_TOKEN, "
                             "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): use the token the cluster was started with")
        raise UsageError(f"the Ray cluster at {address!r} requires token authentication: run with "
                         "RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN)")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            try:
                channel.unary_unary(other)(b"", timeout=timeout, metadata=metadata)
                other_code = None
            except grpc.RpcError as e:
                other_code = e.code()
        if other_code not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE,
                              grpc.StatusCode.DEADLINE_EXCEEDED):
            raise UsageError(
                f"--address {address!r} is a Ray Client port: write it as ray://{host}:{port}" if not client else
                f"--address {address!r} is a Ray cluster's main (GCS) port, not its Ray Client port: write it "
                f"without ray:// ({host}:{port}), or give the client port (10001 by default)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise UsageError(f"the endpoint at {address!r} did not answer within {timeout:g} s: not a Ray cluster?")
    if code == grpc.StatusCode.UNAVAILABLE:
        details = "something else listens there (it does not speak gRPC)"
    raise UsageError(f"{address!r} is not a Ray {'Client' if client else 'cluster (GCS)'} endpoint: "
                     f"{details.splitlines()[0][:160] if details else code.name}")


def _resolve(address: str) -> str:
    """`auto` as the address of the cluster running on this machine."""
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
        found = canonicalize_bootstrap_address("auto")
    except Exception:  # noqa: BLE001  (Ray raises ConnectionError when it finds none)
        found = None
    if not found:
        raise UsageError("--address auto: no Ray cluster is running on this machine (start one with `ray start "
                         "--head`, or give its HOST:PORT)")
    return found


def _quiet_ray(ray, verbose: bool) -> None:
    """Ray prints what the cluster reports (a dead raylet's last 40 log lines...) on the driver's stdout, ahead of
    the table: send it to stderr with --verbose, else drop it (the cells' error rows say what happened)."""
    import ray._private.worker as worker
    original = worker.print_to_stdstream

    def to_stderr(data, ignore_prefix: bool):
        if verbose:
            original({**data, "is_err": True}, ignore_prefix)
    worker.print_to_stdstream = to_stderr


# --- the task --------------------------------------------------------------------------------------
def ray_cell(task_json: str, timeout: float, verbose: bool, env: dict[str, str], weights: bytes | None = None) -> dict:
    """Body of a Ray task. Ray hands a GPU task one card through CUDA_VISIBLE_DEVICES: inside, it is gpu:0.
    `weights`: the bytes of the task's weights file (a node shares no file system with the driver), written to a
    temporary file here for the cell."""
    import dataclasses
    import ray
    task = Task.from_json(task_json)
    if task.device != "cpu":
        task = dataclasses.replace(task, device="gpu:0")
    folder = None
    try:
        if weights is not None:
            import tempfile
            folder = tempfile.mkdtemp(prefix="nncompare-weights-")
            with open(os.path.join(folder, "weights.npz"), "wb") as f:
                f.write(weights)
            task = dataclasses.replace(task, weights=os.path.join(folder, "weights.npz"))
        result = run_subprocess(task, timeout, verbose, env)
    finally:
        if folder is not None:
            import shutil
            shutil.rmtree(folder, ignore_errors=True)
    context = ray.get_runtime_context()
    return {**result, "node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def kill_cells(marker: str) -> int:
    """Body of a Ray task: SIGKILL the process group of every cell process of one driver on this node."""
    import signal
    killed = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if f"{SWEEP_VARIABLE}={marker}".encode() not in f.read().split(b"\0"):
                    continue
            os.killpg(os.getpgid(int(name)), signal.SIGKILL)
            killed += 1
        except OSError:  # gone meanwhile, or another user's
            continue
    return killed


def _short(node_id: str) -> str:
    return node_id[:8]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _group(task: Task) -> str:
    """The cells one ratio (or compiled-vs-eager note) compares: everything but the framework and compile."""
    import dataclasses
    import json
    fields = dataclasses.asdict(task)
    for k in ("backend", "compile", "spec"):
        fields.pop(k)
    return json.dumps(fields, sort_keys=True)


class Peaks(dict):
    """{(Ray node id, device): its GEMM peak}; a (hostname, device) key finds the node only one node has that name."""

    def __init__(self, nodes: dict[str, dict]):
        super().__init__()
        self.nodes = nodes

    def get(self, key, default=None):
        if key in self:
            return self[key]
        host, device = key
        ids = [i for i, n in self.nodes.items() if n.get("host") == host]
        return self[(ids[0], device)] if len(ids) == 1 and (ids[0], device) in self else default


class RayExecutor:
    name = "ray"

    def __init__(self, timeout: float, verbose: bool = False, address: str | None = None, concurrency: int = 1):
        ray = self.ray = _ray()
        self.timeout, self.verbose, self.concurrency = timeout, verbose, concurrency
        self.client = bool(address and address.startswith("ray://"))
        self.gcs: str | None = None
        if address is not None:
            address = _resolve(address)
            check_address(address)
            if not self.client:
                self.gcs = address
        quiet = dict(logging_level=logging.WARNING if verbose else logging.ERROR, log_to_driver=verbose)
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
        except Exception as e:  # noqa: BLE001  (Ray raises many kinds: one line, whichever)
            raise UsageError(f"cannot {'join the Ray cluster at ' + repr(address) if address else 'start Ray'}: "
                             f"{_first_line(e) or type(e).__name__}") from None
        _quiet_ray(ray, verbose)
        if not self.client and self.gcs is None:
            self.gcs = ray.get_runtime_context().gcs_address
        self.started, self.head_lost = address is None, False
        self.marker = uuid.uuid4().hex
        self.remote = ray.remote(max_retries=0)(ray_cell)
        self.nodes: dict[str, dict] = {}
        self.inflight: dict = {}  # ref -> (entry, node id or None)
        self.weights: dict = {}  # a task's weights file -> its bytes' ref in the object store
        self.refreshed = 0.0
        self.peak_values = Peaks(self.nodes)
        self.peak_threads: int | None = None  # set by peaks(): timing cells then need their node's peak
        self.refresh()

    # --- the node view -----------------------------------------------------------------------------
    def _gcs_alive(self) -> bool:
        if not self.gcs:
            return True
        host, _, port = self.gcs.rpartition(":")
        for _ in range(3):
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.5)
        return False

    def _head_lost(self, why: str = "") -> HeadLost:
        message = f"lost the Ray cluster's head node{f' ({why})' if why else ''}: stopping the sweep"
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.head_lost = True
        return HeadLost(message)

    def refresh(self) -> None:
        """Re-read which nodes are alive and what they offer; a node that joined is used from now on."""
        if not self._gcs_alive():
            raise self._head_lost(f"its GCS at {self.gcs} does not answer")
        try:
            listing = self.ray.nodes()
        except Exception as e:  # noqa: BLE001
            if not self._gcs_alive() or isinstance(e, ConnectionError):
                raise self._head_lost(_first_line(e)) from None
            raise
        for n in listing:
            resources = n.get("Resources") or {}
            node = self.nodes.setdefault(n["NodeID"], {"id": n["NodeID"], "busy": 0})
            node.update(ip=n.get("NodeManagerAddress", "?"), host=n.get("NodeManagerHostname", "?"),
                        cpus=int(resources.get("CPU", 0)), gpus=int(resources.get("GPU", 0)),
                        alive=bool(n.get("Alive")) and not node.get("lost"))
        self.refreshed = time.monotonic()

    def live(self) -> list[dict]:
        return [n for n in self.nodes.values() if n["alive"]]

    def devices(self) -> list[str]:
        return ["cpu"] + (["gpu:0"] if any(n["gpus"] and n["cpus"] for n in self.live()) else [])

    def default_threads(self, devices: list[str] | None = None) -> int:
        """The CPUs of the smallest live node that runs a cell of `devices`: every cell then fits a node."""
        counts = [n["cpus"] for n in self.live() if n["cpus"] >= 1
                  and any(d == "cpu" or n["gpus"] for d in devices or ["cpu"])]
        return min(counts) if counts else 1

    @staticmethod
    def _fits(node: dict, task: Task) -> bool:
        return node["alive"] and node["cpus"] >= task.threads and (task.device == "cpu" or node["gpus"] >= 1)

    # --- scheduling --------------------------------------------------------------------------------
    def _submit(self, task: Task, node: dict | None):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        options = {"num_cpus": task.threads, "num_gpus": 0 if task.device == "cpu" else 1}
        if node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node["id"], soft=False)
        env = {**forwarded_env(), SWEEP_VARIABLE: self.marker}
        weights = None
        if task.weights is not None:  # the file's bytes, put in Ray's object store once
            weights = self.weights.get(task.weights)
            if weights is None:
                with open(task.weights, "rb") as f:
                    weights = self.weights[task.weights] = self.ray.put(f.read())
        return self.remote.options(**options).remote(task.to_json(), self.timeout, self.verbose, env, weights)

    def _place(self, entry: dict, groups: dict[str, str]):
        """The node for `entry` (None: Ray places it), False to wait for one, or an error text."""
        task = entry["task"]
        if entry["pin"] is not None:
            node = self.nodes.get(entry["pin"])
            if node is None or not node["alive"]:
                return f"Ray node {_short(entry['pin'])} was lost"
            return node if node["busy"] < self.concurrency else False
        fits = [n for n in self.live() if self._fits(n, task)]
        if not fits:
            return (f"no live Ray node offers {task.threads} CPU{'s' * (task.threads != 1)}"
                    + ("" if task.device == "cpu" else " and a GPU"))
        others = [n for n in fits if n["id"] not in entry["avoid"]]  # a retry goes to another node
        if others:
            fits = others
        elif entry["note"]:
            entry["note"] = entry["note"].replace("on another node", "on the same node (no other one fits)")
        if not task.exclusive:
            return min(fits, key=lambda n: n["busy"]) if entry["avoid"] else None
        group = _group(task)
        node = self.nodes.get(groups.get(group, ""))
        if node is not None and node["id"] in {n["id"] for n in fits}:
            return node if node["busy"] < self.concurrency else False
        free = [n for n in fits if n["busy"] < self.concurrency]
        if not free:
            return False
        node = min(free, key=lambda n: (n["busy"], sum(g == n["id"] for g in groups.values())))
        groups[group] = node["id"]
        return node

    def _lost(self, node_id: str | None, error: BaseException) -> bool:
        """Whether a task that failed inside Ray was lost with its node or worker (it may run once more)."""
        from ray.exceptions import NodeDiedError, TaskUnschedulableError, WorkerCrashedError
        node = self.nodes.get(node_id or "")
        gone = isinstance(error, (NodeDiedError, TaskUnschedulableError))
        if gone and node is not None:
            node["lost"], node["alive"] = True, False  # the GCS notices a dead raylet only seconds later
        self.refresh()
        return gone or isinstance(error, WorkerCrashedError) or node is not None and not node["alive"]

    @staticmethod
    def _entry(task: Task, pin: str | None, done: Callable[[dict], None]) -> dict:
        return {"task": task, "pin": pin, "tries": 0, "note": None, "avoid": set(), "done": done}

    def _peak_entry(self, node: dict, device: str) -> dict:
        key = (node["id"], device)
        self.peak_values[key] = None
        return self._entry(Task("peak", device=device, threads=min(self.peak_threads, node["cpus"])), node["id"],
                           lambda r: self.peak_values.__setitem__(key, r.get("peak")))

    def _schedule(self, pending: list[dict]) -> None:
        """Run the entries (task, pinned node id or None, callback); see the module's docstring for where each
        goes. A timing cell bound for a node that joined after the peaks were measured waits for its peak."""
        groups: dict[str, str] = {}
        while pending or self.inflight:
            if time.monotonic() - self.refreshed > REFRESH_S:
                self.refresh()
            for entry in list(pending):
                node = self._place(entry, groups)
                if node is False:
                    continue
                if isinstance(node, str):
                    pending.remove(entry)
                    entry["done"]({"error": node + (f" ({entry['note']})" if entry["note"] else "")})
                    continue
                task = entry["task"]
                if (node is not None and task.kind == "measure" and self.peak_threads
                        and (node["id"], task.device) not in self.peak_values):
                    entry = self._peak_entry(node, task.device)  # the cell itself stays queued
                else:
                    pending.remove(entry)
                if node is not None:
                    node["busy"] += 1
                entry["tries"] += 1
                self.inflight[self._submit(entry["task"], node)] = (entry, node["id"] if node else None)
            if not self.inflight:
                if pending:
                    time.sleep(0.2)
                continue
            # a short timeout: Python runs signal handlers (Ctrl-C, SIGTERM) only between calls into Ray
            try:
                ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
            except SystemError as e:  # Ray's Cython wraps an exception our SIGTERM handler raised inside it
                if isinstance(e.__cause__ or e.__context__, (Interrupted, KeyboardInterrupt)):
                    raise (e.__cause__ or e.__context__) from None
                raise
            for ref in ready:
                entry, node_id = self.inflight.pop(ref)
                if node_id is not None and node_id in self.nodes:
                    self.nodes[node_id]["busy"] -= 1
                try:
                    result = self.ray.get(ref)
                except Exception as e:  # noqa: BLE001  (a lost node or worker: the cell's error row)
                    from ray.exceptions import TaskUnschedulableError
                    where = node_id or getattr(e, "node_id", None)
                    lost, name = self._lost(where, e), type(e).__name__
                    if isinstance(e, TaskUnschedulableError):
                        entry["tries"] -= 1  # its node was gone before it started: not a try
                    if lost and entry["tries"] < 2 and entry["pin"] is None:
                        node_name = f"Ray node {_short(where)}" if where else "its Ray node"
                        if where:
                            entry["avoid"].add(where)  # a worker's crash may be its node's fault
                        entry["note"] = (f"moved: {node_name} was lost before it started" if entry["tries"] == 0
                                         else f"retried on another node: its first run was lost with {node_name} "
                                              f"({name})")
                        for group, nid in list(groups.items()):
                            if nid == where:
                                del groups[group]  # the rest of its group moves with it
                        pending.insert(0, entry)
                        continue
                    result = {"error": f"Ray {name}: {_first_line(e)}" + (f" ({entry['note']})" if entry["note"]
                                                                         else "")}
                if entry["note"] and "error" not in result:
                    result["ray_node_note"] = entry["note"]
                entry["done"](result)

    def peaks(self, devices: list[str], threads: int) -> dict[tuple[str, str], dict | None]:
        """{(node id, device): its GEMM peak (backends.bench.gemm_peak)} of every live node with a CPU (and a GPU,
        for the GPU's), measured there at min(`threads`, its CPUs); a node that joins later is measured before its
        first timing cell."""
        self.peak_threads = threads
        self._schedule([self._peak_entry(n, d) for n in self.live() if n["cpus"] >= 1
                        for d in devices if d == "cpu" or n["gpus"]])
        return self.peak_values

    def run(self, tasks: list[Task], done: Callable[[int, dict], None]) -> None:
        self._schedule([self._entry(t, None, lambda r, i=i: done(i, r)) for i, t in enumerate(tasks)])

    # --- the end -----------------------------------------------------------------------------------
    def _kill_cells(self) -> None:
        """Kill this driver's cell processes on every live node. Not ray.cancel(force=True): killing the worker
        under a running task can abort the driver inside Ray's task manager."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        killer = self.ray.remote(num_cpus=0, max_retries=0)(kill_cells)
        refs = []
        for node in self.live():
            try:
                refs.append(killer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    node["id"], soft=False)).remote(self.marker))
            except Exception:  # noqa: BLE001
                continue
        if refs:
            try:
                self.ray.wait(refs, num_returns=len(refs), timeout=15)
            except Exception:  # noqa: BLE001  (a node died meanwhile)
                pass

    def close(self) -> None:
        """End what still runs (its cells killed, queued tasks cancelled) and stop the Ray instance we started."""
        if not self.ray.is_initialized():
            return
        if self.head_lost:
            self.inflight.clear()
            return  # Ray's shutdown would wait on the dead GCS; the process exits soon anyway
        if self.inflight:
            self._kill_cells()
            for ref in list(self.inflight):
                try:
                    self.ray.cancel(ref, force=False)  # only queued tasks are still waiting for this
                except Exception:  # noqa: BLE001  (already finished or gone)
                    pass
            try:
                self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=10)
            except Exception:  # noqa: BLE001
                pass
            self.inflight.clear()
        self.ray.shutdown()
