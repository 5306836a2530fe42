"""Loaders for the built-in models in ``assets/``, presets and real-model helpers (not built yet)."""
