"""Rounding weights into their planned formats and writing packed checkpoints (`bitplan apply`)."""
from .checkpoint import is_checkpoint, load_quantized
from .layer import quantize_layer
from .run import apply_formats, apply_plan, simulate

__all__ = ["apply_formats", "apply_plan", "is_checkpoint", "load_quantized", "quantize_layer", "simulate"]
