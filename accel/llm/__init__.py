"""LLM submodule: Mixture of Experts, Mixture of Depths, speculative decoding, paged KV cache (not built yet)."""
