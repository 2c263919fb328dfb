"""LoRA adapters as first-class inputs and outputs: read and validate PEFT adapter directories, merge adapters
(`factors` or exact `delta` mode), fold them into a base model out of core, and extract them from a fine-tuned
model (docs/lora.md). Torch is imported only by the merges that run a pysoup strategy in memory."""

from pysoup.lora.adapter import LoraAdapter, LoraModule, is_adapter_dir, open_adapter
from pysoup.lora.extract import ExtractReport, extract_lora
from pysoup.lora.fold import FoldReport, fold, folded, split_model_lora
from pysoup.lora.merge import AdapterMergeReport, merge_adapters

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
