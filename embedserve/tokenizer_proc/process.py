"""The tokenizer process: turns requests into token ids in the token ring, or into a clear 400.

Texts of every request waiting at once are encoded together, in calls of at most `CHUNK_TEXTS`
texts and `CHUNK_CHARS` characters; between two calls a health probe (`/health_generate`) that has
come in is encoded and sent at once, so that a backlog of large requests does not make a live server
look stuck. Inputs of no tokens, and inputs over the context length unless --allow-auto-truncate is
set, fail the request with a 400 naming the input; a long text is read only as far as that decision
needs (long_text.py).
"""

from __future__ import annotations

import logging
import os
import time
from multiprocessing.connection import Connection

import numpy as np
import zmq

from embedserve.ipc.child import child_process
from embedserve.ipc.ports import PortArgs
from embedserve.ipc.shm_ring import ShmRing
from embedserve.ipc.zmq_queue import ZmqPull, ZmqPush
from embedserve.messages import (
    AbortRequest,
    EmbedRequest,
    FlushCache,
    RequestFailed,
    RingRef,
    SchedulerInput,
    TokenizedRequest,
    TokenizerInput,
)
from embedserve.model_config import model_config_from_args, resolve_model_folder
from embedserve.server_args import ServerArgs
from embedserve.tokenizer_proc.long_text import MAX_CHARS_PER_TOKEN, max_chars
from embedserve.tokenizer_proc.text_tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

# NOTE: ~0.3 ms a text here (a 100-token passage, one thread): a probe waits ~0.1 s for a call of 256
# instead of seconds for a backlog of a few 2,000-input requests (measured 3.5 s before chunking).
# Characters bound a call too: a text without spaces is encoded whole (~0.23 us a character), and 256
# of 60,000 characters took 3.5 s; 256,000 characters is ~60 ms.
CHUNK_TEXTS = 256
CHUNK_CHARS = 256_000


class InputRefused(Exception):
    """An input this server will not embed: answered 400 with `code` and the message."""

    code = ""


class InputTooLong(InputRefused):
    code = "context_length_exceeded"

    def __init__(self, index: int, length: int, limit: int, counted_in_part: bool = False):
        """`counted_in_part`: `length` counts only a prefix of the input (see long_text.py)."""
        tokens = f"at least {length}" if counted_in_part else str(length)
        super().__init__(
            f"Input {index} has {tokens} tokens, more than the model's context length of {limit} tokens. "
            "Shorten it, or start the server with --allow-auto-truncate."
        )


class InputEmpty(InputRefused):
    """No ids at all: nothing to pool, and a sequence of no tokens would never be scheduled."""

    code = "empty_input"

    def __init__(self, index: int):
        super().__init__(
            f"Input {index} has no tokens: this model's tokenizer gives no ids for its text (only "
            "characters it drops, such as spaces or zero-width ones). Send text with something to embed."
        )


class TokenizerWorker:
    def __init__(self, args: ServerArgs, ports: PortArgs, ctx: zmq.Context):
        self.context_length = model_config_from_args(args).context_length
        self.truncate = args.allow_auto_truncate
        self.max_request_tokens = args.max_request_tokens
        # NOTE: a Hugging Face id becomes its cached folder first; handed to transformers as an id,
        # it would ask the Hub for extra files (minutes of retries offline).
        self.tokenizer = TextTokenizer(resolve_model_folder(args.resolved_tokenizer_path, "tokenizer path"))
        self.ring = ShmRing.attach(ports.token_ring)
        self.inbox: ZmqPull[TokenizerInput] = ZmqPull(ctx, ports.tokenizer_addr, TokenizerInput)
        self.to_scheduler: ZmqPush[SchedulerInput] = ZmqPush(ctx, ports.scheduler_addr)
        self.to_http: ZmqPush[RequestFailed] = ZmqPush(ctx, ports.http_addr)
        self.backlog: list[TokenizerInput] = []  # read while encoding (to find probes), not yet handled

    def run_forever(self) -> None:
        while True:
            waiting, self.backlog = self.backlog or [self.inbox.recv()], []
            self.handle([*waiting, *self.inbox.drain()])

    def handle(self, msgs: list[TokenizerInput]) -> None:
        probes, rest = _split_probes(msgs)
        if probes:  # NOTE: the scheduler runs a probe ahead of its queue; so does the tokenizer
            self._handle(probes)
        self._handle(rest)

    def _send_probes_waiting(self) -> None:
        """Between two encode calls: probes that have come in go now, the rest waits its turn."""
        probes, rest = _split_probes(self.inbox.drain())
        self.backlog += rest
        if probes:
            self._handle(probes)

    def _handle(self, msgs: list[TokenizerInput]) -> None:
        started = time.perf_counter()
        aborted = {m.rid for m in msgs if isinstance(m, AbortRequest)}
        requests = [
            m for m in msgs if isinstance(m, EmbedRequest) and m.meta.rid not in aborted and self._readable(m)
        ]
        texts = [t for r in requests if r.texts is not None for t in r.texts]
        in_part: set[int] = set()  # texts whose ids cover only their first part (long_text.py)
        encoded = iter(enumerate(self._encode(texts, in_part)))
        for request in requests:
            if request.texts is not None:
                pairs = [next(encoded) for _ in request.texts]
                self._submit(request, [ids for _, ids in pairs], started, [i in in_part for i, _ in pairs])
            else:
                self._submit(request, _split_token_ids(request), started)
        for rid in aborted:
            self.to_scheduler.send(AbortRequest(rid=rid))
        for msg in msgs:
            if isinstance(msg, FlushCache):  # passes through, in order behind the requests before it
                self.to_scheduler.send(msg)

    def _encode(self, texts: list[str], in_part: set[int]) -> list[list[int]]:
        """Every text's ids, a chunk at a time (`chunks`), probes sent between two calls."""
        limit = self.context_length if self.truncate else None
        out: list[list[int]] = []
        for first, end in chunks(texts):
            if first:
                self._send_probes_waiting()
            chunk_in_part: set[int] = set()
            out += self.tokenizer.encode_batch(
                texts[first:end],
                max_length=limit,
                stop_above=self.context_length,
                counted_in_part=chunk_in_part,
            )
            in_part.update(first + i for i in chunk_in_part)
        return out

    def _readable(self, request: EmbedRequest) -> bool:
        """False, once the client is told, for a text over the characters the tokenizer reads."""
        if self.truncate or request.texts is None:
            return True
        cap = max_chars(self.context_length)
        index = next((i for i, text in enumerate(request.texts) if len(text) > cap), None)
        if index is None:
            return True
        message = (
            f"Input {index} has {len(request.texts[index]):,} characters; at most {cap:,} are read "
            f"({MAX_CHARS_PER_TOKEN} per token of the model's context length of {self.context_length} "
            "tokens). Shorten it, or start the server with --allow-auto-truncate."
        )
        self._refuse(request, 400, "context_length_exceeded", message)
        return False

    def _refuse(self, request: EmbedRequest, status: int, code: str, message: str) -> None:
        """Answer `request` with an error about its input field, instead of tokens."""
        self.to_http.send(
            RequestFailed(
                rid=request.meta.rid, status=status, message=message, param=_input_field(request), code=code
            )
        )

    def _submit(
        self,
        request: EmbedRequest,
        inputs: list[list[int]] | list[np.ndarray],
        started: float,
        counted_in_part: list[bool] | None = None,
    ) -> None:
        try:
            arrays = self._checked_lengths(inputs, counted_in_part)
        except InputRefused as exc:
            self._refuse(request, 400, exc.code, str(exc))
            return
        block = np.concatenate(arrays).astype("<i4", copy=False) if arrays else np.empty(0, "<i4")
        if block.size > self.max_request_tokens:
            self._refuse(
                request,
                400,
                "too_many_tokens",
                f"The request has {block.size} tokens in all; at most {self.max_request_tokens} are "
                "allowed per request (--max-request-tokens). Split it into smaller requests.",
            )
            return
        if block.nbytes > self.ring.max_block_bytes:
            self._refuse(
                request,
                413,
                "request_too_large",
                f"The request has {block.size} tokens; at most {self.ring.max_block_bytes // 4} "
                "fit in the server's token buffer at once. Split it into smaller requests.",
            )
            return
        handle = self.ring.write(memoryview(block).cast("B"))
        request.meta.lengths = [int(a.size) for a in arrays]
        self.to_scheduler.send(
            TokenizedRequest(
                meta=request.meta,
                tokens=RingRef(handle, block.nbytes),
                tokenize_seconds=time.perf_counter() - started,
            )
        )

    def _checked_lengths(
        self, inputs: list[list[int]] | list[np.ndarray], counted_in_part: list[bool] | None
    ) -> list[np.ndarray]:
        arrays = [np.asarray(ids, dtype="<i4") for ids in inputs]
        for index, ids in enumerate(arrays):
            if ids.size == 0:
                raise InputEmpty(index)
            if ids.size > self.context_length:
                if not self.truncate:
                    in_part = bool(counted_in_part and counted_in_part[index])
                    raise InputTooLong(index, int(ids.size), self.context_length, in_part)
                # NOTE: only token-id inputs reach here when truncating: texts were truncated by the
                # tokenizer itself, which keeps the closing special tokens; so must this.
                arrays[index] = truncate_ids(ids, self.context_length, self.tokenizer.closing_ids)
        return arrays


def chunks(texts: list[str]) -> list[tuple[int, int]]:
    """[first, end) bounds of consecutive runs of at most `CHUNK_TEXTS` texts and, past their first
    text, `CHUNK_CHARS` characters."""
    bounds, first, chars = [], 0, 0
    for i, text in enumerate(texts):
        if i > first and (i - first == CHUNK_TEXTS or chars + len(text) > CHUNK_CHARS):
            bounds.append((first, i))
            first, chars = i, 0
        chars += len(text)
    if first < len(texts):
        bounds.append((first, len(texts)))
    return bounds


def _split_probes(msgs: list[TokenizerInput]) -> tuple[list[TokenizerInput], list[TokenizerInput]]:
    """Health probes, and everything else in its order."""
    probes: list[TokenizerInput] = []
    rest: list[TokenizerInput] = []
    for msg in msgs:
        (probes if isinstance(msg, EmbedRequest) and msg.meta.probe else rest).append(msg)
    return probes, rest


def _input_field(request: EmbedRequest) -> str:
    """The request field an error is about: OpenAI's `input`, or /encode's `text` / `input_ids`."""
    if request.meta.api == "openai":
        return "input"
    return "text" if request.texts is not None else "input_ids"


def truncate_ids(ids: np.ndarray, limit: int, closing: list[int]) -> np.ndarray:
    """The first `limit` ids, but ending as the tokenizer ends a text (e.g. [SEP], or the EOS that
    last-token pooling reads) when `ids` ends that way, as the tokenizer's own truncation does."""
    tail = len(closing)
    if tail and tail < limit and ids[-tail:].tolist() == closing:
        return np.concatenate([ids[: limit - tail], ids[-tail:]])
    return ids[:limit]


def _split_token_ids(request: EmbedRequest) -> list[np.ndarray]:
    flat = np.frombuffer(request.token_ids or b"", dtype="<i4")
    bounds = np.cumsum([0, *(request.token_lengths or [])])
    return [flat[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


def run_tokenizer_process(args: ServerArgs, ports: PortArgs, conn: Connection) -> None:
    # NOTE: one tokenizer thread: the cores belong to the model executor.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with child_process("tokenizer", args.log_level, conn) as launcher:
        worker = TokenizerWorker(args, ports, zmq.Context())
        launcher.ready()
        worker.run_forever()
