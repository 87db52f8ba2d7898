"""The reply model adapter: tokenizer, loading/quantisation and the worker thread.

Everything that imports torch/transformers/peft/bitsandbytes for serving lives here.
"""
