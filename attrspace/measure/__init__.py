"""Measurement: step timing and saved-activation bytes (`profiling`), exact saved bytes of a whole model
on the meta device (`memory_meta`), the frozen / subspace / LoRA line-up of one layer (`lineup`), and
where a VGGT training step keeps its memory, by region (`activations`, the `attrspace profile`
command)."""
