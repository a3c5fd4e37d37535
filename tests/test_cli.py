"""compare.py: list, summary and bad input (one line, exit code 2, no traceback)."""
import pytest

from .conftest import compare as cli


def test_list_shows_models_backends_and_devices():
    out = cli("list")
    assert out.returncode == 0, out.stderr
    assert "lenet5" in out.stdout and "61,706" in out.stdout
    for backend in ("numpy", "keras", "torch", "mxnet"):
        assert backend in out.stdout
    assert "cpu" in out.stdout


def test_summary_of_a_zoo_model_and_a_json_file(tmp_path):
    from nncompare.models import zoo
    path = tmp_path / "m.json"
    zoo.get("mlp").save(path)
    for target in ("mlp", str(path)):
        out = cli("summary", target)
        assert out.returncode == 0, out.stderr
        assert "dense_0 (Dense)" in out.stdout and "235,146" in out.stdout


@pytest.mark.parametrize("content,message", [
    ("not json", "not JSON"),
    ('{"name": "m", "input_shape": [3], "layers": [{"type": "dense", "units": 0}]}',
     "layer 0 (dense_0): field 'units'"),
    ('{"name": "m", "input_shape": [3], "layers": [{"type": "lstm"}]}', "unknown layer kind 'lstm'"),
])
def test_bad_spec_files_give_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    out = cli("summary", str(path))
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_model_exits_2():
    out = cli("summary", "resnet9000")
    assert out.returncode == 2 and "unknown model 'resnet9000'" in out.stderr


def one_line_exit_2(out, message):
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def cli_quick(*args, env=None):
    return cli(*args, env=env, timeout=60)


@pytest.mark.parametrize("command", [["summary"], ["check"], ["run", "--quiet", "--models"], ["train", "--model"]])
def test_a_fifo_or_device_given_as_a_spec_is_refused_without_blocking(tmp_path, command):
    import os
    os.mkfifo(tmp_path / "spec.json")
    for spec in (str(tmp_path / "spec.json"), "/dev/zero"):
        one_line_exit_2(cli_quick(*command, spec), f"spec file '{spec}' is not a regular file")


@pytest.mark.parametrize("option,value,message", [
    ("--threads", "1000000000000", "must be a thread count from 1 to 4,096"),
    ("--threads", "0", "must be a thread count from 1 to 4,096"),
    ("--warmup", "-1", "must be an integer >= 0 (decimal digits)"),
    ("--steps", "+3", "must be a positive integer (decimal digits)"),
    ("--steps", "1_0", "must be a positive integer (decimal digits)"),
    ("--repeats", "\u0663", "must be a positive integer (decimal digits)"),  # an Arabic-Indic 3: int() takes it
    ("--batch-sizes", "9" * 5000, "must be a positive integer from 1 to 1,000,000,000,000"),
    ("--timeout", "9" * 5000, "must be a finite number > 0"),
    ("--concurrency", "99999", "must be a number of cells from 1 to 4,096"),
    ("--address", "", "--address is empty"),
    ("--address", " ", "--address is empty"),
    ("--batch-sizes", "1000000000000", "needs 11,176 GiB for one batch's activations, more than this machine's"),
], ids=["threads-huge", "threads-0", "warmup-negative", "plus-sign", "underscore", "arabic-digit", "5000-digits",
        "5000-digit-timeout", "concurrency", "address-empty", "address-blank", "batch-beyond-memory"])
def test_bad_option_values_are_one_short_line(option, value, message):
    out = cli_quick("run", "--models", "perceptron", option, value)
    one_line_exit_2(out, message)
    assert len(out.stderr) < 300  # a long value is echoed cut short


def test_integer_options_read_plain_digits_the_same_way_everywhere():
    from nncompare import cli as compare
    parse = compare.build_parser().parse_args
    for text in ("0", "00", " 0 ", "0\n"):
        assert parse(["run", "--warmup", text]).warmup == 0
    args = parse(["run", "--steps", " 007", "--repeats", "3 ", "--batch-sizes", "08", "--threads", "4096"])
    assert (args.steps, args.repeats, args.batch_sizes, args.threads) == (7, 3, [8], [4096])
    assert parse(["train", "--epochs", "02", "--threads", "01"]).epochs == 2


@pytest.mark.parametrize("command", [["train", "--backends", "numpy", "--data-dir", ""],
                                     ["train", "--backends", "numpy", "--data-dir", "  "]])
def test_an_empty_data_dir_is_refused(command):
    one_line_exit_2(cli_quick(*command), "--data-dir is empty")


def test_train_target_is_an_accuracy():
    for value in ("95", "0", "nan", "x" * 5000):
        out = cli_quick("train", "--target", value)
        one_line_exit_2(out, "must be an accuracy in (0, 1]")
        assert len(out.stderr) < 300


def test_device_spellings_are_stored_in_their_canonical_form(tmp_path):
    import json
    path = tmp_path / "r.json"
    out = cli_quick("run", "--models", "perceptron", "--backends", "numpy", "--steps", "1", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--quiet", "--devices", " cpu", "CPU", "cpu:00",
                    "--json", str(path))
    assert out.returncode == 0, out.stderr
    assert [r["device"] for r in json.loads(path.read_text())["rows"]] == ["cpu"]


def test_an_error_naming_a_hostile_path_is_still_one_line(tmp_path):
    out = cli_quick("summary", str(tmp_path / "a\x1b[2J\nb.json"))
    one_line_exit_2(out, "a\\x1b[2J\\nb.json: cannot read spec file")
