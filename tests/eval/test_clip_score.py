"""CLIP score with the shipped fashion-clip: against a hand computation, and matching > mismatched prompts."""
import torch

from accel.eval.clip_score import ClipScorer, clip_score
from accel.pipelines import load_test_subset, prompt_for
from accel.pipelines.fashion_clip import zero_shot_logits


def test_clip_score_matches_the_definition_and_prefers_the_right_prompt():
    images, labels = load_test_subset()
    images, labels = images[:40], labels[:40]
    scorer = ClipScorer()
    right = [prompt_for(int(c)) for c in labels]
    wrong = [prompt_for((int(c) + 5) % 10) for c in labels]
    per_image = scorer.per_image(images, right)

    # zero_shot_logits = logit_scale * cos(image, class prompt); its own (tensor) path to the embeddings
    logits = zero_shot_logits(scorer.model, scorer.processor.tokenizer, images)
    cos = logits[torch.arange(len(labels)), labels] / scorer.model.logit_scale.exp()
    torch.testing.assert_close(per_image, 100 * cos.clamp(min=0), rtol=1e-4, atol=1e-3)
    assert clip_score(images, right, scorer) > clip_score(images, wrong, scorer) + 1.0
