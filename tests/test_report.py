"""compare.py report: results of several machines in one table, ratios only within a machine, device and settings,
rows of different settings kept apart with the difference shown."""
import json

import pytest

from nncompare import report

from .conftest import compare


def row(backend, sps, device="cpu", threads=4, **extra):
    return {"model": "mlp", "backend": backend, "device": device, "batch_size": 64, "threads": threads,
            "optimizer": "sgd", "lr": 0.01, "steps": 10, "repeats": 3, "warmup": 2, "compile": False,
            "version": f"{backend} 1.0", "path": "eager", "train_samples_s": sps, "train_spread": 0.01,
            "infer_samples_s": 2 * sps, "loss": 0.5, "cpu_name": "Some CPU",
            "device_name": "Some GPU" if device != "cpu" else "Some CPU", **extra}


def save(path, host, rows, **extra):
    path.write_text(json.dumps({"host": host, "host_cpu": "Some CPU", "rows": rows, **extra}))
    return str(path)


def cli(*args):
    return compare(*args, timeout=120)


def test_report_merges_machines_and_never_mixes_settings(tmp_path):
    a = save(tmp_path / "laptop.json", "laptop", [
        row("torch", 1000.0), row("keras", 500.0), row("torch", 4000.0, threads=8), row("keras", 1000.0, threads=8),
        {**row("mxnet", 0.0), "error": "timed out after 600 s"}])
    b = save(tmp_path / "workstation.json", "workstation", [
        row("torch", 50000.0, device="gpu:0"), row("keras", 25000.0, device="gpu:0"), row("keras", 9000.0)],
        partial=True, cells=4)
    out = cli("report", a, b, "--plot", str(tmp_path / "merged.png"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n\n")[0].splitlines()  # the training table
    assert lines[0].split()[0] == "Machine" and "Threads" in lines[0]  # the differing setting is a column

    def line(host, backend, device, threads):
        (hit,) = [l for l in lines if l.startswith(host + " ") and f" {backend} 1.0 " in l and f" {device}" in l
                  and l.rstrip().endswith(f" {threads}")]
        return hit.split()
    assert line("laptop", "keras", "cpu", 4)[-2] == "0.50"       # against torch with 4 threads, not 8
    assert line("laptop", "keras", "cpu", 8)[-2] == "0.25"
    assert line("workstation", "keras", "gpu:0", 4)[-2] == "0.50"  # within the GPU
    assert line("workstation", "keras", "cpu", 4)[-2] == "-"       # no torch CPU row on that machine
    assert "ERROR: timed out" in out.stdout
    assert "workstation.json is partial: 3 of 4 cells" in out.stdout
    assert (tmp_path / "merged.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = cli("report", a, b, "--markdown")
    assert md.returncode == 0 and md.stdout.splitlines()[0].startswith("| Machine")


@pytest.mark.slow
def test_report_of_real_runs_from_two_machines(tmp_path):
    path = tmp_path / "here.json"
    out = cli("run", "--models", "perceptron", "--backends", "numpy", "--steps", "1", "--repeats", "1",
              "--warmup", "0", "--threads", "1", "--quiet", "--json", str(path))
    assert out.returncode == 0, out.stderr
    payload = json.loads(path.read_text())
    for r in payload["rows"]:
        r["host"] = "elsewhere"
    other = tmp_path / "there.json"
    other.write_text(json.dumps({**payload, "host": "elsewhere"}))
    out = cli("report", str(path), str(other), "--baseline", "numpy")
    assert out.returncode == 0, out.stderr
    rows = [l for l in out.stdout.split("\n\n")[0].splitlines() if "perceptron" in l]  # the training table
    assert len(rows) == 2 and rows[1].startswith("elsewhere") and not rows[0].startswith("elsewhere")
    assert all(l.split()[-1] == "1.00" for l in rows)  # each machine's numpy row is its own baseline


def test_report_refuses_what_is_not_a_results_file(tmp_path):
    bad = tmp_path / "spec.json"
    bad.write_text(json.dumps({"name": "m", "layers": []}))
    out = cli("report", str(bad))
    assert out.returncode == 2 and "is not a results file of `compare.py run --json`" in out.stderr
    out = cli("report", str(tmp_path / "missing.json"))
    assert out.returncode == 2 and "cannot read" in out.stderr and "Traceback" not in out.stderr
    good = save(tmp_path / "r.json", "h", [row("torch", 1.0)])
    out = cli("report", good, "--plot", good)
    assert out.returncode == 2 and "it is also the input" in out.stderr


def test_group_key_separates_settings_and_machines():
    base = row("torch", 1.0, host="a")
    assert report.group_key(base) == report.group_key(row("keras", 2.0, host="a"))
    for change in ({"host": "b"}, {"threads": 8}, {"batch_size": 32}, {"compile": True}, {"steps": 20}):
        assert report.group_key({**base, **change}) != report.group_key(base)


@pytest.mark.slow
def test_report_names_the_row_and_field_of_a_wrong_type(tmp_path):
    """A hand-edited results file: one error naming the file, row and field, never a traceback from a format()."""
    cases = [({"batch_size": "64"}, "row 1", "'batch_size'", "a whole number >= 1"),
             ({"train_samples_s": "fast"}, "row 1", "'train_samples_s'", "a number"),
             ({"loss": [1]}, "row 1", "'loss'", "a number or null"),
             ({"threads": True}, "row 1", "'threads'", "a whole number >= 1"),
             ({"compile": "no"}, "row 1", "'compile'", "true or false"),
             ({"error": None}, "row 1", "'error'", "a string"),
             ({"model": 7}, "row 1", "'model'", "a string"),
             ({"batch_size": float("inf")}, "row 1", "'batch_size'", "a whole number >= 1"),
             ({"steps": float("nan")}, "row 1", "'steps'", "a whole number >= 0 or null"),
             ({"train_samples_s": float("-inf")}, "row 1", "'train_samples_s'", "a number"),
             ({"loss": float("nan")}, "row 1", "'loss'", "a number or null")]
    for change, *expected in cases:
        # json.dumps writes NaN / Infinity, which Python's json reads back as floats: a hand edit can do the same
        path = save(tmp_path / "r.json", "h", [row("torch", 1.0), {**row("keras", 2.0), **change}])
        out = cli("report", path)
        assert out.returncode == 2, (change, out.stdout)
        assert all(e in out.stderr for e in expected) and "Traceback" not in out.stderr, (change, out.stderr)
    ok = save(tmp_path / "r.json", "h", [row("torch", 1.0), {**row("keras", 2.0), "loss": None, "extra": "kept"}])
    out = cli("report", ok)
    assert out.returncode == 0, out.stderr


def test_check_table_names_a_difference_within_the_oracles_kink_jitter_and_still_flags_one_beyond_it():
    def check_row(backend, grads, jitter, ok):
        return {"backend": backend, "diffs": {"logits": 1e-7, "loss": 1e-8, "grads": grads}, "tolerance": 1e-4,
                "where": {"grads": "s2b2_conv2/kernel"}, "jitter": {"grads": jitter}, "ok": ok}
    table = report.render_check([check_row("mxnet", 5.1e-3, 1.3e-2, True), check_row("torch", 5.1e-3, 1e-3, False),
                                 check_row("keras", 5.1e-3, None, False)])  # an infinite jitter travels as null
    mxnet, torch, keras = (l for l in table.splitlines() if l.startswith(("mxnet", "torch", "keras")))
    assert "ok; grads 5.1e-03 within the oracle's own 1.3e-02 under 1e-6 input noise (a ReLU kink)" in mxnet
    for line in (torch, keras):
        assert "DIFFERS: grads (first at s2b2_conv2/kernel)" in line and "within" not in line


def test_tables_say_where_a_cell_ran_fewer_operator_threads_than_asked_for():
    """MXNet's cell keeps the operator thread count it measured fastest: a row that used fewer than its
    `threads` says so in the run table's path and in the thread-scaling table."""
    rows = [row("mxnet", 900.0, threads=1, settings={"operator_threads": 1}),
            row("mxnet", 1000.0, threads=2, settings={"operator_threads": 1}),
            row("mxnet", 1500.0, threads=4, settings={"operator_threads": 4}),
            row("torch", 800.0, threads=2)]
    table = report.render_table(rows, "torch").splitlines()
    assert [l for l in table if "1 of 2 threads" in l] == [l for l in table if " 1,000 " in l]
    assert sum("threads" in l for l in table[2:]) == 1  # the others ran what they were asked for
    scaling = report.render_scaling(rows)
    (mx,) = [l for l in scaling.splitlines() if " mxnet " in l]
    assert "1,000 (x1.11) [1 of 2 threads]" in mx and "1,500 (x1.67)" in mx and "[4 of" not in mx


def test_report_escapes_what_a_results_file_would_print_to_the_terminal(tmp_path):
    path = save(tmp_path / "r.json", "evil\x1b]0;title\x07host", [
        row("torch", 1000.0), {**row("keras", 500.0), "model": "mlp\x1b[2J"},
        {**row("mxnet", 700.0), "model": "mlp\n| forged | row |", "path": "a|b\u202egnp.exe"},
        {**row("numpy", 100.0), "error": "boom\r\x1b[31mred"}])
    out = cli("report", path)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\r" not in out.stdout
    assert "\u202e" not in out.stdout and "\\u202e" in out.stdout
    assert "mlp\\x1b[2J" in out.stdout and "mlp\\n| forged | row |" in out.stdout
    assert "evil\\x1b]0;title\\x07host" in out.stdout and "boom\\r\\x1b[31mred" in out.stdout
    table = out.stdout.split("\n\n")[0].splitlines()
    assert len(table) == 2 + 4  # headers, rule, one line per row: no forged line
    md = cli("report", path, "--markdown")
    lines = md.stdout.split("\n\n")[0].splitlines()
    assert md.returncode == 0 and len(lines) == 6
    assert len({l.replace("\\|", "").count("|") for l in lines}) == 1  # every line has the same cells
    assert "a\\|b" in md.stdout


def test_report_reads_a_bom_and_refuses_hostile_files_in_one_line(tmp_path):
    import os
    good = json.dumps({"host": "h", "rows": [row("torch", 1.0)]})
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + good.encode())
    out = cli("report", str(bom))
    assert out.returncode == 0 and "mlp" in out.stdout, out.stderr
    deep = tmp_path / "deep.json"
    deep.write_text('{"rows": ' + "[" * 100_000 + "]" * 100_000 + "}")
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"host": "h", "rows": [row("torch", 1.0)]}).replace("1.0", "1" + "0" * 400))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for path, message in ((deep, "is not JSON: nested too deeply"), (huge, "is not JSON: an integer of 401 digits"),
                          (fifo, "is not a regular file"), ("/dev/zero", "is not a regular file"),
                          (tmp_path, "is not a regular file")):
        out = compare("report", str(path), timeout=30)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (path, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1


def test_a_large_integer_that_fits_the_reader_is_still_checked(tmp_path):
    path = save(tmp_path / "r.json", "h", [{**row("torch", 1.0), "train_samples_s": 10 ** 19}])
    out = cli("report", path)
    assert out.returncode == 2 and "'train_samples_s': expected a number >= 0" in out.stderr, out.stderr
    path = save(tmp_path / "r.json", "h", [{**row("torch", 1.0), "infer_samples_s": -3.0}])
    out = cli("report", path)
    assert out.returncode == 2 and "'infer_samples_s'" in out.stderr and "Traceback" not in out.stderr


def test_chart_labels_from_results_files_are_plain_text(tmp_path):
    path = save(tmp_path / "r.json", "h", [row("torch", 1000.0), {**row("keras", 500.0), "model": "$\\frac{1$"}])
    out = cli("report", path, "--plot", str(tmp_path / "c.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_a_results_file_without_rows_says_so(tmp_path):
    out = cli("report", save(tmp_path / "r.json", "h", []))
    assert out.returncode == 0 and out.stdout.startswith("no rows in ") and "Ratios" not in out.stdout


def test_a_row_with_a_key_written_twice_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"host": "h", "rows": [{"model": "mlp", "backend": "torch", "device": "cpu", "batch_size": 64, '
                    '"threads": 1, "train_samples_s": 1.0, "train_samples_s": 1e9}]}')
    out = cli("report", str(path))
    assert out.returncode == 2 and "duplicate key 'train_samples_s' in one object" in out.stderr, out.stderr


def test_report_reads_inference_latency_and_the_peak_back(tmp_path):
    peak = {"gflops": 200.0, "library": "torch 2.13.0", "device": "cpu", "n": 2048,
            "candidates": {"numpy 2.4.6": 63.0, "torch 2.13.0": 200.0}, "theoretical": None}
    full = row("torch", 1000.0, sections=["train", "infer", "latency"], latency_p50_ms=0.25, latency_p99_ms=0.75,
               latency_calls=321, peak=peak, gemm_peak_gflops=200.0)
    only = {k: v for k, v in row("onnxruntime", 0.0, sections=["infer", "latency"], infer_samples_s=9000.0,
                                   latency_p50_ms=0.125, latency_p99_ms=0.5, latency_calls=654).items()
            if not k.startswith("train_") and k != "loss"}
    path = save(tmp_path / "r.json", "h", [full, only], schema=2)
    out = cli("report", path)
    assert out.returncode == 0, out.stderr
    training, inference = out.stdout.split("\n\n")[:2]
    (ort,) = [l for l in training.splitlines() if "onnxruntime" in l]
    assert "does not train" in ort
    (torch,) = [l for l in inference.splitlines() if " torch 1.0 " in l]
    assert torch.split()[-3:] == ["0.25", "0.75", "321"] and "2,000" in torch
    (ort,) = [l for l in inference.splitlines() if "onnxruntime" in l]
    assert ort.split()[-3:] == ["0.125", "0.5", "654"]
    assert "h: cpu GEMM peak 200 GFLOP/s: torch 2.13.0, fp32 2048x2048 (also numpy 2.4.6 63)" in out.stdout
    bad = save(tmp_path / "bad.json", "h", [{**full, "latency_p99_ms": 0.1}], schema=2)
    out = cli("report", bad)
    assert out.returncode == 2 and "latency_p99_ms is below its latency_p50_ms" in out.stderr
