"""Adapters out and in, in other libraries' formats: peft's adapter folder (`peft_folder`: read and
write, bit-exact round trips) and the writers that turn an adapted model into a plain peft adapter or a
merged checkpoint (`writers`). See docs/design.md, "Export"."""

from attrspace.export.peft_folder import (
    AdapterFileError,
    LoRAFactors,
    load_peft,
    load_peft_into,
    load_saved_modules,
    lora_state,
    save_peft,
)
from attrspace.export.writers import (
    PeftAdapter,
    collect_merged_state,
    collect_peft_adapter,
    export_merged,
    export_peft,
    modules_to_save,
    write_merged_checkpoint,
    write_peft_adapter,
)

__all__ = [
    "AdapterFileError",
    "LoRAFactors",
    "PeftAdapter",
    "collect_merged_state",
    "collect_peft_adapter",
    "export_merged",
    "export_peft",
    "load_peft",
    "load_peft_into",
    "load_saved_modules",
    "lora_state",
    "modules_to_save",
    "save_peft",
    "write_merged_checkpoint",
    "write_peft_adapter",
]
