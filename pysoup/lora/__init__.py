"""LoRA adapters as first-class inputs and outputs: read and validate PEFT adapter directories, merge adapters
(`factors` or exact `delta` mode), fold them into a base model out of core, and extract them from a fine-tuned
model (docs/lora.md). Torch is imported only by the merges that run a pysoup strategy in memory."""

from pysoup._lazy import lazy_attributes as _lazy_attributes
from pysoup.lora.adapter import LoraAdapter, LoraModule, is_adapter_dir, open_adapter
from pysoup.lora.fold import FoldReport, fold, folded, split_model_lora

# Imported on first use: a fold (`pysoup merge BASE --lora ADAPTER`) needs neither, and the merges import the
# engine and every strategy.
_LAZY = {
    "AdapterMergeReport": "pysoup.lora.merge",
    "merge_adapters": "pysoup.lora.merge",
    "ExtractReport": "pysoup.lora.extract",
    "extract_lora": "pysoup.lora.extract",
}

__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)


__all__ = [
    "AdapterMergeReport",
    "ExtractReport",
    "FoldReport",
    "LoraAdapter",
    "LoraModule",
    "extract_lora",
    "fold",
    "folded",
    "is_adapter_dir",
    "merge_adapters",
    "open_adapter",
    "split_model_lora",
]
