"""Embedding backends (ONNX Runtime everywhere, CoreML on macOS) behind one small interface."""

from .backend import BackendError, EmbeddingBackend, backend_for, create_backend

__all__ = ["BackendError", "EmbeddingBackend", "backend_for", "create_backend"]
