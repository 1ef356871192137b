"""The cached stages of `attrspace run`, one module each: `render`, `pretrain`, `lora` (train-lora),
`mining` (mine: the bank and the control banks), `finetune`; `evaluate` (the test metrics they
share) and `common` (seeds, training jobs, digests)."""
