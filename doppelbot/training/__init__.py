"""Fine-tuning and evaluation: LoRA SFT / feedback training, held-out metrics, adapter choice.

The only package besides ``doppelbot.model`` and ``doppelbot.knowledge`` allowed to import
torch, transformers, peft, bitsandbytes and accelerate. The modules that the rest of the product
uses without a model — ``data``, ``metrics``, ``registry``, ``preflight`` — keep those imports
inside functions, so importing them stays cheap (``doppelbot --help`` must not pull in torch).
"""
