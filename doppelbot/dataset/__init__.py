"""Building the "context → my reply" fine-tuning set from the stored chat history.

Pure Python on domain dataclasses (no torch, no tokenizer import): the CLI injects the token
counter, so the same rules serve the trainer (JSONL files) and the live bot
(``build_live_context``).
"""
