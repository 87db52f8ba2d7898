"""Building the "context → my reply" fine-tuning set from the stored chat history.

Pure Python on domain dataclasses (no torch, no tokenizer import): the token counter is
injected, so the same rules serve the trainer (JSONL files) and the live bot
(``sessions.build_live_context``).

- ``options``: every rule in one frozen object; ``rules``/``scrub``: what one message becomes;
  ``sessions``: sessions, turns and the context window;
- ``candidates``: one chat → its sample candidates (stage 1, also in worker processes);
- ``builder``: candidates → deduplicated samples → token budget, contact cap, time split, stats;
- ``from_store``: the build from the SQLite store, with worker processes;
- ``budget``, ``quality``, ``split``, ``render``, ``stats``, ``jsonl``: the stages' helpers and
  the files;
- ``service``: ``doppelbot dataset`` as one library call (Settings and flags → a dataset folder).
"""
