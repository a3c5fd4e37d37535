"""How the package is put together: no import cycles, no test hook in the production cell, backend lists from the
registry, and result rows that round-trip through their schema."""
import ast
import json
from pathlib import Path

import pytest

from nncompare import cli, rows
from nncompare.backends import BACKENDS, available_backends
from nncompare.cell import Task

from .conftest import ROOT, compare
from .fault_cell import HOOKS

PACKAGES = {"nncompare": ROOT / "nncompare", "nncompare.models": ROOT / "models",
            "nncompare.backends": ROOT / "backends"}


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package (models/ and backends/ import as nncompare.<name>)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            name = ".".join((package, *path.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__")
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, function-level (lazy) imports included; a module's own parent
    packages, which Python imports first anyway, left out."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
                module = ".".join(filter(None, (base, node.module)))
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
                targets = subs if node.module is None and subs else [module, *subs]
            else:
                continue
            found |= {t for t in targets if t in mods and not (name + ".").startswith(t + ".")}
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        path.append(n)
        for m in sorted(graph[n]):
            if m in path:
                return path[path.index(m):] + [m]
            if m not in done and (cycle := visit(m)):
                return cycle
        path.pop()
        done.add(n)
        return None
    for n in sorted(graph):
        if n not in done and (cycle := visit(n)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"nncompare.cli", "nncompare.cell", "nncompare.runner", "nncompare.ray_executor"} <= set(graph)
    assert "nncompare.runner" in graph["nncompare.ray_executor"]  # the graph sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_runner_pieces_import_only_downwards():
    graph = import_graph()
    for low in ("nncompare.errors", "nncompare.files", "nncompare.cell", "nncompare.runner"):
        assert not graph[low] & {"nncompare.cli", "nncompare.executors", "nncompare.ray_executor"}, low


def test_no_production_module_reads_a_test_hook():
    for name, path in modules().items():
        text = path.read_text()
        assert not [h for h in HOOKS if h in text], f"{name} reads a test hook"


def test_the_production_cell_runs_as_its_own_module(monkeypatch):
    from nncompare import runner
    from nncompare.cell import cell_command
    assert cell_command([Task("peak")])[1:3] == ["-m", "nncompare.cell"]
    monkeypatch.delenv(runner.CELL_MODULE_VARIABLE)
    result = runner.run_subprocess(Task("peak", threads=1), timeout=120)
    assert "error" not in result and result["gemm_gflops"] > 0, result


def test_command_line_backend_lists_come_from_the_registry():
    installed = {n for n, i in available_backends().items() if i["installed"]}
    references = [b.name for b in BACKENDS.values() if b.reference]
    assert cli.default_backends() == [b.name for b in BACKENDS.values()
                                      if not b.reference and b.name in installed] + references
    assert cli.default_backends(training=True) == [b.name for b in BACKENDS.values()
                                                   if b.trains and not b.reference and b.name in installed] + references
    assert "onnxruntime" not in cli.default_backends(training=True)
    assert cli.check_backends() == [b.name for b in BACKENDS.values() if not b.reference and b.name in installed]
    assert not hasattr(cli, "FRAMEWORKS")


RUN_ROW = {"model": "mlp", "backend": "torch", "device": "cpu", "batch_size": 64, "threads": 2, "optimizer": "sgd",
           "lr": 0.01, "steps": 2, "repeats": 1, "warmup": 0, "compile": False, "model_params": 3, "model_flops": 9,
           "spec_file": "m.json", "executor": "local", "host": "vm", "cpu_name": "Some CPU", "cell_start": 1.5,
           "cell_end": 2.5, "version": "torch 2.0", "device_name": "Some CPU", "path": "eager", "import_s": 1.0,
           "build_s": 0.5, "first_step_s": 0.01, "train_samples_s": 7000.0, "train_spread": 0.1,
           "train_runs": [7000.0], "train_repeats": 3, "train_steps": 8, "train_noisy": False,
           "train_page_faults_per_step": 0.0, "infer_samples_s": 8e5, "infer_spread": 0.3, "infer_repeats": 7,
           "infer_steps": 100, "infer_noisy": False, "noisy": False, "data": "resident", "settings": {"threads": 2},
           "train_gflops": 0.1, "host_rss_mb": 300.0, "device_mem_mb": None, "loss": 0.66, "loss_after_steps": 1,
           "cell_in_process": 0, "gemm_peak_gflops": 60.0, "peak_pct": 0.2, "cell": "5cb758d55451e7cfd8c6",
           "vs_baseline": 1.0}


def test_a_row_round_trips_through_its_schema_in_order():
    row = rows.Row.from_dict(RUN_ROW)
    assert row.train_samples_s == 7000.0 and row.extra == {}
    assert list(row.to_dict().items()) == list(RUN_ROW.items())
    newer = {**RUN_ROW, "some_new_field": [1]}  # a field a later cell adds is kept, not dropped
    assert rows.Row.from_dict(newer).to_dict() == newer
    error = {k: RUN_ROW[k] for k in ("model", "backend", "device", "batch_size", "threads")} | {"error": "boom"}
    assert rows.Row.from_dict(error).to_dict() == error
    with pytest.raises(ValueError, match="field 'threads': expected a whole number >= 1, got 0"):
        rows.Row.from_dict({**RUN_ROW, "threads": 0})
    train = {"model": "m", "backend": "numpy", "device": "cpu", "epochs": 1, "train_loss": [0.5], "test_loss": [0.4],
             "test_accuracy": [0.9], "epoch_s": [1.0], "train_s": 1.0, "final_accuracy": 0.9}
    assert rows.TrainRow.from_dict(train).to_dict() == train
    assert rows.TrainRow.problem({**train, "epoch_s": []}) == "its per-epoch lists are empty or of different lengths"


def test_a_row_is_built_from_its_task_and_the_cells_result():
    task = Task("measure", threads=2, backend="torch", model_name="mlp", batch_size=64,
                optimizer={"type": "sgd", "args": {"lr": 0.01, "momentum": 0.0}}, steps=2, repeats=1, warmup=0)
    result = {k: RUN_ROW[k] for k in list(RUN_ROW)[15:list(RUN_ROW).index("cell_in_process") + 1]}
    row = rows.Row.measured(task, {**result, "bad_input": "x"}, 3, 9, "m.json", "local", {("vm", "cpu"): 60.0})
    expected = {k: v for k, v in RUN_ROW.items() if k not in ("cell", "vs_baseline")}
    expected = {**dict(list(expected.items())[:11]), "sections": ["train", "infer", "latency"],
                **dict(list(expected.items())[11:])}  # what the cell timed follows its settings
    assert list(row.to_dict()) == list(expected) and row.to_dict() == {**expected, "peak_pct": 100 * 0.1 / 60.0}


@pytest.mark.slow
def test_results_files_carry_their_schema_and_files_without_one_still_read(tmp_path):
    path = tmp_path / "r.json"
    out = compare("run", "--models", "perceptron", "--steps", "1", "--repeats", "1", "--warmup", "0", "--quiet",
                  "--backends", "numpy", "--threads", "1", "--json", str(path), timeout=120)
    assert out.returncode == 0, out.stderr
    payload = json.loads(path.read_text())
    assert payload["schema"] == rows.SCHEMA_VERSION == 2
    for schema in (None, 1, 2):  # written before results files had a schema, by version 1, and now
        old = {k: v for k, v in payload.items() if k != "schema"} | ({"schema": schema} if schema else {})
        path.write_text(json.dumps(old))
        out = compare("report", str(path), timeout=120)
        assert out.returncode == 0 and "perceptron" in out.stdout, out.stderr
    path.write_text(json.dumps({**payload, "schema": rows.SCHEMA_VERSION + 1}))
    out = compare("report", str(path), timeout=120)
    assert out.returncode == 2 and "is not one this nncompare reads" in out.stderr, out.stderr
