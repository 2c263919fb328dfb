"""Reading and writing checkpoints: safetensors files, Hugging Face directories, state dicts."""

from pysoup.io.checkpoint import Checkpoint, open_checkpoint
from pysoup.io.format import TensorInfo
from pysoup.io.reader import SafetensorsReader
from pysoup.io.writer import OutputTarget

__all__ = ["Checkpoint", "OutputTarget", "SafetensorsReader", "TensorInfo", "open_checkpoint"]
