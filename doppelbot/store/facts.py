"""Facts about the owner in the store, and the cache of their embeddings.

Facts are short texts ("I live in Berlin") the bot may put into a prompt. They are keyed by the
SHA-256 of their *normalised* text (NFC, whitespace collapsed, trimmed), so adding or importing
the same fact twice never duplicates it. Embeddings are derived data: cached per
``(embedding model, text hash)`` as little-endian float32 blobs so each fact is encoded once per
model, and a fact edited by re-adding gets a new hash (and a fresh embedding) automatically.

This module is core: no numpy, no sentence-transformers. ``doppelbot.knowledge`` turns the blobs
into matrices.

Import files (``import_facts``) — the rule, by file extension:

* ``.csv``: UTF-8 (a BOM is fine), comma-separated, a header row with a ``fact`` column (any
  case; other columns are ignored). Each row's ``fact`` cell is one fact; empty cells and blank
  rows are skipped. A row with a different number of fields than the header is an error
  (usually an unquoted comma inside a fact).
* ``.txt``: one fact per non-blank line. A leading bullet (``-``, ``*``, ``•``) is dropped.
* ``.md`` / ``.markdown``: one fact per paragraph (lines between blank lines, joined with a
  space, as Markdown renders them), except that every list item (``-``, ``*``, ``+``, ``1.``,
  ``1)``) is a fact of its own, with its wrapped continuation lines. Headings (``#``…) are
  skipped.

An import is all or nothing: the whole file is parsed first (any problem → ``ImportFormatError``
naming the file and line), then every fact is written in one transaction.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import sqlite3
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppelbot.core.domain import Fact
from doppelbot.core.errors import ImportFormatError, KnowledgeError
from doppelbot.store.database import Database, now
from doppelbot.store.table import Table, from_row

SOURCE_CLI = "cli"
SOURCE_SAVED_MESSAGES = "saved_messages"
CSV_COLUMN = "fact"
TEXT_SUFFIXES = (".txt",)
MARKDOWN_SUFFIXES = (".md", ".markdown")
CSV_SUFFIXES = (".csv",)

_WS_RE = re.compile(r"\s+")
_TXT_BULLET_RE = re.compile(r"^(?:[-*•])\s+")
_MD_ITEM_RE = re.compile(r"^(?:[-*+•]|\d{1,3}[.)])\s+")
_MD_HEADING_RE = re.compile(r"^#{1,6}(?:\s|$)")


# --- normalisation ------------------------------------------------------------------------------
def normalize_fact(text: str) -> str:
    """The stored form of a fact: NFC, every whitespace run one space, trimmed."""
    return _WS_RE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def fact_hash(text: str) -> str:
    """The natural key of a fact: SHA-256 (hex) of its normalised text."""
    return hashlib.sha256(normalize_fact(text).encode("utf-8")).hexdigest()


FACTS = Table("facts", ("fact_id", "text", "text_hash", "source", "created_at"), ("text_hash",))
FACT_EMBEDDINGS = Table(
    "fact_embeddings", ("model", "text_hash", "dim", "vector", "created_at"), ("model", "text_hash")
)
_NEW_FACT = FACTS.insert(columns=("text", "text_hash", "source", "created_at"), conflict="ignore")


# --- facts --------------------------------------------------------------------------------------
def _row_fact(r: Any) -> Fact:
    return from_row(Fact, r)


@dataclass(frozen=True, slots=True)
class AddResult:
    fact: Fact
    created: bool  # False: the same (normalised) text was already known


async def add_fact_ex(db: Database, text: str, source: str = SOURCE_CLI) -> AddResult:
    """Add one fact (idempotent); says whether it was new."""
    clean = normalize_fact(text)
    if not clean:
        raise KnowledgeError("a fact cannot be empty")
    digest = fact_hash(clean)
    async with db.transaction() as conn:
        cur = await conn.execute(_NEW_FACT, (clean, digest, source, now()))
        created = cur.rowcount == 1
        async with conn.execute(FACTS.select("text_hash = ?"), (digest,)) as c:
            row = await c.fetchone()
    assert row is not None  # inserted or already there, inside the same transaction
    return AddResult(_row_fact(row), created)


async def add_fact(db: Database, text: str, source: str = SOURCE_SAVED_MESSAGES) -> Fact:
    """Add one fact, or return the existing one with the same normalised text.

    The review workflow's ``/fact`` command calls this with the owner's Saved Messages text.
    Raises ``KnowledgeError`` for an empty text.
    """
    return (await add_fact_ex(db, text, source)).fact


async def get_fact(db: Database, fact_id: int) -> Fact | None:
    return await FACTS.rows(db, "fact_id = ?", (fact_id,)).one(_row_fact)


async def list_facts(db: Database) -> list[Fact]:
    return await FACTS.rows(db, tail="ORDER BY fact_id").all(_row_fact)


async def count_facts(db: Database) -> int:
    return int(await db.scalar("SELECT count(*) FROM facts"))


async def remove_fact(db: Database, fact_id: int) -> Fact | None:
    """Delete a fact and its cached embeddings; returns what was removed (None: no such id)."""
    async with db.transaction() as conn:
        async with conn.execute(FACTS.select("fact_id = ?"), (fact_id,)) as c:
            row = await c.fetchone()
        if row is None:
            return None
        await conn.execute("DELETE FROM facts WHERE fact_id = ?", (fact_id,))
        # The owner removing a fact expects it gone, derived vectors included.
        await conn.execute("DELETE FROM fact_embeddings WHERE text_hash = ?", (row["text_hash"],))
    return _row_fact(row)


async def facts_signature(db: Database) -> tuple[int, int]:
    """A cheap fingerprint of the fact set: (count, highest id).

    ``fact_id`` is AUTOINCREMENT, so ids are never reused: any add raises the highest id and a
    removal alone lowers the count. A retriever compares this before each query to notice facts
    changed by another process (``doppelbot facts add`` while the bot runs).
    """
    row = await db.fetchone("SELECT count(*) AS n, coalesce(max(fact_id), 0) AS newest FROM facts")
    return int(row["n"]), int(row["newest"])


@dataclass(frozen=True, slots=True)
class StoredFact:
    """A fact with its key and, when cached for the asked model, its embedding blob."""

    fact_id: int
    text: str
    text_hash: str
    dim: int | None
    vector: bytes | None


async def facts_with_embeddings(db: Database, model: str) -> list[StoredFact]:
    """Every fact with its cached embedding for ``model`` (None where not cached yet)."""
    rows = await db.fetchall(
        "SELECT f.fact_id, f.text, f.text_hash, e.dim, e.vector FROM facts f "
        "LEFT JOIN fact_embeddings e ON e.model = ? AND e.text_hash = f.text_hash "
        "ORDER BY f.fact_id",
        (model,),
    )
    return [from_row(StoredFact, r) for r in rows]


# --- embedding cache ----------------------------------------------------------------------------
async def get_embeddings(
    db: Database, model: str, hashes: Iterable[str]
) -> dict[str, tuple[int, bytes]]:
    """Cached ``(dim, float32 blob)`` per text hash for ``model``; misses are absent."""
    wanted = list(dict.fromkeys(hashes))
    found: dict[str, tuple[int, bytes]] = {}
    for start in range(0, len(wanted), 500):  # stay far below SQLite's variable limit
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = await db.fetchall(
            f"SELECT text_hash, dim, vector FROM fact_embeddings "
            f"WHERE model = ? AND text_hash IN ({marks})",
            (model, *chunk),
        )
        for r in rows:
            found[str(r["text_hash"])] = (int(r["dim"]), bytes(r["vector"]))
    return found


async def put_embeddings(db: Database, model: str, items: Iterable[tuple[str, int, bytes]]) -> int:
    """Cache ``(text_hash, dim, float32 blob)`` rows for ``model`` in one transaction."""
    rows = []
    stamp = now()
    for digest, dim, blob in items:
        if dim <= 0 or len(blob) != dim * 4:
            raise KnowledgeError(
                f"embedding for {digest[:12]} has {len(blob)} bytes, expected {dim} float32"
            )
        rows.append((model, digest, dim, blob, stamp))
    if not rows:
        return 0
    async with db.transaction() as conn:
        await conn.executemany(FACT_EMBEDDINGS.insert(conflict="update"), rows)
    return len(rows)


# --- import -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ParsedFact:
    text: str
    line: int  # 1-based line where the fact starts in the file


@dataclass(frozen=True, slots=True)
class ImportResult:
    path: Path
    found: int  # facts in the file, duplicates included
    added: int  # new facts written
    known: int  # already in the store, or repeated in the file


def _fail(path: Path, line: int | None, problem: str) -> ImportFormatError:
    where = f"{path.name}: line {line}: " if line else f"{path.name}: "
    return ImportFormatError(where + problem)


def _decode(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        line = raw.count(b"\n", 0, exc.start + bom) + 1
        bad = raw[exc.start + bom : exc.start + bom + 1].hex()
        raise _fail(path, line, f"not valid UTF-8 (byte 0x{bad}); save the file as UTF-8") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise _fail(path, text.count("\n", 0, nul) + 1, "contains a NUL byte (a binary file?)")
    return text


def _parse_csv(path: Path, text: str) -> list[ParsedFact]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    facts: list[ParsedFact] = []
    header: list[str] | None = None
    column = -1
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                if CSV_COLUMN not in header:
                    names = ", ".join(repr(h) for h in row)
                    raise _fail(path, line, f"no `{CSV_COLUMN}` column in the header ({names})")
                column = header.index(CSV_COLUMN)
                continue
            if len(row) != len(header):
                raise _fail(
                    path,
                    line,
                    f"{len(row)} fields where the header has {len(header)} "
                    "(quote facts that contain commas)",
                )
            cell = normalize_fact(row[column])
            if cell:
                facts.append(ParsedFact(cell, line))
    except csv.Error as exc:
        raise _fail(path, reader.line_num or None, f"bad CSV: {exc}") from None
    if header is None:
        raise _fail(path, None, f"empty file (expected a header with a `{CSV_COLUMN}` column)")
    return facts


def _parse_txt(text: str) -> list[ParsedFact]:
    facts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        clean = normalize_fact(_TXT_BULLET_RE.sub("", raw.strip()))
        if clean:
            facts.append(ParsedFact(clean, number))
    return facts


def _parse_markdown(text: str) -> list[ParsedFact]:
    facts: list[ParsedFact] = []
    parts: list[str] = []
    first = 0

    def flush() -> None:
        clean = normalize_fact(" ".join(parts))
        if clean:
            facts.append(ParsedFact(clean, first))
        parts.clear()

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            flush()
            continue
        if _MD_HEADING_RE.match(line):
            flush()
            continue
        item = _MD_ITEM_RE.match(line)
        if item:
            flush()
            line = line[item.end() :]
        if not parts:
            first = number
        parts.append(line)
    flush()
    return facts


def parse_facts_text(path: Path, raw: bytes) -> list[ParsedFact]:
    """The facts of an import file's bytes, by the rule in the module docstring."""
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + TEXT_SUFFIXES + MARKDOWN_SUFFIXES:
        raise _fail(
            path, None, f"unsupported file type {suffix or '(none)'!r}; use .csv, .txt or .md"
        )
    text = _decode(path, raw)
    if suffix in CSV_SUFFIXES:
        facts = _parse_csv(path, text)
    elif suffix in MARKDOWN_SUFFIXES:
        facts = _parse_markdown(text)
    else:
        facts = _parse_txt(text)
    if not facts:
        raise _fail(path, None, "no facts found in the file")
    return facts


def parse_facts_file(path: Path) -> list[ParsedFact]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ImportFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImportFormatError(f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise ImportFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_facts_text(path, raw)


async def import_facts(db: Database, path: Path, source: str | None = None) -> ImportResult:
    """Import a facts file (rule in the module docstring): all of it, or nothing.

    Idempotent: facts already known (same normalised text) are counted, not duplicated.
    ``source`` defaults to ``import:<file name>``.
    """
    path = Path(path)
    parsed = parse_facts_file(path)
    src = source or f"import:{path.name}"
    stamp = now()
    try:
        async with db.transaction() as conn:
            async with conn.execute("SELECT count(*) FROM facts") as c:
                before = int((await c.fetchone())[0])
            await conn.executemany(
                _NEW_FACT,
                [(item.text, fact_hash(item.text), src, stamp) for item in parsed],
            )
            async with conn.execute("SELECT count(*) FROM facts") as c:
                added = int((await c.fetchone())[0]) - before
    except sqlite3.Error as exc:  # the transaction rolled back: nothing of the file is stored
        raise KnowledgeError(f"importing {path.name} failed, nothing was written: {exc}") from exc
    return ImportResult(path=path, found=len(parsed), added=added, known=len(parsed) - added)
