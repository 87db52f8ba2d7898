"""What a newcomer meets in the first hour, with a tiny model on disk: a tokenizer that is not
FRED-T5's is refused wherever one is loaded; `train` is quiet (no library warnings or progress
bars), gives a next step that works on a first run, and calls a requested stop a stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from doppelbot.cli import main
from doppelbot.core.errors import ModelLoadError
from tests.training_helpers import build_tiny_model, write_persona_dataset

NOISE = (
    "Loading weights",
    "Warning",
    "warnings.warn",
    "[transformers]",
    "tie_word_embeddings",
    "bitsandbytes",
    "it/s]",
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("first-hour") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def foreign_model(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights with another model's (here: a toy GPT-2 BPE) tokenizer files."""
    folder = tmp_path_factory.mktemp("foreign") / "model"
    shutil.copytree(model, folder)
    for name in ("added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("abcdefghij")}}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    write_persona_dataset(folder / "datasets", n_train=24, n_val=6)
    return folder


def _main(data: Path, *args: str) -> int:
    try:
        main(["--env-file", "/dev/null", "--data-dir", str(data), *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.parametrize(
    "args",
    [("chat",), ("train", "--dry-run"), ("dataset", "--name", "again"), ("model", "check")],
    ids=lambda a: " ".join(a),
)
def test_a_tokenizer_that_is_not_fred_t5s_is_refused(
    args: tuple[str, ...],
    foreign_model: Path,
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DOPPELBOT_MODEL", str(foreign_model))
    monkeypatch.setenv("DOPPELBOT_PRECISION", "bf16")  # `model check` compares against fp32
    assert _main(data, *args) != 0
    err = " ".join(capsys.readouterr().err.split())
    assert "does not hold FRED-T5's tokenizer" in err and "11 ids instead of 50,365" in err


def test_the_bot_refuses_it_too(foreign_model: Path, data: Path) -> None:
    # `doppelbot run` loads through the same worker and loader as `chat`.
    from doppelbot.config import load_settings
    from doppelbot.model.loader import ModelSpec, load_reply_model

    settings = load_settings(
        env_file=None, data_dir=data, model=str(foreign_model), device="cpu", precision="fp32"
    )
    spec = ModelSpec(settings.model)  # no quantised-model cache
    with pytest.raises(ModelLoadError, match="FRED-T5's tokenizer"):
        load_reply_model(spec)


def test_train_is_quiet_and_its_next_step_works_on_a_first_run(
    model: Path, data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOPPELBOT_MODEL", str(model))
    monkeypatch.setenv("DOPPELBOT_TORCH_THREADS", "1")
    train = ["train", "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1"]
    assert _main(data, *train) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    for noise in NOISE:
        assert noise not in text, text
    # Nothing is served yet: the hint compares with the base model, and it works.
    hint = next(line for line in captured.out.splitlines() if line.startswith("next:"))
    assert "doppelbot eval v0001-sft --against base" in hint
    assert _main(data, "eval", "v0001-sft", "--against", "base", "--limit", "2") == 0
    capsys.readouterr()
    assert _main(data, "adapter", "use", "v0001-sft", "--force") == 0
    assert _main(data, *train, "--run-name", "second") == 0
    assert "--against current" in capsys.readouterr().out


def test_a_requested_stop_is_not_an_error(
    model: Path, data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C once: the step finishes, a checkpoint is saved, and the CLI says "stopped"."""
    from doppelbot.training import trainer

    monkeypatch.setenv("DOPPELBOT_MODEL", str(model))
    monkeypatch.setenv("DOPPELBOT_TORCH_THREADS", "1")
    real_event = trainer.StepEvent

    def event_with_ctrl_c(step: int, *args: object) -> object:
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the owner presses Ctrl-C during step 1
        return real_event(step, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "StepEvent", event_with_ctrl_c)
    code = _main(data, "train", "--max-steps", "3", "--batch-size", "4", "--grad-accum", "1")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 130
    assert "stopped: stopped at step 1/3" in err and "run the same command again" in err
    assert "error" not in err.lower()


def test_a_library_message_is_printed_once(settings: object) -> None:
    """huggingface_hub attaches its own stderr handler *and* propagates to the root logger: the
    root's Rich handler must not print the same record a second time."""
    import io
    import logging

    from rich.console import Console

    from doppelbot.logs import setup_logging

    rich_out = io.StringIO()
    setup_logging(settings, console=Console(file=rich_out, width=200))  # type: ignore[arg-type]
    library = logging.getLogger("somelib")
    own_out = io.StringIO()
    own = logging.StreamHandler(own_out)
    library.addHandler(own)
    try:
        library.warning("only once, please")
        logging.getLogger("doppelbot.test").warning("ours")
    finally:
        library.removeHandler(own)
    assert own_out.getvalue().count("only once, please") == 1
    assert "only once, please" not in rich_out.getvalue()
    assert "ours" in rich_out.getvalue()
