"""Export a run as a Hugging Face model folder (safetensors, config.json, tokenizer, model card) and load it back."""

from bkexp.export.hf import ExportError, export_run, from_pretrained, load_tokenizer, push, upload_operations

__all__ = ["ExportError", "export_run", "from_pretrained", "load_tokenizer", "push", "upload_operations"]
