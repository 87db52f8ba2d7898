"""Building the dataset from the SQLite store, with stage 1 in forked worker processes.

Chats are independent until deduplication, so big histories are read and made into
``candidates.ChatPart``s by worker processes, a run of chats each, while this process merges
the finished runs in chat id order (``DatasetBuilder.add_chunk``): the output is identical to
a one-process build. The store's reads are ``doppelbot.store.dataset_reads`` (read-only: safe
beside a running bot).

Several own accounts are one doppelganger: the build reads every account's chats (or the one
asked for). The owner is whichever own account wrote a message; a chat between two own
accounts is skipped (both sides are the owner); a contact reached from two accounts has the same
chat id in both, so it is one contact to deduplication and the per-contact cap — its chats are
merged one after the other, in (chat id, account) order.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

from doppelbot.core.domain import Peer
from doppelbot.core.errors import DatasetError
from doppelbot.dataset.budget import CountTokens
from doppelbot.dataset.builder import (
    ChatSource,
    DatasetBuilder,
    DatasetResult,
    Progress,
    gc_paused,
)
from doppelbot.dataset.candidates import ChatMaker, MadeChunk
from doppelbot.dataset.options import DatasetOptions
from doppelbot.dataset.rules import chat_skip_reason
from doppelbot.dataset.stats import AccountStats
from doppelbot.store.dataset_reads import (
    chat_message_counts,
    chat_rows,
    chats_with_peers,
    open_readonly,
    own_accounts,
    transcribed_notes,
)

MIN_MESSAGES_PER_WORKER = 50_000
"""Below this many messages per worker process, building in-process is faster than forking."""


def default_workers() -> int:
    """Worker processes for ``build_from_db``: two whenever there are two cores or more, else
    none (in-process). The parent merges the workers' chats (about a third of the work) while
    they go on, so even on two cores two workers beat one process: measured on this project's
    2-core machine, 1M messages took 1.4–1.9× less wall time than in-process."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


class _ChatSpec(NamedTuple):
    """A chat chosen for the dataset."""

    chat_id: int
    name: str  # for the stats
    names: tuple[str | None, ...]  # the other person's names, for keep_names=False
    account_id: int
    account: str  # the own account's name


def build_from_db(
    db_path: Path | str,
    options: DatasetOptions,
    *,
    count_tokens: CountTokens | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    account: str | None = None,
) -> DatasetResult:
    """Build the dataset from the SQLite store (read-only; safe beside a running bot), from
    every own account's chats, or only from ``account``'s.

    With ``workers`` > 1 (default: ``default_workers()``) runs of chats are read and made in
    forked worker processes and merged here in chat id order: the output is identical to a
    single-process build. Small histories (under ``MIN_MESSAGES_PER_WORKER`` messages per
    worker) and platforms without ``fork`` build in this process.
    """

    with gc_paused():
        conn = open_readonly(db_path)
        try:
            started = time.perf_counter()
            everyone = own_accounts(conn)
            owners = frozenset(a.user_id for a in everyone if a.user_id is not None)
            chosen_accounts = [a for a in everyone if account is None or a.name == account]
            if not chosen_accounts:
                known = ", ".join(a.name for a in everyone)
                raise DatasetError(f"no account named {account!r} (known: {known})")
            voice: set[tuple[str, int, int]] = set()
            chats: list[tuple[int, Peer | None, int, str, int | None]] = []
            for own in chosen_accounts:
                if options.voice_transcripts:
                    notes = transcribed_notes(conn, own.account_id)
                    voice.update((own.name, chat, mid) for chat, mid in notes)
                chats += [
                    (chat_id, peer, own.account_id, own.name, own.user_id)
                    for chat_id, peer in chats_with_peers(conn, own.account_id)
                ]
            builder = DatasetBuilder(
                options, count_tokens=count_tokens, progress=progress, voice_notes=voice
            )
            stats = builder.stats
            stats.chats_total = len(chats)
            chosen: list[_ChatSpec] = []
            for chat_id, peer, account_id, name, user_id in chats:
                reason = chat_skip_reason(
                    chat_id,
                    peer,
                    user_id,
                    options.include_groups,
                    owners - {user_id} if user_id is not None else owners,
                )
                if reason is not None:
                    stats.chats_skipped[reason] = stats.chats_skipped.get(reason, 0) + 1
                elif peer is None:
                    chosen.append(_ChatSpec(chat_id, str(chat_id), (), account_id, name))
                else:
                    names = (peer.first_name, peer.last_name, peer.username)
                    chosen.append(_ChatSpec(chat_id, peer.display_name, names, account_id, name))
            # one contact's chats from several accounts are merged one after the other
            chosen.sort(key=lambda spec: (spec.chat_id, spec.account_id))
            if len(everyone) > 1:
                # every account listed, also one whose chats were all skipped
                for own in chosen_accounts:
                    stats.per_account.setdefault(own.name, AccountStats(own.name))
            if not chosen:
                raise DatasetError(
                    "no chats to build a dataset from: export your history first "
                    "(`doppelbot export` or `doppelbot import`)"
                    + ("" if options.include_groups or not chats else "; or try --include-groups")
                )
            n_workers = default_workers() if workers is None else max(1, workers)
            chunks: list[list[_ChatSpec]] = []
            if n_workers > 1 and len(chosen) > 1 and _can_fork():
                counts = {
                    (own.account_id, chat_id): n
                    for own in chosen_accounts
                    for chat_id, n in chat_message_counts(conn, own.account_id).items()
                }
                sizes = [counts.get((spec.account_id, spec.chat_id), 0) for spec in chosen]
                if sum(sizes) >= n_workers * MIN_MESSAGES_PER_WORKER:
                    chunks = _chunks(chosen, sizes, n_workers)
            read_s = time.perf_counter() - started
            if not chunks:
                read_s += _build_in_process(builder, conn, chosen, bool(voice))
        finally:
            conn.close()
        if chunks:
            read_s += _build_in_workers(builder, Path(db_path), chunks, n_workers, bool(voice))
        stats.seconds["read"] = round(read_s, 3)
        return builder.finish()


def _can_fork() -> bool:
    # fork, not spawn: the duplicate keys are str hashes, salted per interpreter, and forked
    # workers share the parent's salt (macOS lists fork but it is unsafe there)
    return "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"


def _chunks(chosen: list[_ChatSpec], sizes: list[int], workers: int) -> list[list[_ChatSpec]]:
    """Consecutive runs of chats, each about a quarter of what is left per worker (so at
    least four per worker), shrinking towards the end: the workers stay busy while the parent
    merges finished ones, and the parent's last merge, after the workers are done, is short."""
    remaining = sum(sizes)
    smallest = max(1, remaining // (workers * 32))
    chunks: list[list[_ChatSpec]] = [[]]
    filled = 0
    target = max(smallest, remaining // (workers * 4))
    for spec, size in zip(chosen, sizes, strict=True):
        if filled >= target:
            chunks.append([])
            filled = 0
            target = max(smallest, remaining // (workers * 4))
        chunks[-1].append(spec)
        filled += size
        remaining -= size
    return chunks


def _build_in_process(
    builder: DatasetBuilder, conn: sqlite3.Connection, chosen: list[_ChatSpec], voice: bool
) -> float:
    """Stage 1 chat by chat in this process; returns the seconds spent reading."""

    read_s = 0.0
    progress = builder.progress
    for done, (chat_id, name, names, account_id, account) in enumerate(chosen, 1):
        started = time.perf_counter()
        rows = chat_rows(conn, chat_id, transcripts=voice, account_id=account_id)
        read_s += time.perf_counter() - started
        builder.add_chat(ChatSource(chat_id, rows, name, names, account))
        if progress is not None:
            progress("chats", done, len(chosen))
    return read_s


def _build_in_workers(
    builder: DatasetBuilder,
    db_path: Path,
    chunks: list[list[_ChatSpec]],
    workers: int,
    voice: bool,
) -> float:
    """Stage 1 in forked worker processes, merged here in chunk (= chat id) order while the
    workers go on with later chunks; returns the seconds the workers spent reading, summed.

    Tried on this project's 2-core machine: letting this process also build chunks whenever
    the next one to merge was not ready was no faster than two workers and a merging parent
    (the parent's merging is about a third of the work)."""
    progress = builder.progress
    total = sum(map(len, chunks))
    done = 0
    read_s = 0.0
    started = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        jobs = [
            pool.submit(
                make_chunk,
                db_path,
                builder.options,
                [(spec.chat_id, spec.names, spec.account_id) for spec in chunk],
                voice,
            )
            for chunk in chunks
        ]
        for chunk, job in zip(chunks, jobs, strict=True):
            made = job.result()
            read_s += made.read_s
            builder.add_chunk(made, [spec.name for spec in chunk], [spec.account for spec in chunk])
            done += len(chunk)
            if progress is not None:
                progress("chats", done, total)
    builder.stats.seconds["chats_wall"] = round(time.perf_counter() - started, 3)
    return read_s


def make_chunk(
    db_path: Path,
    options: DatasetOptions,
    chats: list[tuple[int, tuple[str | None, ...], int]],
    voice: bool = False,
) -> MadeChunk:
    """A worker process's job: read and make some chats (``(chat_id, the other person's
    names, own account id)``), each a packed ``ChatPart``, in order."""

    maker = ChatMaker(options)
    parts = []
    read_s = build_s = 0.0
    # Acyclic tuples only (see ``builder.gc_paused``); the collector's state is restored, as
    # this also runs in the calling process.
    with gc_paused():
        conn = open_readonly(db_path)
        try:
            for chat_id, names, account_id in chats:
                started = time.perf_counter()
                rows = chat_rows(conn, chat_id, transcripts=voice, account_id=account_id)
                read_s += time.perf_counter() - started
                parts.append(maker.part(chat_id, rows, names, pack=True))
                build_s += time.perf_counter() - started
        finally:
            conn.close()
    return MadeChunk(parts, maker.counters, maker.pii, read_s, build_s - read_s)
