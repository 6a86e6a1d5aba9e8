"""One frozen dataclass generates the command line; --help explains every option."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from embedserve.server_args import BUNDLED_MODEL_NAME, ServerArgs, make_parser


def test_every_field_is_an_option_and_parses():
    args = ServerArgs.from_cli_args(
        make_parser().parse_args(
            ["--port", "1234", "--dtype", "bfloat16", "--allow-auto-truncate", "--max-prefill-tokens", "64"]
        )
    )
    assert (args.port, args.dtype, args.allow_auto_truncate, args.prefill_token_budget) == (
        1234,
        "bfloat16",
        True,
        64,
    )
    assert args.host == "127.0.0.1" and args.model_name == BUNDLED_MODEL_NAME
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.port = 1  # type: ignore[misc]


def test_cpu_and_cuda_budgets_differ_by_default():
    assert ServerArgs(device="cpu").prefill_token_budget == 4096
    assert ServerArgs(device="cuda").prefill_token_budget == 16384


def test_help_names_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "embedserve.cli", "launch", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for f in dataclasses.fields(ServerArgs):
        assert "--" + f.name.replace("_", "-") in out


def test_concurrent_batches_default_to_two_on_two_threads_else_one_and_never_run_on_cuda():
    two = ServerArgs(device="cpu", num_threads=2)
    assert two.executor_lanes == 2 and two.batches_in_flight == 2
    assert two.lane_min_tokens == two.prefill_token_budget // 2
    assert ServerArgs(device="cpu", num_threads=4).executor_lanes == 1
    assert ServerArgs(device="cpu", num_threads=1).executor_lanes == 1
    assert ServerArgs(device="cpu", num_threads=2, concurrent_batches=1).executor_lanes == 1
    assert ServerArgs(device="cpu", concurrent_batches=3).batches_in_flight == 3
    assert ServerArgs(device="cuda", concurrent_batches=2).executor_lanes == 1
    with pytest.raises(ValueError, match="at least 1"):
        ServerArgs(concurrent_batches=0)


def test_a_bad_concurrent_batches_is_a_usage_error_not_a_traceback():
    cmd = [sys.executable, "-m", "embedserve.launch", "--concurrent-batches", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--concurrent-batches must be at least 1" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-prefill-tokens", "0"],
        ["--max-running-requests", "-1"],
        ["--embedding-cache-size", "-1"],
        ["--request-timeout", "0"],
        ["--health-check-timeout", "nan"],
        ["--health-check-timeout", "inf"],
        ["--health-check-timeout", "1e300"],
        ["--health-check-timeout", "0.001"],
        ["--port", "70000"],
        ["--mem-fraction-static", "2"],
        ["--num-threads", "0"],
    ],
)
def test_out_of_range_numbers_are_usage_errors(argv, capsys):
    from embedserve.launch import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert f"{argv[0]} must be" in capsys.readouterr().err


def test_an_empty_api_key_is_refused_rather_than_an_open_server(capsys):
    from embedserve.launch import main

    for key in ("", "  "):
        with pytest.raises(SystemExit) as stop:
            main(["--api-key", key])
        assert stop.value.code == 2 and "--api-key is empty" in capsys.readouterr().err


def test_the_api_key_is_masked_wherever_the_settings_are_shown():
    args = ServerArgs(api_key="s3cret-key")
    assert "s3cret" not in repr(args) and "api_key='***'" in repr(args)
    assert args.as_dict()["api_key"] == "***" and args.api_key == "s3cret-key"
    assert "api_key=None" in repr(ServerArgs())
