"""`embedserve bench` as a user runs it: a subprocess against a launched server, its table and JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from launched_server import LaunchedServer

from embedserve.bench.cli import format_table, parse_loads
from embedserve.bench.loadgen import Summary


@pytest.fixture(scope="module")
def server():
    with LaunchedServer("--embedding-cache-size", "0") as s:
        yield s


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "embedserve.cli", "bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_several_loads_print_one_table_and_write_json(server, tmp_path):
    out = tmp_path / "results.json"
    done = bench(
        "--url", server.url, "--loads", "2x1,3x4", "--warmup", "0.5", "--duration", "2",
        "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| load | tokens/s")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["2 x 1", "3 x 4"]
    results = json.loads(out.read_text())["embedserve"]
    assert [(r["concurrency"], r["inputs_per_request"]) for r in results] == [(2, 1), (3, 4)]
    for r in results:
        assert r["errors"] == {} and r["requests"] > 0 and r["tokens"] > 0
        assert r["inputs"] == r["requests"] * r["inputs_per_request"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    assert "window" in done.stderr  # each load's own summary goes to stderr


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_corpus_file_is_what_gets_sent_and_counted(server, tmp_path, suffix):
    corpus = tmp_path / f"corpus{suffix}"
    # "hello world" is 4 tokens with [CLS] and [SEP]: every answered input must count exactly 4
    lines = ["hello world"] * 5 if suffix == ".txt" else [json.dumps({"text": "hello world"})] * 5
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.json"
    done = bench(
        "--url", server.url, "--corpus-file", str(corpus), "--concurrency", "2", "--inputs-per-request",
        "3", "--warmup", "0.2", "--duration", "1", "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (r,) = json.loads(out.read_text())["embedserve"]
    assert r["inputs"] > 0 and r["tokens"] == 4 * r["inputs"]
    assert "warning" not in done.stderr


def test_failed_requests_show_what_the_server_said(server, tmp_path):
    corpus = tmp_path / "long.txt"
    corpus.write_text("word " * 400 + "\n")  # past the model's 256 tokens: every request gets a 400
    out = tmp_path / "r.json"
    done = bench(
        "--url", server.url, "--corpus-file", str(corpus), "--concurrency", "1", "--warmup", "0.2",
        "--duration", "1", "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 1
    said = "more than the model's context length of 256 tokens"
    assert "failed requests:" in done.stdout and "x 400 (the first: Input 0 has" in done.stdout
    assert said in done.stdout and said in done.stderr  # the table's note and the load's own summary
    assert "warning: 1 of 1 texts are longer than the server's context length (256 tokens)" in done.stderr
    (r,) = json.loads(out.read_text())["embedserve"]
    assert said in r["error_examples"]["400"] and r["errors"]["400"] > 0


def interrupt_once_measuring(args: list[str], after_load_starts: float) -> tuple[int, str, str]:
    """Runs the bench, sends SIGINT (Ctrl-C) `after_load_starts` seconds after its first load began."""
    cmd = [sys.executable, "-m", "embedserve.cli", "bench", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    for line in proc.stderr:  # each load announces itself on stderr ("-- URL: N clients x M inputs")
        err.append(line)
        if line.startswith("-- "):
            break
    time.sleep(after_load_starts)
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=60)
    return proc.returncode, out, "".join(err) + rest


def test_ctrl_c_reports_the_load_it_cut_short_and_runs_no_more(server, tmp_path):
    out = tmp_path / "r.json"
    args = ["--url", server.url, "--loads", "2x1,3x2", "--warmup", "0.5", "--duration", "60", "--no-progress"]
    rc, stdout, stderr = interrupt_once_measuring([*args, "--json", str(out)], after_load_starts=3)
    assert rc == 130, stderr
    rows = [line for line in stdout.splitlines() if line.startswith("| 2 x 1") or line.startswith("| 3 x 2")]
    assert len(rows) == 1 and rows[0].startswith("| 2 x 1 (cut short) |"), stdout
    assert "cut short by Ctrl-C" in stderr and "3 clients" not in stderr and "Traceback" not in stderr
    saved = json.loads(out.read_text())
    assert saved["interrupted"] is True
    (r,) = saved["embedserve"]
    assert r["interrupted"] and r["cut_short"] and r["requests"] > 0 and r["errors"] == {}
    assert "interrupted by Ctrl-C: 0 of 2 loads measured in full" in stdout
    assert 1 < r["seconds"] < 10  # the part measured before Ctrl-C, not the 60 s asked for
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])


def test_ctrl_c_in_the_warm_up_says_nothing_was_measured(server):
    args = ["--url", server.url, "--warmup", "30", "--duration", "30", "--no-progress"]
    rc, stdout, stderr = interrupt_once_measuring(args, after_load_starts=1)
    assert rc == 130, stderr
    assert "interrupted in the warm-up: nothing measured" in stderr and "Traceback" not in stderr
    assert "|" not in stdout


def test_bad_load_spec_is_a_usage_error(server):
    done = bench("--url", server.url, "--loads", "16by8")
    assert done.returncode == 2 and "bad load '16by8'" in done.stderr


def test_no_server_is_said_plainly(tmp_path):
    done = bench("--url", "http://127.0.0.1:9", "--duration", "1", timeout=60)
    assert done.returncode == 2 and "no embeddings server answers at http://127.0.0.1:9" in done.stderr


def test_vs_vllm_without_an_interpreter_is_a_usage_error(server, tmp_path):
    done = bench("--url", server.url, "--vs-vllm", str(tmp_path / "no-python"), "--duration", "1")
    assert done.returncode == 2 and "not an executable Python" in done.stderr


def test_vs_vllm_that_cannot_start_says_why_without_a_traceback(server, tmp_path):
    # stands in for a venv whose vLLM is broken: the "interpreter" prints an error and exits
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'vllm'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    done = bench(
        "--url", server.url, "--vs-vllm", str(broken), "--duration", "1", "--vllm-ready-timeout", "60"
    )
    assert done.returncode == 2, done.stderr
    assert "vLLM did not start" in done.stderr and "No module named 'vllm'" in done.stderr
    assert "Traceback" not in done.stderr


def test_vs_vllm_that_lists_no_model_says_so_without_a_traceback(server, tmp_path):
    # a stand-in "vLLM" that is healthy but answers GET /v1/models with a 500
    broken = tmp_path / "python"
    broken.write_text(
        "#!" + sys.executable + "\n"
        "import sys, http.server\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200 if self.path == '/health' else 500)\n"
        "        self.end_headers()\n"
        "http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n"
    )
    broken.chmod(0o755)
    done = bench(
        "--url", server.url, "--vs-vllm", str(broken), "--duration", "1", "--vllm-ready-timeout", "60"
    )
    assert done.returncode == 2, done.stderr
    assert "vLLM started but lists no model" in done.stderr and "Traceback" not in done.stderr


def test_a_second_ctrl_c_leaves_no_vllm_behind(server, tmp_path):
    """vLLM runs in its own session (the terminal's Ctrl-C never reaches it): one that ignores SIGTERM
    is killed at a second Ctrl-C instead of waiting out the 30 s grace, and nothing is left."""
    stubborn = tmp_path / "python"
    stubborn.write_text(
        "#!"
        + sys.executable
        + "\nimport signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n"
    )
    stubborn.chmod(0o755)
    cmd = [sys.executable, "-m", "embedserve.cli", "bench", "--url", server.url, "--vs-vllm", str(stubborn)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # "starting vLLM (...)": it is now waiting for the stand-in to be ready
        if line.startswith("starting vLLM"):
            break
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    time.sleep(3)  # the stand-in ignores the SIGTERM that follows; bench says it waits
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "Ctrl-C kills it" in err
    left = subprocess.run(["pgrep", "-f", str(stubborn)], capture_output=True, text=True).stdout.split()
    assert left == [], f"stand-in vLLM left running: {left}"


def test_help_documents_the_vllm_side_by_side():
    done = bench("--help")
    assert done.returncode == 0 and "--vs-vllm" in done.stdout and "truncate" not in done.stderr


def test_parse_loads():
    assert parse_loads("1x1, 16X8,64x64") == [(1, 1), (16, 8), (64, 64)]
    for bad in ("", "16", "x8", "0x1", "4x-1", "axb"):
        with pytest.raises(ValueError, match="bad load"):
            parse_loads(bad)


def _summary(clients: int, inputs: int, tokens_per_s: float, p50: float, p99: float) -> Summary:
    return Summary(
        url="u", model="m", concurrency=clients, inputs_per_request=inputs, encoding_format="float",
        seconds=10.0, requests=1, inputs=inputs, tokens=int(tokens_per_s * 10), requests_per_s=0.1,
        inputs_per_s=0.1 * inputs, tokens_per_s=tokens_per_s,
        latency_ms={"p50": p50, "p90": p99, "p99": p99, "mean": p50}, errors={},
    )  # fmt: skip


def test_side_by_side_table_gives_the_ratio():
    ours = [_summary(16, 8, 7700.0, 900, 1100)]
    vllm = [_summary(16, 8, 7000.0, 1000, 1500)]
    rows = format_table(ours, vllm).splitlines()
    assert "ratio" in rows[0]
    assert rows[2] == "| 16 x 8 | 7,000 | 7,700 | 1.10x | 1,000 / 1,500 | 900 / 1,100 |"


def test_a_server_with_an_api_key_is_measured_with_one(launch):
    guarded = launch("--api-key", "sekrit")
    base = ("--url", guarded.url, "--warmup", "0", "--duration", "1", "--no-progress")
    refused = bench(*base)
    assert refused.returncode == 2 and "401" in refused.stderr
    done = bench(*base, "--api-key", "sekrit")
    assert done.returncode == 0, done.stderr
    assert "| 8 x 1 |" in done.stdout and "none |" in done.stdout
