"""LLM submodule: compute where it pays for transformers causal LMs.

    from accel.llm.speculative import speculative_generate
    out = speculative_generate(model, input_ids, prompt_lookup=3, max_new_tokens=64)   # greedy, exact
    accel.patch(model, speculative=draft_model)          # model.generate drafts and verifies

Built: speculative decoding, greedy at any batch size (each row accepting its own count) and
sampled at batch size 1 (``speculative``). Still to come: sampled batches, adaptive draft lengths,
the shipped draft and trained exit adapters for self-speculation (issue 15), the paged KV cache and
continuous batching (16), Mixture of Experts (17) and Mixture of Depths (18).
"""
