"""Facts in SQLite: idempotent add/import, removal, the embedding cache, and import files that
are bad (a clear error naming the line, and nothing half-written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from doppelbot.cli import main
from doppelbot.core.errors import ImportFormatError, KnowledgeError
from doppelbot.store.database import Database
from doppelbot.store.facts import (
    SOURCE_SAVED_MESSAGES,
    add_fact,
    add_fact_ex,
    count_facts,
    fact_hash,
    facts_signature,
    facts_with_embeddings,
    get_embeddings,
    get_fact,
    import_facts,
    list_facts,
    normalize_fact,
    put_embeddings,
    remove_fact,
)


def test_normalisation_and_hash() -> None:
    assert normalize_fact("  I  live\n in\tBerlin \n") == "I live in Berlin"
    assert fact_hash("I live in Berlin") == fact_hash(" I live   in Berlin\n")
    assert fact_hash("I live in Berlin") != fact_hash("I live in Moscow")
    # NFC: a composed and a decomposed "й" are the same fact
    assert fact_hash("мой") == fact_hash("мои\u0306")


async def test_add_is_idempotent(db: Database) -> None:
    first = await add_fact(db, "Я живу в Берлине")
    assert first.source == SOURCE_SAVED_MESSAGES and first.text == "Я живу в Берлине"
    again = await add_fact_ex(db, "  Я живу   в Берлине ", source="cli")
    assert not again.created and again.fact == first
    other = await add_fact_ex(db, "I have a cat", source="cli")
    assert other.created and other.fact.source == "cli"
    assert [f.fact_id for f in await list_facts(db)] == [first.fact_id, other.fact.fact_id]
    with pytest.raises(KnowledgeError, match="empty"):
        await add_fact(db, " \n\t")
    assert await count_facts(db) == 2


async def test_remove_deletes_fact_and_its_embeddings(db: Database) -> None:
    keep = await add_fact(db, "I have a cat")
    gone = await add_fact(db, "I live in Berlin")
    blob = b"\x00" * 12
    await put_embeddings(
        db, "m", [(fact_hash(keep.text), 3, blob), (fact_hash(gone.text), 3, blob)]
    )
    removed = await remove_fact(db, gone.fact_id)
    assert removed == gone
    assert await get_fact(db, gone.fact_id) is None
    assert await remove_fact(db, gone.fact_id) is None
    cached = await get_embeddings(db, "m", [fact_hash(keep.text), fact_hash(gone.text)])
    assert list(cached) == [fact_hash(keep.text)]


async def test_signature_sees_every_change(db: Database) -> None:
    empty = await facts_signature(db)
    a = await add_fact(db, "one")
    one = await facts_signature(db)
    await add_fact(db, "one")  # no change
    assert await facts_signature(db) == one != empty
    b = await add_fact(db, "two")
    two = await facts_signature(db)
    await remove_fact(db, a.fact_id)  # a removal alone
    removed = await facts_signature(db)
    await remove_fact(db, b.fact_id)
    await add_fact(db, "three")  # as many facts as in `one`, but a new id
    replaced = await facts_signature(db)
    assert len({empty, one, two, removed, replaced}) == 5


async def test_embedding_cache_round_trip(db: Database) -> None:
    fact = await add_fact(db, "I have a cat")
    digest = fact_hash(fact.text)
    blob = bytes(range(16))
    assert await put_embeddings(db, "model-a", [(digest, 4, blob)]) == 1
    assert await get_embeddings(db, "model-a", [digest, "nope"]) == {digest: (4, blob)}
    assert await get_embeddings(db, "model-b", [digest]) == {}
    with_vectors = await facts_with_embeddings(db, "model-a")
    assert with_vectors[0].vector == blob and with_vectors[0].dim == 4
    assert (await facts_with_embeddings(db, "model-b"))[0].vector is None
    blob2 = bytes(range(16, 32))
    await put_embeddings(db, "model-a", [(digest, 4, blob2)])  # recomputed: replaced
    assert await get_embeddings(db, "model-a", [digest]) == {digest: (4, blob2)}
    with pytest.raises(KnowledgeError, match="expected 5 float32"):
        await put_embeddings(db, "model-a", [(digest, 5, blob)])


# --- import -------------------------------------------------------------------------------------
SEED_CSV = (
    "\ufefffact,note\n"
    "Я живу в Берлине,\n"
    '"Работаю бэкенд-разработчиком, в финтехе",работа\n'
    "\n"
    ",пустая\n"
    '"Факт в две\nстроки",\n'
    "Я живу в Берлине,повтор\n"
)


async def test_import_csv_like_the_seed(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "facts.csv"
    path.write_text(SEED_CSV, encoding="utf-8")
    result = await import_facts(db, path)
    assert (result.found, result.added, result.known) == (4, 3, 1)
    facts = await list_facts(db)
    assert [f.text for f in facts] == [
        "Я живу в Берлине",
        "Работаю бэкенд-разработчиком, в финтехе",
        "Факт в две строки",
    ]
    assert {f.source for f in facts} == {"import:facts.csv"}
    again = await import_facts(db, path)  # idempotent
    assert (again.added, again.known) == (0, 4)
    assert await count_facts(db) == 3


async def test_import_txt_one_fact_per_line(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "facts.txt"
    path.write_text("I live in Berlin\n\n- I have a cat\n  * I play guitar  \n", encoding="utf-8")
    result = await import_facts(db, path)
    assert result.added == 3
    assert [f.text for f in await list_facts(db)] == [
        "I live in Berlin",
        "I have a cat",
        "I play guitar",
    ]


async def test_import_markdown_paragraphs_and_items(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "about.md"
    path.write_text(
        "# About me\n\n"
        "I live in Berlin,\nin Kreuzberg.\n\n"
        "## Hobbies\n"
        "- climbing on Tuesdays\n"
        "- guitar in a band,\n  wrapped line\n"
        "1. first numbered\n"
        "2) second numbered\n\n"
        "I don't drink coffee.\n",
        encoding="utf-8",
    )
    await import_facts(db, path)
    assert [f.text for f in await list_facts(db)] == [
        "I live in Berlin, in Kreuzberg.",
        "climbing on Tuesdays",
        "guitar in a band, wrapped line",
        "first numbered",
        "second numbered",
        "I don't drink coffee.",
    ]


BAD_FILES = [
    ("no-column.csv", b"text,note\nI live in Berlin,x\n", r"no-column\.csv: line 1: no `fact`"),
    ("empty.csv", b"", r"empty\.csv: empty file"),
    ("blank.csv", b"\n\n", r"blank\.csv: empty file"),
    ("header-only.csv", b"fact\n", r"header-only\.csv: no facts found"),
    ("fields.csv", b"fact\nok one\nok two\nI like apples, pears\n", r"line 4: 2 fields"),
    ("quote.csv", b'fact\nok\n"unterminated\n', r"quote\.csv: line \d+: bad CSV"),
    ("latin1.txt", "ok\nalso ok\ncaf\u00e9\n".encode("latin-1"), r"line 3: not valid UTF-8"),
    ("latin1.csv", "fact\nok\ncaf\u00e9\n".encode("cp1252"), r"line 3: not valid UTF-8"),
    ("binary.txt", b"ok\nsecond\x00\n", r"line 2: contains a NUL byte"),
    ("empty.md", b"# just a heading\n\n", r"empty\.md: no facts found"),
    ("facts.json", b'["a"]', r"unsupported file type '\.json'"),
]


@pytest.mark.parametrize(("name", "content", "error"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
async def test_bad_import_files(
    db: Database, tmp_path: Path, name: str, content: bytes, error: str
) -> None:
    existing = await add_fact(db, "already here")
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImportFormatError, match=error):
        await import_facts(db, path)
    assert await list_facts(db) == [existing]  # nothing half-written


async def test_missing_file(db: Database, tmp_path: Path) -> None:
    with pytest.raises(ImportFormatError, match="no such file"):
        await import_facts(db, tmp_path / "nope.csv")
    with pytest.raises(ImportFormatError, match="folder"):
        await import_facts(db, tmp_path)


async def test_failure_while_writing_rolls_back_the_whole_file(
    db: Database, tmp_path: Path
) -> None:
    # A real SQLite failure on the third row of an otherwise valid file.
    await db.execute(
        "CREATE TRIGGER poison BEFORE INSERT ON facts WHEN NEW.text = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
    )
    path = tmp_path / "facts.txt"
    path.write_text("one\ntwo\npoison\nfour\n", encoding="utf-8")
    with pytest.raises(KnowledgeError, match="nothing was written: poisoned row"):
        await import_facts(db, path)
    assert await count_facts(db) == 0
    await add_fact(db, "still writable")  # the transaction was closed properly
    assert await count_facts(db) == 1


# --- CLI (no embedder needed) -------------------------------------------------------------------
def _cli(tmp_path: Path, *args: str) -> list[str]:
    return ["--env-file", "/dev/null", "--data-dir", str(tmp_path), *args]


def test_cli_add_list_remove_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(_cli(tmp_path, "facts", "list"))
    assert "no facts yet" in capsys.readouterr().out
    main(_cli(tmp_path, "facts", "add", "I live in Berlin"))
    assert "added fact #1" in capsys.readouterr().out
    main(_cli(tmp_path, "facts", "add", "I  live in Berlin "))
    assert "already known as fact #1" in capsys.readouterr().out
    csv_path = tmp_path / "f.csv"
    csv_path.write_text("fact\nI have a cat\nI live in Berlin\n", encoding="utf-8")
    main(_cli(tmp_path, "facts", "import", str(csv_path)))
    assert "imported 1 new fact(s) from f.csv (1 already known)" in capsys.readouterr().out
    main(_cli(tmp_path, "facts", "list"))
    out = capsys.readouterr().out
    assert "I live in Berlin" in out and "I have a cat" in out and "import:f.csv" in out
    main(_cli(tmp_path, "facts", "remove", "1"))
    assert "removed fact #1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(_cli(tmp_path, "facts", "remove", "1"))
    assert exc.value.code == 1
    assert "error: no fact with id 1" in capsys.readouterr().err


def test_cli_bad_import_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("fact\nok\nI like apples, pears\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(_cli(tmp_path, "facts", "import", str(bad)))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad.csv: line 3: 2 fields") and "\n" not in err
    main(_cli(tmp_path, "facts", "list"))
    assert "no facts yet" in capsys.readouterr().out
