"""Several own accounts, one doppelganger, end to end: two fake Telegram accounts (their own
users, the same contact on both, a chat with each other, private-chat message ids that overlap)
logged in, exported and listed through the CLI into one data directory, the dataset built over
both and over each, the bot run as one account beside the other's identical ids, two bots at
once on one database, and a Desktop export imported as a named account."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from telethon import TelegramClient
from typer.testing import CliRunner

from doppelbot.accounts import lock_path, session_path, settings_for
from doppelbot.cli import app as cli_app
from doppelbot.cli import main
from doppelbot.config import Settings
from doppelbot.core.domain import Account, Message, ReplyStatus
from doppelbot.core.errors import AccountError, InstanceLockedError
from doppelbot.instance import InstanceLock
from doppelbot.store import accounts, bot_state, history, replies
from doppelbot.store.database import Database
from doppelbot.telegram import client as client_mod
from tests.conftest import FIXTURES
from tests.faketg import FakeTelegram
from tests.live_harness import start_bot
from tests.responder_fakes import FakeGenerator, fast_settings
from tests.test_telegram_login import _env

WORDS = [
    "утро",
    "кофе",
    "дорога",
    "работа",
    "встреча",
    "обед",
    "звонок",
    "письмо",
    "проект",
    "отчёт",
    "вечер",
    "ужин",
    "книга",
    "фильм",
    "музыка",
    "прогулка",
    "парк",
    "река",
    "мост",
    "город",
    "поезд",
    "билет",
    "отпуск",
    "море",
    "солнце",
    "дождь",
    "снег",
    "зима",
    "лето",
    "осень",
    "весна",
    "друг",
    "семья",
    "мама",
    "папа",
    "брат",
    "сестра",
    "кошка",
    "собака",
    "дом",
    "окно",
    "дверь",
    "стол",
    "стул",
    "лампа",
    "ключ",
    "машина",
    "велосипед",
    "магазин",
    "рынок",
    "хлеб",
    "сыр",
    "чай",
    "сахар",
    "соль",
    "перец",
    "суп",
    "каша",
    "пирог",
    "торт",
]
ALICE, BOB, CAROL = 1000, 1001, 1002
OWNER_A, OWNER_B = 100, 200


def _dialogue(tg: FakeTelegram, peer: Any, n: int, tag: str) -> None:
    """``n`` alternating messages (the other person first), each text distinct in words."""
    start = tg.now() - 86_400 - n * 60
    for i in range(n):
        words = f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]}"
        tg.add_message(
            peer,
            f"{tag} {words} {WORDS[(i * 13 + 5) % len(WORDS)]}",
            out=i % 2 == 1,
            date=start + i * 60,
        )


def two_accounts() -> tuple[FakeTelegram, FakeTelegram]:
    """A (user 100) knows Alice, Bob and B; B (user 200) knows Alice, Carol and A."""
    a = FakeTelegram(me_id=OWNER_A, me_first_name="Owner", me_username="owner")
    b = FakeTelegram(
        me_id=OWNER_B, me_first_name="Work", me_username="work_me", me_phone="+70000000002"
    )
    _dialogue(a, a.add_user("Alice", username="alice", user_id=ALICE), 40, "A-alice")
    _dialogue(a, a.add_user("Bob", user_id=BOB), 30, "A-bob")
    _dialogue(a, a.add_user("Work", username="work_me", user_id=OWNER_B), 10, "A-to-B")
    _dialogue(b, b.add_user("Alice", username="alice", user_id=ALICE), 24, "B-alice")
    _dialogue(b, b.add_user("Carol", user_id=CAROL), 20, "B-carol")
    _dialogue(b, b.add_user("Owner", username="owner", user_id=OWNER_A), 10, "B-to-A")
    return a, b


def _wire(monkeypatch: pytest.MonkeyPatch, fakes: dict[str, FakeTelegram], **kw: Any) -> None:
    """Every client doppelbot builds talks to the fake of the account whose session it opens
    (the default account's file, or ``accounts/NAME.session``)."""
    real = client_mod.create_client

    def create(settings: Settings, **kwargs: Any) -> TelegramClient:
        client = real(settings, **kwargs)
        path = settings.session_path
        name = path.stem if path.parent.name == "accounts" else "default"
        fakes[name].install(client, **kw)
        return client

    monkeypatch.setattr(client_mod, "create_client", create)


async def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``doppelbot ARGS`` (in a thread: it runs its own event loop): exit code, out, err."""
    try:
        await asyncio.to_thread(main, args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


def _args(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The global options of a test's data dir; tables wide enough to be read cell by cell."""
    monkeypatch.setenv("COLUMNS", "200")
    return _env(monkeypatch, tmp_path)


def _stats(data: Path, name: str) -> dict[str, Any]:
    return json.loads((data / "datasets" / name / "stats.json").read_text())["stats"]


async def test_two_accounts_login_export_list_and_build_one_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tg_a, tg_b = two_accounts()
    _wire(monkeypatch, {"default": tg_a, "work": tg_b}, authorized=True)
    args = _args(monkeypatch, tmp_path)
    data = tmp_path / "data"

    code, _, err = await _cli([*args, "login"], capsys)
    assert code == 0 and "Owner (@owner)" in err
    code, _, err = await _cli([*args, "login", "--account", "work"], capsys)
    assert code == 0 and "Work (@work_me) (account 'work')" in err
    work_session = data / "accounts" / "work.session"
    assert stat.S_IMODE(work_session.stat().st_mode) == 0o600
    assert stat.S_IMODE(work_session.parent.stat().st_mode) == 0o700
    assert (data / "doppelbot.session").exists()  # the default account's file, as always

    code, out, _ = await _cli([*args, "export", "--no-takeout"], capsys)
    assert code == 0 and "80 new messages from 3 chats" in out
    code, out, _ = await _cli([*args, "--account", "work", "export", "--no-takeout"], capsys)
    assert code == 0 and "54 new messages from 3 chats" in out

    # nothing overwritten: both accounts' chat with Alice, with the same message ids
    db = await Database.open(data / "doppelbot.sqlite3")
    try:
        work = (await accounts.by_name(db, "work")).account_id  # type: ignore[union-attr]
        mine, theirs = db.for_account(1), db.for_account(work)
        for handle, tg, n in ((mine, tg_a, 40), (theirs, tg_b, 24)):
            stored = [m async for m in history.iter_chat_messages(handle, ALICE)]
            assert [(m.message_id, m.text) for m in stored] == [
                (m.id, m.message) for m in tg.messages(ALICE)
            ]
            assert len(stored) == n
        a_ids = {m.message_id for m in [m async for m in history.iter_chat_messages(mine, ALICE)]}
        b_ids = {m.message_id for m in [m async for m in history.iter_chat_messages(theirs, ALICE)]}
        assert a_ids & b_ids  # the ids do overlap
        assert await history.count_messages(db) == 80 and await history.count_messages(theirs) == 54
        assert (await accounts.identity(theirs)) == Account(
            OWNER_B, "Work", None, "work_me", "70000000002"
        )
    finally:
        await db.close()

    code, out, _ = await _cli([*args, "accounts"], capsys)
    assert code == 0
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert lines.keys() >= {"default", "work"}
    for name, user, messages in (
        ("default", "@owner (100)", "80"),
        ("work", "@work_me (200)", "54"),
    ):
        cells = [c.strip() for c in lines[name].split("│")[1:-1]]
        assert cells[:4] == [name, user, messages, "3"] and cells[5] == "yes", cells

    common = ["dataset", "--no-token-budget", "--max-contact-share", "1", "--workers", "1"]
    code, out, _ = await _cli([*args, *common, "--name", "both"], capsys)
    assert code == 0, out
    code, _, _ = await _cli([*args, *common, "--name", "a", "--account", "default"], capsys)
    assert code == 0
    code, _, _ = await _cli([*args, *common, "--name", "b", "--account", "work"], capsys)
    assert code == 0
    both, a, b = _stats(data, "both"), _stats(data, "a"), _stats(data, "b")
    assert both["samples"] == a["samples"] + b["samples"] > 0
    assert both["messages_read"] == a["messages_read"] + b["messages_read"] == 70 + 44
    assert both["chats_total"] == 6 and both["chats_skipped"] == {"own_account": 2}
    assert a["chats_skipped"] == b["chats_skipped"] == {"own_account": 1}
    assert {k: v["samples"] for k, v in both["per_account"].items()} == {
        "default": a["samples"],
        "work": b["samples"],
    }
    # the same contact from both accounts is one contact
    alice = [c for c in both["per_chat"] if c["chat_id"] == ALICE]
    assert len(alice) == 1 and alice[0]["messages"] == 64
    rows = [
        json.loads(line)
        for split in ("train", "validation")
        for line in (data / "datasets" / "both" / f"{split}.jsonl").read_text().splitlines()
    ]
    assert {r["account"] for r in rows} == {"default", "work"}
    assert not any("to-A" in r["reply"] or "to-B" in r["reply"] for r in rows)
    print(  # the closing report quotes these
        "two-account dataset:",
        {"both": both["samples"], "default": a["samples"], "work": b["samples"]},
        "skipped:",
        both["chats_skipped"],
    )


async def test_login_refuses_a_telegram_account_stored_under_another_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tg_a, _ = two_accounts()
    _wire(monkeypatch, {"default": tg_a, "again": tg_a}, authorized=False)
    args = _args(monkeypatch, tmp_path)

    async def login(*more: str) -> Any:
        return await asyncio.to_thread(
            CliRunner().invoke,
            cli_app,
            [*args, "login", *more],
            input=f"+70000000000\n{tg_a.login_code}\n",
        )

    assert (await login()).exit_code == 0
    # the same Telegram user under a second name: refused, and the fresh login logged out
    result = await login("--account", "again")
    assert isinstance(result.exception, AccountError)  # `main` prints it as one line
    assert "already the account 'default'" in str(result.exception)
    assert not (tmp_path / "data" / "accounts" / "again.session").exists()
    assert tg_a.calls["LogOutRequest"] == 1
    db = await Database.open(tmp_path / "data" / "doppelbot.sqlite3")
    try:
        assert [a.name for a in await accounts.list_all(db)] == ["default"]
    finally:
        await db.close()


async def test_unknown_and_bad_account_names_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(monkeypatch, tmp_path)
    code, _, err = await _cli([*args, "status", "--account", "nope"], capsys)
    assert code == 1
    assert err == (
        "error: no account named 'nope' (known: default); add it with "
        "`doppelbot login --account nope`"
    )
    code, _, err = await _cli([*args, "--account", "nope", "run"], capsys)
    assert code == 1 and "`doppelbot login --account nope` first" in err
    code, _, err = await _cli([*args, "--account", "Bad Name", "status"], capsys)
    assert code == 1 and "'Bad Name' is not an account name" in err
    code, _, err = await _cli([*args, "--account", "a", "status", "--account", "b"], capsys)
    assert code == 2 and "--account given twice" in err


def test_each_account_has_its_own_session_and_lock(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path)
    work = settings_for(settings, "work")
    assert (
        work.session_path
        == session_path(settings, "work")
        == (settings.store.data_dir / "accounts" / "work.session")
    )
    assert settings_for(settings, None) is settings  # the default keeps today's files
    assert settings_for(settings, "default").lock_path == settings.lock_path
    with (
        InstanceLock(lock_path(settings, None)),
        InstanceLock(work.lock_path),
        pytest.raises(InstanceLockedError),
    ):
        InstanceLock(lock_path(settings, "work")).acquire()


# --- the running bot --------------------------------------------------------------------------
async def _seed_default(db: Database) -> None:
    """Account A's history with Alice: the same chat and message ids B's will have."""
    await accounts.claim(db, Account(OWNER_A, "Owner", username="owner"))
    await history.upsert_messages(
        db,
        [
            Message(ALICE, i, ALICE if i % 2 else OWNER_A, i % 2 == 0, 1000 + i, f"A-only {i}")
            for i in range(1, 30)
        ],
    )


async def _until(check: Any, limit_s: float = 15.0) -> None:
    for _ in range(int(limit_s / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out waiting")


async def test_the_bot_of_one_account_answers_its_chats_only(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path)
    db = await Database.open(settings.store.db_path)
    try:
        await _seed_default(db)
        work = db.for_account((await accounts.create(db, "work")).account_id)
        mine = db.for_account(1)
        before = [m async for m in history.iter_chat_messages(mine, ALICE)]
        tg = FakeTelegram(me_id=OWNER_B, me_first_name="Work")
        alice = tg.add_user("Alice", user_id=ALICE)
        owner = tg.add_user("Owner", user_id=OWNER_A)  # the owner's other account
        tg.add_history(alice, 4)  # B's ids 1..4: A has the same ids in this chat
        gen = FakeGenerator("ответ от второго")
        async with start_bot(tg, settings, gen, db=work, review=False) as run:
            assert run.responder.other_own == frozenset({OWNER_A})
            incoming = tg.push_incoming(alice, "Привет со второго аккаунта")
            tg.push_incoming(owner, "это я сам, с другого аккаунта")
            await _until(lambda: _sent(work, ALICE))
            await asyncio.sleep(0.3)  # time enough to answer the other one too, were it wrong
        assert [s.chat_id for s in tg.sent] == [ALICE]
        [reply] = await replies.for_chat(work, ALICE)
        assert reply.status is ReplyStatus.SENT and reply.trigger_message_id == incoming.id
        assert await replies.for_chat(work, OWNER_A) == []  # never answers its own other self
        assert await replies.count_by_status(mine) == {s: 0 for s in ReplyStatus}
        # the context was B's chat, not A's messages under the same ids
        assert "Привет со второго аккаунта" in gen.prompts[0] and "A-only" not in gen.prompts[0]
        assert [m async for m in history.iter_chat_messages(mine, ALICE)] == before
        assert (await history.get_message(work, ALICE, incoming.id)).text == (  # type: ignore[union-attr]
            "Привет со второго аккаунта"
        )
        assert await bot_state.get_json(work, bot_state.HEALTH_KEY) is not None
        assert await bot_state.get_json(mine, bot_state.HEALTH_KEY) is None
        assert await bot_state.get_value(mine, bot_state.FIRST_RUN_KEY) is None
        assert (await accounts.identity(work)).user_id == OWNER_B  # type: ignore[union-attr]
    finally:
        await db.close()


async def _sent(db: Database, chat_id: int) -> bool:
    return any(r.status is ReplyStatus.SENT for r in await replies.for_chat(db, chat_id))


async def test_two_accounts_run_at_once_on_one_database(tmp_path: Path) -> None:
    """Two bots, as two processes have them: their own connection to the one database file,
    their own account; Alice writes to both at the same moment and gets one answer on each."""
    settings = fast_settings(tmp_path)
    setup = await Database.open(settings.store.db_path)
    work_id = (await accounts.create(setup, "work")).account_id
    await setup.close()
    db_a = await Database.open(settings.store.db_path)
    db_b = (await Database.open(settings.store.db_path)).for_account(work_id)
    tg_a = FakeTelegram(me_id=OWNER_A)
    tg_b = FakeTelegram(me_id=OWNER_B)
    alice_a = tg_a.add_user("Alice", user_id=ALICE)
    alice_b = tg_b.add_user("Alice", user_id=ALICE)
    try:
        async with (
            start_bot(tg_a, settings, FakeGenerator("ответ A"), db=db_a, review=False),
            start_bot(tg_b, settings, FakeGenerator("ответ B"), db=db_b, review=False),
        ):
            in_a = tg_a.push_incoming(alice_a, "вопрос первому")
            in_b = tg_b.push_incoming(alice_b, "вопрос второму")
            assert in_a.id == in_b.id  # the same message id on both accounts
            await _until(lambda: _sent(db_a, ALICE))
            await _until(lambda: _sent(db_b, ALICE))
            await asyncio.sleep(0.3)  # nothing more goes out
        assert [s.text for s in tg_a.sent] == ["ответ A"]
        assert [s.text for s in tg_b.sent] == ["ответ B"]
        for db, text in ((db_a, "вопрос первому"), (db_b, "вопрос второму")):
            [reply] = await replies.for_chat(db, ALICE)
            assert reply.status is ReplyStatus.SENT
            assert (await history.get_message(db, ALICE, in_a.id)).text == text  # type: ignore[union-attr]
        assert (await accounts.identity(db_a)).user_id == OWNER_A  # type: ignore[union-attr]
        assert (await accounts.identity(db_b)).user_id == OWNER_B  # type: ignore[union-attr]
    finally:
        await db_a.close()
        await db_b.close()


async def test_status_pause_and_health_are_per_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(monkeypatch, tmp_path)
    db = await Database.open(tmp_path / "data" / "doppelbot.sqlite3")
    work = db.for_account((await accounts.create(db, "work")).account_id)
    await db.close()
    code, out, _ = await _cli([*args, "status", "--account", "work", "--pause"], capsys)
    assert code == 0 and "Account: work" in out and "status --account work --resume" in out
    code, out, _ = await _cli([*args, "status"], capsys)
    assert code == 0 and "active" in out
    db = await Database.open(tmp_path / "data" / "doppelbot.sqlite3")
    try:
        assert await bot_state.is_paused(db.for_account(work.account_id))
        assert not await bot_state.is_paused(db)
    finally:
        await db.close()
    code, out, _ = await _cli([*args, "--account", "work", "status", "--health"], capsys)
    assert code == 1 and out.startswith("unhealthy")


# --- Desktop import ----------------------------------------------------------------------------
async def test_desktop_import_as_a_named_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(monkeypatch, tmp_path)
    export = str(FIXTURES / "desktop" / "result.json")
    code, out, _ = await _cli([*args, "import", export, "--account", "old-phone"], capsys)
    assert code == 0 and "imported" in out
    # the same Telegram account's export under another name is refused, and writes nothing
    code, _, err = await _cli([*args, "import", export], capsys)
    assert code == 1 and "already the account 'old-phone'" in err
    code, _, err = await _cli([*args, "import", export, "--account", "third"], capsys)
    assert code == 1 and "already the account 'old-phone'" in err
    db = await Database.open(tmp_path / "data" / "doppelbot.sqlite3")
    try:
        # the account the refused import added is gone again
        assert [a.name for a in await accounts.list_all(db)] == ["default", "old-phone"]
        old = await accounts.by_name(db, "old-phone")
        assert old is not None and old.user_id == 100
        assert await history.count_messages(db.for_account(old.account_id)) > 0
        assert await history.count_messages(db) == 0
    finally:
        await db.close()


# --- the dataset across accounts ---------------------------------------------------------------
def _chat(chat_id: int, owner: int, tag: str, n: int, start: int) -> list[Message]:
    """``n`` alternating messages, the other person first, each text distinct in words."""
    return [
        Message(
            chat_id,
            i + 1,
            owner if i % 2 else chat_id,
            i % 2 == 1,
            start + i * 60,
            f"{tag} {WORDS[i % len(WORDS)]} {WORDS[(i * 7 + 3) % len(WORDS)]}",
        )
        for i in range(n)
    ]


async def _build(settings: Settings, share: float, account: str | None = None) -> Any:
    from doppelbot.dataset.from_store import build_from_db
    from doppelbot.dataset.service import DatasetRequest, dataset_options

    options = dataset_options(settings, DatasetRequest(max_contact_share=share))
    return await asyncio.to_thread(
        build_from_db, settings.store.db_path, options, workers=1, account=account
    )


async def test_dedup_and_the_contact_cap_count_one_contact_across_accounts(
    tmp_path: Path,
) -> None:
    settings = fast_settings(tmp_path)
    db = await Database.open(settings.store.db_path)
    try:
        mine = db.for_account(1)
        work = db.for_account((await accounts.create(db, "work")).account_id)
        await accounts.claim(mine, Account(OWNER_A))
        await accounts.claim(work, Account(OWNER_B))
        day = 1_700_000_000
        # the same exchange with Alice reached both accounts (same texts, other ids and days)
        await history.upsert_messages(mine, _chat(ALICE, OWNER_A, "same", 20, day))
        await history.upsert_messages(work, _chat(ALICE, OWNER_B, "same", 20, day + 86_400))
        await history.upsert_messages(mine, _chat(BOB, OWNER_A, "bob", 20, day))
        await history.upsert_messages(work, _chat(CAROL, OWNER_B, "carol", 20, day))
    finally:
        await db.close()
    only_a = await _build(settings, 1.0, "default")
    both = await _build(settings, 1.0)
    # Alice's exchange from the second account is all duplicates
    assert only_a.stats.samples == 20 and both.stats.samples == 30
    assert both.stats.samples_dropped["duplicate_exact"] == 10

    # now Alice's two chats differ: 10 samples on each account, one contact with 20
    db = await Database.open(settings.store.db_path)
    try:
        await history.upsert_messages(
            db.for_account(2), _chat(ALICE, OWNER_B, "other", 20, day + 86_400)
        )
        await history.upsert_messages(db.for_account(1), _chat(1003, OWNER_A, "dan", 20, day))
    finally:
        await db.close()
    uncapped = await _build(settings, 1.0)
    assert uncapped.stats.per_chat[ALICE].samples == 20 and uncapped.stats.samples == 50
    capped = await _build(settings, 0.3)  # 10 + 10 from Alice alone would fit under 15
    assert capped.stats.contact_cap == 12
    assert capped.stats.per_chat[ALICE].samples == 12
    assert capped.stats.samples_dropped["contact_cap"] == 8
