"""The cached stages of `attrspace run`: render, pretrain, train-lora (`common`), mine (`mining`),
finetune (`finetune`) and the evaluation they share (`evaluate`)."""
