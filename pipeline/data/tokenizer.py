"""GPT-2 tokens from documents: tiktoken `gpt2` with the end-of-text token before every
document, tokenized in parallel worker processes with bounded memory and the source order
preserved. No `datasets` here: training and evaluation import the tokenizer from this module.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from functools import lru_cache

import numpy as np
import tiktoken

from pipeline.errors import DataError, PrepareError

TOKENIZER = "gpt2"
"""The tiktoken encoding of every shard (the manifest's "tokenizer")."""
VOCAB_SIZE = 50257
"""`n_vocab` of `gpt2`: ids 0..50256, so every id fits uint16."""
EOT = 50256
"""`<|endoftext|>`: precedes every document. `encode_ordinary` never produces it (it is a special
token, not a BPE rank), so its positions in a token stream are exactly the document starts."""

OPENAI_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
"""OpenAI's GPT-2 BPE files (under OPENAI_FILES) and their sha256: what tiktoken builds `gpt2`
from (tiktoken_ext.openai_public.gpt2 pins the same URLs and hashes). Hugging Face's GPT-2
tokenizer reads the same files as vocab.json and merges.txt."""

IN_FLIGHT_PER_WORKER = 2
"""Batches queued per worker process: enough to keep every worker busy while the main process
reads the next documents, few enough that memory stays bounded (a whole dataset is never read
ahead)."""
PARENT_POLL_S = 1.0
"""How often a worker checks that the process that started it is still alive."""


# --------------------------------------------------------------------------- tokenizer


@lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The tiktoken `gpt2` encoding, loaded once per process.

    Raises PrepareError when its files can be neither found in TIKTOKEN_CACHE_DIR nor downloaded.
    """
    try:
        return tiktoken.get_encoding(TOKENIZER)
    except Exception as e:  # tiktoken raises requests/OS errors of several kinds offline
        raise PrepareError(
            f"cannot load the {TOKENIZER!r} tokenizer ({type(e).__name__}: {e}); without network "
            "set TIKTOKEN_CACHE_DIR to a folder holding its files (e.g. shared/data/tiktoken_cache)"
        ) from e


def gpt2_files() -> dict[str, bytes]:
    """OpenAI's encoder.json and vocab.bpe (GPT2_FILES), the files of tiktoken's `gpt2`, read
    the way tiktoken reads them: from its cache (TIKTOKEN_CACHE_DIR, each file named by the
    sha1 of its URL) or downloaded into it, and checked against their sha256. Raises DataError
    when they can be neither found nor downloaded."""
    from tiktoken.load import read_file_cached

    try:
        return {
            name: read_file_cached(OPENAI_FILES + name, sha) for name, sha in GPT2_FILES.items()
        }
    except Exception as e:  # requests/OS errors offline, ValueError for a hash mismatch
        raise DataError(
            f"cannot read the {TOKENIZER!r} tokenizer files ({type(e).__name__}: {e}); without "
            "network set TIKTOKEN_CACHE_DIR to a folder holding them (e.g. "
            "shared/data/tiktoken_cache)"
        ) from e


def tokenize_batch(docs: list[str]) -> np.ndarray:
    """Tokenize documents into one stream: (sum of len(doc tokens) + len(docs),) uint16.

    Each document is preceded by EOT (50256) and encoded as ordinary text: special-token text
    such as "<|endoftext|>" inside a document is encoded as plain text, as `encode_ordinary`
    does. `encode_to_numpy` with no special token allowed or disallowed gives the same ids as
    a uint32 array without building a Python list (the stage runs faster than
    `encode_ordinary_batch`, see BENCHMARKS.md). Raises PrepareError when an id does not fit
    uint16, before the cast could wrap it around.
    """
    enc = get_encoding()
    eot = np.array([EOT], dtype=np.uint32)
    parts = []
    for doc in docs:
        parts += (eot, enc.encode_to_numpy(doc, disallowed_special=()))
    ids = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)
    if ids.size and int(ids.max()) >= 2**16:
        raise PrepareError(
            f"token id {int(ids.max())} does not fit uint16 (0..65535): the shard format "
            "stores uint16 ids, so the tokenizer must have at most 65,536 tokens"
        )
    return ids.astype(np.uint16)


def split_documents(tokens: np.ndarray) -> list[np.ndarray]:
    """Cut a stream from `tokenize_batch` at its EOTs: one view per document, each starting
    with EOT. Raises PrepareError when the stream does not start with EOT."""
    if tokens.size == 0:
        return []
    if tokens[0] != EOT:
        raise PrepareError("a token stream must start with EOT (50256); use tokenize_batch")
    starts = np.flatnonzero(tokens == EOT)
    return np.split(tokens, starts[1:])


def resolve_num_workers(num_workers: int) -> int:
    """Worker processes for num_workers (0 = one per CPU core this process may run on)."""
    if num_workers:
        return num_workers
    if hasattr(os, "sched_getaffinity"):  # a container may pin fewer cores than the host has
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _load_worker() -> None:
    """Load the encoding once per worker process, not per batch."""
    get_encoding()


def _exit_with_parent(parent: int) -> None:
    """Stop this worker once its parent is gone (reparented). A parent killed with SIGKILL
    cannot stop its pool, and idle workers would otherwise wait for tasks forever."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _init_worker() -> None:
    """Pool initializer: ignore Ctrl-C (the parent stops the pool; a worker interrupted too
    would print a traceback), watch the parent process, then load the encoding."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch = threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True)
    watch.start()
    _load_worker()


def tokenize_documents(
    docs: Iterable[str], num_workers: int = 0, docs_per_task: int = 512
) -> Iterator[np.ndarray]:
    """Tokenize documents in parallel: yields one `tokenize_batch` result per docs_per_task
    documents, in source order.

    Documents are read in the calling process and handed to num_workers processes (0 = one per
    core; 1 = tokenize inline) with at most IN_FLIGHT_PER_WORKER batches per worker in flight,
    so memory stays bounded however long the stream is. The output does not depend on
    num_workers. Close the generator (e.g. `contextlib.closing`) to stop the workers early.
    """
    workers = resolve_num_workers(num_workers)
    if workers == 1:
        for batch in _batched(docs, docs_per_task):
            yield tokenize_batch(batch)
        return
    get_encoding()  # a missing tokenizer fails here, once, not in every worker
    with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
        # Start the workers before the first document is read: they fork from a process that
        # has not yet started the stream's reader threads.
        for f in [pool.submit(_load_worker) for _ in range(workers)]:
            f.result()
        in_flight: deque[Future[np.ndarray]] = deque()
        try:
            for batch in _batched(docs, docs_per_task):
                if len(in_flight) >= IN_FLIGHT_PER_WORKER * workers:
                    yield in_flight.popleft().result()
                in_flight.append(pool.submit(tokenize_batch, batch))
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for f in in_flight:  # stopped early: drop queued batches instead of finishing them
                f.cancel()
