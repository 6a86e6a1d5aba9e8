"""Models whose tokenizer gives no ids for some text: such an input is refused with a 400 (a sequence of
no tokens was never scheduled, so its request waited forever), and a folder whose tokenizer gives no
ids for plain words (its tokenizer files missing) stops the launch with a clear line instead of a
warm-up that never ends."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import requests
from launched_server import LaunchedServer, free_port
from tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory, bundled_model_path):
    return build_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3", bundled_model_path, pooling="last")


@pytest.fixture(scope="module")
def no_special_tokens(tiny_qwen3, tmp_path_factory):
    """The tiny model with a tokenizer that adds no special tokens: a space alone gives no ids."""
    folder = shutil.copytree(tiny_qwen3, tmp_path_factory.mktemp("plain") / "model")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**tokenizer, "post_processor": None}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_an_input_of_no_tokens_is_refused_not_left_waiting(no_special_tokens):
    with LaunchedServer("--model-path", str(no_special_tokens)) as server:
        for path, body, param in (
            ("/v1/embeddings", {"input": "\u200b"}, "input"),
            ("/v1/embeddings", {"input": ["a word", " "]}, "input"),
            ("/encode", {"text": " "}, "text"),
        ):
            answer = requests.post(f"{server.url}{path}", json=body, timeout=20)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["code"] == "empty_input" and error["param"] == param
            assert "Input" in error["message"] and "no tokens" in error["message"]
        assert server.post("/v1/embeddings", {"input": "a word"}).status_code == 200
        assert requests.post(f"{server.url}/flush_cache", timeout=20).status_code == 200  # nothing in flight


def test_a_folder_without_tokenizer_files_stops_the_launch_with_one_line(tiny_qwen3, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_qwen3 / name, tmp_path / name)
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedserve.launch",
            "--model-path",
            str(tmp_path),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert launched.returncode != 0
    assert "missing its tokenizer files" in launched.stderr and "--tokenizer-path" in launched.stderr
