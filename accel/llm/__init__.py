"""LLM submodule: compute where it pays for transformers causal LMs.

    from accel.llm.speculative import speculative_generate
    out = speculative_generate(model, input_ids, prompt_lookup=3, max_new_tokens=64)   # greedy, exact
    accel.patch(model, speculative=draft_model)          # model.generate drafts and verifies

Built: speculative decoding (``speculative``), greedy at any batch size (each row accepting its own
count, the model's own tokens) and sampled at any batch size (the model's own distribution), with
adaptive draft lengths (by the draft's confidence, or by measured goodput: ``draft_policy``),
prompt lookup, self-speculation from the model's first layers, EAGLE heads (``eagle``), and a
shipped draft and EAGLE head for the built-in model
(``accel.pipelines.load("smollm2-draft")``, ``load("smollm2-eagle")``); grouped-query attention
over several queries without copying the KV cache (``grouped_attention``), which speculative
decoding switches the target to for its passes; continuous
batching of an unmodified transformers model (``batching.ContinuousBatcher``) over a paged KV cache
(``paged_kv``: block pool, prefix hashing, copy-on-write; ``paged_attention``: registered in
transformers' attention registry during a step); Mixture of Experts (``moe``: the routings of
Mixtral, Qwen2-MoE and DeepSeek-V3, capacity, a grouped dispatch registered as a transformers
experts backend, ``MoEBlock``, sparse upcycling); Mixture of Depths (``mod``: top-k routing per
sequence through chosen layers, causal predictors and per-layer KV caches for decoding).
Self-speculation runs untrained (no exit adapters).
"""
