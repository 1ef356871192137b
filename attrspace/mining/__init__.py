"""Mining attribute subspaces from LoRA updates: robust (IRLS) per-layer consensus with the batched
randomized SVD, overlaps between attributes, integration into one bank. See docs/design.md, "Mining"."""
