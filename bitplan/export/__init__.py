"""Exports for llama.cpp (a checkpoint as one GGUF file, a plan as a tensor-type list, a profile as an imatrix) and
for vLLM (a checkpoint as a compressed-tensors folder)."""
from .compressed_tensors import CompressedTensorsExport, export_compressed_tensors
from .gguf_export import GgufExport, export_gguf
from .imatrix import ImatrixExport, export_imatrix
from .tensor_types import TensorTypes, export_tensor_types, tensor_type_lines

__all__ = ["CompressedTensorsExport", "GgufExport", "ImatrixExport", "TensorTypes", "export_compressed_tensors",
           "export_gguf", "export_imatrix", "export_tensor_types", "tensor_type_lines"]
