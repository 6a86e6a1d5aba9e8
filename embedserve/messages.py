"""Every message that crosses a process boundary, grouped by the process that receives it.

Messages are msgspec structs encoded as msgpack: typed, compact, and never unpickled. Bulk data
(token ids, embeddings, encoded response bodies) does not travel here: a message carries a
`RingRef` into a shared-memory ring and the receiver reads the bytes from there.

Pipeline:  http -> tokenizer -> scheduler -> executor -> detokenizer -> http
Side paths: tokenizer -> http (input errors), executor -> scheduler (batch done),
            launcher -> http (server state).
"""

from __future__ import annotations

from typing import Literal

import msgspec


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True, tag_field="kind"):
    """Base of every wire message: positional encoding, a type tag for unions, no GC tracking."""


class RingRef(msgspec.Struct, array_like=True, gc=False):
    offset: int  # handle returned by ShmRing.write: where the block lives in the ring
    nbytes: int  # payload size; the receiver checks it against the ring's own header


class RequestMeta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What the output process needs to build a response; travels with the request's first batch."""

    rid: str
    api: Literal["openai", "encode"]  # which response shape to build
    model: str  # model name echoed back in OpenAI responses
    lengths: list[int]  # prompt tokens of each input, in input order
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # keep the first N components, then re-normalise
    single: bool = False  # /encode with one input answers an object, not a list
    arrival_time: float = 0.0  # time.time() when HTTP accepted the request
    client_ids: list[str] | None = None  # /encode's `rid` (SGLang's), one per input: meta_info.id
    probe: bool = False  # /health_generate's: admitted whatever the queue holds, and scheduled first


# ---- to the tokenizer (from http) ------------------------------------------------------------
class EmbedRequest(_Msg):
    meta: RequestMeta  # lengths left empty: the tokenizer fills them
    texts: list[str] | None = None  # text inputs, or
    token_ids: bytes | None = None  # pre-tokenized inputs, int32 little-endian, concatenated
    token_lengths: list[int] | None = None  # split points of token_ids, one length per input


class AbortRequest(_Msg):
    rid: str  # the client went away: drop the request wherever it is


# ---- to the scheduler (from tokenizer, executor) -----------------------------------------------
class TokenizedRequest(_Msg):
    meta: RequestMeta  # lengths filled in
    tokens: RingRef  # int32 token ids of every input, concatenated in input order
    tokenize_seconds: float = 0.0  # time in the tokenizer, for the metrics


class FlushCache(_Msg):
    """Drop every cached prefix and embedding; http waits for the FlushDone with the same id."""

    flush_id: str


class BatchDone(_Msg):
    batch_id: int
    forward_seconds: float  # time spent in the model forward, for the batch log and metrics
    failed_rids: list[str] = []  # the forward failed: these requests already got a 500, drop the rest of them


# ---- to the executor (from scheduler) -----------------------------------------------------------
class SeqRef(msgspec.Struct, array_like=True, gc=False):
    rid: str
    index: int  # position of this input within its request
    tokens: RingRef  # the request's whole token block (ring handles name blocks, not slices)
    start: int  # first token to compute, within the block (the input's start + its cached prefix)
    length: int  # tokens to compute in this batch; 0 for a whole-input cache hit
    cached: int = 0  # tokens of this input answered from a cache (KV prefix, or all of it on a hit)
    emb_slot: int = -1  # whole-input cache slot: read from it on a hit, else store the result in it
    emb_hit: bool = False
    final: bool = True  # False for a chunk before the last: its row is not the input's embedding


class KvPlan(msgspec.Struct, array_like=True, gc=False):
    """Where the KV of the batch's computed sequences lives in the executor's pool (page size 1)."""

    prefix_lens: list[int]  # per computed sequence (length > 0), in batch order: slots already filled
    prefix_slots: bytes  # int32 LE, every computed sequence's prefix slots, concatenated
    new_slots: bytes  # int32 LE, one slot per computed token, where its K/V goes


class ForwardBatch(_Msg):
    batch_id: int
    seqs: list[SeqRef]
    kv: KvPlan | None = None  # causal models through the KV pool; None: a plain packed forward
    new_requests: list[RequestMeta] = []  # metas the output process has not seen yet
    dropped: list[str] = []  # rids the output process must forget (aborted requests)


class DropRequests(_Msg):
    rids: list[str]  # forwarded to the output process in order with the batches


# ---- to the detokenizer / output process (from executor) ---------------------------------------
class BatchEmbeddings(_Msg):
    batch_id: int
    rows: list[tuple[str, int]]  # (rid, input index) of each embedding row, in row order
    row_cached: list[int]  # cached tokens of each row's input
    embeddings: RingRef | None  # float32 [len(rows), dim] row-major; None when the batch failed
    dim: int
    new_requests: list[RequestMeta] = []
    dropped: list[str] = []
    error: str | None = None  # the forward failed: every request in rows fails with this message


# ---- to http (from tokenizer, detokenizer, launcher) --------------------------------------------
class ResponseReady(_Msg):
    rid: str
    body: RingRef  # the encoded JSON response body
    prompt_tokens: int = 0  # tokens served, for the metrics
    cached_tokens: int = 0  # of which answered from a cache
    output_seconds: float = 0.0  # time the output process spent encoding this response, for the metrics


class SchedulerStats(_Msg):
    """The scheduler's state and what it observed since its last report; the HTTP process exports it."""

    waiting_seqs: int  # inputs queued for the model
    waiting_tokens: int
    running_seqs: int  # inputs at the executor
    running_tokens: int
    max_total_tokens: int  # tokens the executor may hold at once
    batch_seqs: list[int] = []  # size of each batch formed since the last report
    batch_tokens: list[int] = []
    queue_wait_seconds: list[float] = []  # per scheduled input: arrival at the scheduler -> batch
    tokenize_seconds: list[float] = []  # per request, reported by the tokenizer
    forward_seconds: list[float] = []  # per batch, reported by the executor


class RequestFailed(_Msg):
    rid: str
    status: int  # HTTP status
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class FlushDone(_Msg):
    flush_id: str
    ok: bool
    message: str = ""


class ServerState(_Msg):
    ready: bool = False  # warm-up passed: /health answers 200
    draining: bool = False  # stopping: refuse new work, finish what is in flight
    abandon: str = ""  # a process died: answer everything in flight with 503 and this reason


TokenizerInput = EmbedRequest | AbortRequest | FlushCache
SchedulerInput = TokenizedRequest | AbortRequest | BatchDone | FlushCache
ExecutorInput = ForwardBatch | DropRequests
DetokenizerInput = BatchEmbeddings | DropRequests
HttpInput = ResponseReady | RequestFailed | ServerState | SchedulerStats | FlushDone
