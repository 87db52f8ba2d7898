"""Fixtures for the fine-tuning tests: a tiny FRED-T5-shaped model and a persona dataset.

The model is a randomly initialised T5 with the real FRED-T5 vocabulary (50,364 rows, the real
tokenizer) and an untied lm_head, but tiny everywhere else, so training runs in seconds on CPU.
The dataset follows a learnable rule — the reply is a fixed word chosen by the first word of the
other person's last message — so "did training work" has an exact answer.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from doppelbot.config import PromptSettings
from doppelbot.core.domain import Role, Sample, Turn
from doppelbot.core.prompt import PromptFormat
from doppelbot.dataset.jsonl import set_latest, write_samples

PERSONA = "Я."
RULES = {
    "привет": "здорово",
    "как": "нормально",
    "где": "дома",
    "когда": "завтра",
    "почему": "потому",
}
TAILS = ["ты", "дела", "сейчас", "у тебя", "там", "вообще"]
OPENERS = [(), (("other", "слушай"), ("owner", "да")), (("owner", "ок"),)]


def build_tiny_model(
    folder: Path, tokenizer_dir: Path, *, seed: int = 0, d_model: int = 64
) -> Path:
    """Save a tiny untied T5 + the real tokenizer files into ``folder`` (a model path)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=50364,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=16,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=2,
    )
    model = T5ForConditionalGeneration(config)
    # transformers 5 ties lm_head to the embeddings for any T5 built from a config; FRED-T5's
    # is separate, so give the head its own weights and declare it untied like FRED's config.
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.config.tie_word_embeddings = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


def persona_sample(rng: random.Random, prompt: PromptFormat, when: int) -> tuple[Sample, str]:
    key = rng.choice(list(RULES))
    last = f"{key} {rng.choice(TAILS)}"
    turns = [Turn(Role(role), text) for role, text in rng.choice(OPENERS)]
    turns.append(Turn(Role.OTHER, last))
    reply = RULES[key]
    sample = Sample(
        chat_id=rng.randint(1, 5),
        context=tuple(turns),
        reply=reply,
        reply_date=when,
        context_start_date=when - 60,
        source_message_ids=(when,),
        reply_message_ids=(when + 1,),
        model_input=prompt.build_input(turns),
        model_target=prompt.build_target(reply),
    )
    return sample, key


def write_persona_dataset(
    datasets_dir: Path, *, name: str = "persona", n_train: int = 60, n_val: int = 20, seed: int = 1
) -> Path:
    """``datasets_dir/name/{train,validation}.jsonl`` following ``RULES``; set as latest."""
    rng = random.Random(seed)
    prompt = PromptSettings(persona=PERSONA).format
    samples = [persona_sample(rng, prompt, 1_000_000 + 100 * i)[0] for i in range(n_train + n_val)]
    folder = datasets_dir / name
    write_samples(folder / "train.jsonl", samples[:n_train])
    write_samples(folder / "validation.jsonl", samples[n_train:])
    set_latest(datasets_dir, name)
    return folder


def rule_for(model_input: str) -> str:
    """The reply the rule expects for a prompt (first word of the last message)."""
    last = model_input.rsplit("Собеседник: ", 1)[1]
    return RULES[last.split()[0]]
