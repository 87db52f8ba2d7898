"""Telegram Desktop JSON import: both layouts, every field we map, idempotence, and malformed
files that must name the position and write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from doppelbot.cli import main
from doppelbot.core.domain import MediaKind, PeerKind
from doppelbot.core.errors import ImportFormatError
from doppelbot.importers.desktop import ImportOptions, import_desktop_export, marked_chat_id
from doppelbot.store import history
from doppelbot.store.database import Database
from tests.conftest import FIXTURES

DESKTOP = FIXTURES / "desktop"
ALICE, CAROL, OWNER = 1000, 1001, 100


async def _all_rows(db: Database) -> list[tuple[object, ...]]:
    rows = await db.fetchall(f"SELECT {history.MESSAGE_COLUMNS} FROM messages ORDER BY 1, 2")
    return [tuple(r) for r in rows]


async def test_single_chat_layout_maps_every_field(db: Database) -> None:
    result = await import_desktop_export(db, DESKTOP / "single_chat.json")
    assert (result.chats, result.messages) == (1, 7)
    m = {x.message_id: x for x in await history.recent_messages(db, ALICE, limit=100)}
    assert m[11].text == "Привет! Как дела?" and not m[11].is_outgoing
    assert m[11].sender_id == ALICE and m[11].date == 1682935200
    # No owner id in a single-chat file: the speaker who is not the chat's peer is us.
    assert m[12].is_outgoing and m[12].sender_id == OWNER
    assert m[12].text == "Отлично, смотри https://example.com и это"
    assert m[12].reply_to_message_id == 11 and m[12].edit_date == 1682935320
    assert (m[13].media_kind, m[13].sticker_emoji) == (MediaKind.STICKER, "😂")
    assert m[14].is_forwarded and m[14].forwarded_from == "Bob"
    assert (m[14].media_kind, m[14].text) == (MediaKind.PHOTO, "смешно")
    assert m[15].media_kind is MediaKind.VOICE
    assert m[16].service_action == "phone_call" and m[16].is_outgoing and m[16].text == ""
    assert m[17].media_kind is MediaKind.GEO
    peer = await history.get_peer(db, ALICE)
    assert peer is not None and peer.kind is PeerKind.USER and peer.first_name == "Alice Smith"


async def test_full_export_layout_and_chat_kinds(db: Database) -> None:
    result = await import_desktop_export(db, DESKTOP)  # the folder works too
    assert result.chats == 2 and result.messages == 9
    assert result.skipped == {"bots": 1, "saved messages": 1, "groups": 2, "channels": 1}
    kinds = {m.message_id: m.media_kind for m in await history.recent_messages(db, CAROL, 50)}
    assert kinds == {
        3: MediaKind.VIDEO,
        4: MediaKind.VIDEO_NOTE,
        5: MediaKind.DOCUMENT,
        6: MediaKind.ANIMATION,
        7: MediaKind.POLL,
        8: MediaKind.CONTACT,
        9: MediaKind.AUDIO,
    }
    reply = await history.get_message(db, ALICE, 2)
    assert reply is not None and reply.is_outgoing and reply.reply_to_message_id == 1


async def test_groups_channels_saved_and_bots_on_request(db: Database) -> None:
    options = ImportOptions(
        include_groups=True, include_channels=True, include_saved=True, include_bots=True
    )
    result = await import_desktop_export(db, DESKTOP / "result.json", options)
    assert result.chats == 7 and result.skipped == {}
    family, team = (
        marked_chat_id("private_group", 5000),
        marked_chat_id("private_supergroup", 1500000000),
    )
    assert (family, team) == (-5000, -1001500000000)
    created = await history.get_message(db, family, 12)
    assert created is not None and created.service_action == "create_group" and created.is_outgoing
    standup = {m.message_id: m for m in await history.recent_messages(db, team, 10)}
    assert standup[1].sender_id == 1002 and not standup[1].is_outgoing
    assert standup[2].is_outgoing and standup[2].reply_to_message_id == 1
    news = await history.get_message(db, -1001500000001, 1)
    assert news is not None and news.sender_id == -1001500000001
    assert (await history.get_peer(db, team)).title == "Team"  # type: ignore[union-attr]
    assert (await history.get_peer(db, 2000)).kind is PeerKind.BOT  # type: ignore[union-attr]
    saved = await history.get_message(db, OWNER, 11)
    assert saved is not None and saved.is_outgoing
    dave = await history.get_peer(db, 1002)
    assert dave is not None and dave.first_name == "Dave"


async def test_reimport_is_idempotent_and_does_not_clobber_richer_peers(db: Database) -> None:
    from doppelbot.core.domain import Peer

    await history.upsert_peers(
        db, [Peer(ALICE, PeerKind.USER, first_name="Alice", last_name="S", username="alice")]
    )
    await import_desktop_export(db, DESKTOP)
    first = await _all_rows(db)
    await import_desktop_export(db, DESKTOP)
    assert await _all_rows(db) == first
    peer = await history.get_peer(db, ALICE)
    assert peer is not None and peer.username == "alice"  # the MTProto peer row was kept


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda text: text[: len(text) // 2], r"line \d+ column \d+: the file ends too early"),
        (lambda text: text.replace('"id": 3,', '"id": 3,,'), r"broken JSON at line \d+ column"),
        (
            lambda text: text.replace('"id": 5, "type"', '"idx": 5, "type"'),
            r"chats\.list\[1\]\.messages\[2\]: 'id' is missing",
        ),
        (
            lambda text: text.replace('"from_id": "user1001", "poll"', '"from_id": 7.5, "poll"'),
            r"chats\.list\[1\]\.messages\[4\]: from_id",
        ),
        (
            lambda text: text.replace('"date_unixtime": "1672650360"', '"date_unixtime": "soon"'),
            r"chats\.list\[1\]\.messages\[6\]\.date_unixtime",
        ),
        (lambda text: text.replace('"list": [', '"lost": ['), r"chats\.list"),
    ],
    ids=["truncated", "syntax", "missing-id", "bad-from-id", "bad-date", "no-chat-list"],
)
async def test_malformed_files_name_the_position_and_write_nothing(
    db: Database, tmp_path: Path, mutate: object, expected: str
) -> None:
    text = (DESKTOP / "result.json").read_text(encoding="utf-8")
    bad = tmp_path / "result.json"
    bad.write_text(mutate(text), encoding="utf-8")  # type: ignore[operator]
    with pytest.raises(ImportFormatError, match=expected):
        await import_desktop_export(db, bad)
    assert await history.count_messages(db) == 0
    assert await db.scalar("SELECT count(*) FROM peers") == 0


async def test_group_export_without_an_owner_id_is_refused(db: Database, tmp_path: Path) -> None:
    chat = {
        "name": "Team",
        "type": "private_supergroup",
        "id": 77,
        "messages": [
            {"id": 1, "type": "message", "date_unixtime": "1", "from_id": "user5", "text": "x"}
        ],
    }
    path = tmp_path / "result.json"
    path.write_text(json.dumps(chat), encoding="utf-8")
    with pytest.raises(ImportFormatError, match="--owner-id"):
        await import_desktop_export(db, path, ImportOptions(include_groups=True))
    result = await import_desktop_export(db, path, ImportOptions(include_groups=True, owner_id=5))
    assert result.messages == 1
    assert (await history.get_message(db, -1000000000077, 1)).is_outgoing  # type: ignore[union-attr]


def _big_export(path: Path, n: int) -> Path:
    messages = [
        {
            "id": i + 1,
            "type": "message",
            "date_unixtime": str(1_600_000_000 + 60 * i),
            "from_id": "user1000" if i % 2 else f"user{OWNER}",
            "text": f"message {i}",
        }
        for i in range(n)
    ]
    chat = {"name": "Alice", "type": "personal_chat", "id": ALICE, "messages": messages}
    path.write_text(json.dumps(chat), encoding="utf-8")
    return path


async def test_big_files_are_written_in_bounded_transactions_and_counted(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _big_export(tmp_path / "result.json", 2_500)
    sizes: list[int] = []
    original = db.transaction

    def counting() -> object:
        sizes.append(0)
        return original()

    monkeypatch.setattr(db, "transaction", counting)
    result = await import_desktop_export(db, path, chunk_rows=1_000)
    assert len(sizes) == 3  # 1,000 + 1,000 + 500 messages: never one long transaction
    assert (result.messages, result.new, result.already) == (2_500, 2_500, 0)
    again = await import_desktop_export(db, path, chunk_rows=1_000)
    assert (again.messages, again.new, again.already) == (2_500, 0, 2_500)
    assert await history.count_messages(db, ALICE) == 2_500


async def test_an_import_killed_between_transactions_completes_on_the_next_run(
    db: Database, tmp_path: Path
) -> None:
    path = _big_export(tmp_path / "result.json", 2_500)

    def killed(done: int, total: int) -> None:
        if done >= 1_000:
            raise KeyboardInterrupt  # as if the process died after the first commit

    with pytest.raises(KeyboardInterrupt):
        await import_desktop_export(db, path, chunk_rows=1_000, progress=killed)
    assert await history.count_messages(db, ALICE) == 1_000  # the first chunk, whole
    result = await import_desktop_export(db, path, chunk_rows=1_000)
    assert (result.new, result.already) == (1_500, 1_000)
    assert await history.count_messages(db, ALICE) == 2_500


def test_import_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "DataExport_2023"
    shutil.copytree(DESKTOP, folder)
    (folder / "single_chat.json").unlink()
    args = ["--env-file", "/dev/null", "--data-dir", str(tmp_path / "data")]
    main([*args, "import", str(folder), "--groups"])
    out = " ".join(capsys.readouterr().out.split())
    assert "imported 13 messages from 4 chat(s): 13 new, 0 already stored" in out
    assert "skipped" in out
    main([*args, "import", str(folder), "--groups"])
    out = " ".join(capsys.readouterr().out.split())
    assert "imported 13 messages from 4 chat(s): 0 new, 13 already stored" in out
    (folder / "result.json").write_text('{"chats": {"list": [', encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main([*args, "import", str(folder / "result.json")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 1 column" in err and "truncated" in err
