"""The adapter core, in reading order: `reference` (the math, the truth in tests) -> `functional` (the
autograd Function over a backend) -> `nn` (SubspaceLinear, LoRALinear, LoRAConv2d) -> `inject` (adapters
into a model by layer name). The public names are re-exported by `attrspace`; this package's __init__
imports nothing, so a backend can import `attrspace.adapters.reference` alone. See docs/design.md,
"The adapter core"."""
