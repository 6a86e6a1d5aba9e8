"""The model folder decides pooling, normalisation and context length; flags override; HF ids resolve offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedserve.model_config import ModelConfigError, load_model_config, resolve_model_folder


def test_bundled_model_as_declared(bundled_model_path):
    config = load_model_config(str(bundled_model_path))
    assert (config.architecture, config.pooling, config.normalize) == ("BertModel", "mean", True)
    assert config.context_length == 256  # sentence_bert_config.json's max_seq_length, not the 512 positions


def test_flags_override_pooling_and_config_fields(bundled_model_path):
    config = load_model_config(
        str(bundled_model_path), pooling="cls", overrides='{"max_position_embeddings": 300}'
    )
    assert config.pooling == "cls" and config.hf_config["max_position_embeddings"] == 300
    assert load_model_config(
        str(bundled_model_path), context_length=300, overrides='{"max_position_embeddings": 300}'
    )
    with pytest.raises(ModelConfigError, match="exceeds"):
        load_model_config(str(bundled_model_path), context_length=600)
    with pytest.raises(ModelConfigError, match="JSON"):
        load_model_config(str(bundled_model_path), overrides="{oops")


def test_the_supported_architectures_are_the_executors_model_classes():
    from embedserve.gpu_proc.models.registry import MODEL_REGISTRY
    from embedserve.model_config import SUPPORTED_ARCHITECTURES

    assert set(MODEL_REGISTRY) == SUPPORTED_ARCHITECTURES


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "vocab_size": 100},
            "unsupported model architecture 'GPT2LMHeadModel'",
        ),
        ({"architectures": ["GemmaModel"], "hidden_size": 64, "vocab_size": 100}, "supported: BertModel"),
        ({"architectures": ["Qwen2Model"], "vocab_size": 100}, "no integer hidden_size"),
    ],
)
def test_a_model_the_server_cannot_build_is_refused_before_anything_starts(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=message):
        load_model_config(str(tmp_path))
    launched = subprocess.run(
        [sys.executable, "-m", "embedserve.launch", "--model-path", str(tmp_path), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert launched.returncode == 2 and "Traceback" not in launched.stderr
    assert "Cannot start" in launched.stderr and message.split("'")[0] in launched.stderr


def test_family_defaults_when_the_folder_declares_no_pooling(bundled_model_path, tmp_path):
    folder = shutil.copytree(bundled_model_path, tmp_path / "bare")
    (folder / "modules.json").unlink()
    assert load_model_config(str(folder)).pooling == "cls"
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model_config(str(folder)).pooling == "last"


def test_unsupported_pooling_is_refused_not_guessed(bundled_model_path, tmp_path):
    folder = shutil.copytree(bundled_model_path, tmp_path / "maxpool")
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ModelConfigError, match="pooling"):
        load_model_config(str(folder))


def test_a_missing_pooling_folder_is_named_and_pooling_can_still_be_chosen(bundled_model_path, tmp_path):
    folder = shutil.copytree(bundled_model_path, tmp_path / "nopool")
    shutil.rmtree(folder / "1_Pooling")
    with pytest.raises(ModelConfigError, match=r"1_Pooling/config.json not found.*--pooling"):
        load_model_config(str(folder))
    assert load_model_config(str(folder), pooling="mean").pooling == "mean"


def lay_out_hf_cache(cache: str, repo_id: str, source) -> None:
    """The layout huggingface_hub itself writes: blobs are files here, snapshots/<rev> holds the tree."""
    repo = f"{cache}/models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, f"{repo}/snapshots/{revision}")
    (Path(repo) / "refs").mkdir(parents=True)
    (Path(repo) / "refs" / "main").write_text(revision)


def test_a_hugging_face_id_resolves_from_the_local_cache_offline(bundled_model_path, tmp_path, monkeypatch):
    lay_out_hf_cache(str(tmp_path / "hub"), "acme/tiny-embedder", bundled_model_path)
    import huggingface_hub.constants

    # NOTE: huggingface_hub reads HF_HUB_CACHE when first imported, which another test may have done.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_model_folder("acme/tiny-embedder")
    assert folder.endswith("0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(ModelConfigError, match="not in the local Hugging Face cache"):
        resolve_model_folder("acme/not-cached")


def test_a_model_path_may_start_with_the_home_folder(bundled_model_path, tmp_path, monkeypatch):
    shutil.copytree(bundled_model_path, tmp_path / "models" / "mini")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model_folder("~/models/mini") == str(tmp_path / "models" / "mini")
    with pytest.raises(ModelConfigError, match=r"tokenizer path .*not a folder"):
        resolve_model_folder("~/models/none", "tokenizer path")


@pytest.mark.slow
def test_the_server_launches_from_a_hugging_face_id_offline(bundled_model_path, tmp_path):
    from launched_server import LaunchedServer

    lay_out_hf_cache(str(tmp_path / "hub"), "acme/tiny-embedder", bundled_model_path)
    # NOTE: not told it is offline, and a Hub that refuses every connection: a cached id must need
    # no request at all (the tokenizer once asked for extra files, with minutes of retries).
    unreachable_hub = "http://127.0.0.1:9"
    online = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": unreachable_hub}
    with LaunchedServer("--model-path", "acme/tiny-embedder", "--dtype", "bfloat16", env=online) as server:
        body = server.post("/v1/embeddings", {"model": "acme/tiny-embedder", "input": "offline"}).json()
        assert body["model"] == "acme/tiny-embedder" and len(body["data"][0]["embedding"]) == 384
        assert unreachable_hub not in server.log() and "Retry" not in server.log()
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "embedserve.launch", "--model-path", "acme/missing"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 2 and "acme/missing" in result.stderr
