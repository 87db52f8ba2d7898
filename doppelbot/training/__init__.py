"""Fine-tuning and evaluation: LoRA SFT / feedback / DPO training, held-out metrics, adapters.

The only package besides ``doppelbot.model`` and ``doppelbot.knowledge`` allowed to import
torch, transformers, peft, bitsandbytes and accelerate — always inside functions, so importing
any module here stays cheap (``doppelbot --help`` must not pull in torch).

The modules, from the bottom up (each imports only the ones above it):

- ``data`` (dataset and feedback rows), ``metrics`` (text metrics), ``preflight`` (memory
  estimate), ``checkpoint`` (atomic checkpoints), ``registry`` (adapter folders, the serving
  choice), ``modeling`` (loading FRED-T5 with LoRA);
- ``types``: the shared types — ``TrainOptions``, ``Example``, ``PreparedData``, the
  ``TrainingMethod`` protocol;
- ``seq2seq`` (tokenizing, batching, token loss) and ``dpo`` (preference pairs and loss);
- ``evaluate`` (the ``Scorer`` and held-out evaluation) and ``methods`` (the table of
  ``sft``, ``feedback`` and ``dpo``);
- ``plan`` (data, steps and memory, before the model loads), ``runs`` (run folders and the
  run statuses), ``export`` (the versioned adapter folder);
- ``trainer``: the training loop and the ``Run`` it drives;
- ``service``: what the CLI commands call, with Settings and adapter names.
"""
