"""`embedserve launch` / `python -m embedserve.launch`: start the five processes and watch over them.

Start-up: check the model and the port, create the shared-memory rings, start the executor,
tokenizer, scheduler and output processes and wait for each to report ready, then the HTTP
process; send one request through the whole pipeline; log the ready line.
Shutdown (SIGINT/SIGTERM/SIGHUP): HTTP drains in-flight requests, every child is stopped, the rings and
socket directory are removed. A child that dies takes the server down with a non-zero exit.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
from collections.abc import MutableMapping, Sequence

from embedserve.detok_proc.process import run_detokenizer_process
from embedserve.gpu_proc.process import run_executor_process
from embedserve.http.server import run_http_process
from embedserve.ipc.ports import PortArgs, remove_stale_ipc_dirs, remove_stale_rings
from embedserve.launch_support import (
    ChildFailed,
    Supervisor,
    check_port_free,
    create_rings,
    warm_up,
    with_kv_pool,
)
from embedserve.log import configure_logging
from embedserve.model_config import ModelConfigError, model_config_from_args, resolve_model_folder
from embedserve.scheduler_proc.process import run_scheduler_process
from embedserve.server_args import ServerArgs, cuda_available, make_parser
from embedserve.tokenizer_proc.process import run_tokenizer_process

logger = logging.getLogger("embedserve")

# The executor starts first: the KV pool it can allocate bounds the context length the others use.
# HTTP starts last so it never serves a half-built pipeline.
PIPELINE_PROCESSES = (
    ("tokenizer", run_tokenizer_process),
    ("scheduler", run_scheduler_process),
    ("detokenizer", run_detokenizer_process),
)


def launch_server(args: ServerArgs) -> int:
    """Run a server until it is told to stop; the process exit code."""
    configure_logging(args.log_level)
    args = args.with_device_resolved()
    logger.info(f"server_args={args!r}")
    if args.device == "cuda" and not cuda_available():
        logger.error("Cannot start: --device cuda, but torch sees no CUDA device here; use --device cpu")
        return 2
    try:
        model = model_config_from_args(args)
        if args.tokenizer_path:
            resolve_model_folder(args.tokenizer_path, "tokenizer path")
        check_port_free(args.host, args.port)
    except (ModelConfigError, OSError) as exc:
        logger.error(f"Cannot start: {exc}")
        return 2
    remove_stale_rings()
    remove_stale_ipc_dirs()
    ports = PortArgs.create()
    rings = create_rings(ports, model, args)
    logger.info(f"IPC sockets in {ports.ipc_dir} (mode 0700); shared memory at {ports.token_ring[:-6]}*")
    supervisor = Supervisor(args, ports, mp.get_context("spawn"))
    try:
        supervisor.install_signal_handlers()
        supervisor.start("executor", run_executor_process)
        executor = supervisor.wait_ready(["executor"])["executor"]
        args = supervisor.args = with_kv_pool(args, model, int(executor.get("kv_pool_tokens", 0)))
        for name, target in PIPELINE_PROCESSES:
            supervisor.start(name, target)
        supervisor.wait_ready([name for name, _ in PIPELINE_PROCESSES])
        supervisor.start("http", run_http_process)
        supervisor.wait_ready(["http"])
        supervisor.watch(lambda: warm_up(args))
        supervisor.announce_ready()
        logger.info("The server is fired up and ready to roll!")
        return supervisor.supervise()
    except ChildFailed as exc:
        logger.error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 0 if supervisor.stop_signal else 1
    finally:
        supervisor.stop_all()
        for ring in rings:
            ring.close()
            ring.unlink()
        ports.remove_all()


def set_child_env_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Settings every child inherits (spawned, they read them when they import torch or tokenizers);
    a value the user already set wins."""
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # NOTE: libgomp's threads spin ~300k iterations after each parallel region before they sleep; on a
    # small machine that spinning takes the cores the pipeline processes and the attention kernel's
    # second thread need. Measured on 2 cores, MiniLM fp32 at 16 clients x 8 inputs: 6.2-6.4k tokens/s
    # by default, 6.9k at 10,000, 6.8-7.0k passive; the idle one-query forward stayed 4.3 ms (passive:
    # 8.3 ms). Read by the executor's libgomp when torch loads.
    environ.setdefault("GOMP_SPINCOUNT", "10000")


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    try:
        args = ServerArgs.from_cli_args(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    # NOTE: children must not inherit a half-initialised torch or a running event loop: spawn, never fork.
    set_child_env_defaults()
    return launch_server(args)


if __name__ == "__main__":
    sys.exit(main())
