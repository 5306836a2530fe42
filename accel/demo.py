"""``accel demo``: a Gradio app that runs the built-in models (or your pipeline) unpatched and patched on
the same seed, side by side, with the time of each and a view of what the method did.

    accel demo                      # http://127.0.0.1:7860 (GRADIO_SERVER_PORT or --port to change)

Offline: analytics off, fonts served by the app itself, no share link. gradio comes with the
``demo`` extra and is imported only here.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Demo", "build_app", "launch", "methods_for_generation", "methods_for_classification"]

PIPELINES = ("fashion-sd", "fashion-dit")
CLASSIFY = ("ToMe", "EViT", "A-ViT", "early exit", "token exit")
NO_METHOD = "Choose at least one method (every control is off)."


def methods_for_generation(tome: float, tome_mode: str, deepcache: int, branch: int, region: float) -> Dict[str, Any]:
    """``accel.patch`` keywords from the text-to-image controls: 0 turns a method off (DeepCache 1
    is on: its identity setting, every step in full)."""
    methods: Dict[str, Any] = {}
    if tome_mode == "downsample":
        methods["tome"] = {"mode": "downsample"}
    elif tome and tome > 0:
        methods["tome"] = {"ratio": float(tome)}
    if deepcache and deepcache >= 1:
        methods["deepcache"] = {"interval": int(deepcache), "branch": int(branch or 0)}
    if region and region > 0:
        methods["region_cache"] = {"ratio": float(region)}
    return methods


def controls_for(model: str) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """What the text-to-image tab shows for ``model`` (updates of the DeepCache interval, its branch
    and the RegionCache ratio): DeepCache for UNet pipelines, RegionCache for DiTs, both for a
    pipeline of yours (whichever does not apply says so when run)."""
    if model == "fashion-sd":
        return {"visible": True, "value": 3}, {"visible": True}, {"visible": False, "value": 0}
    if model == "fashion-dit":
        return {"visible": False, "value": 0}, {"visible": False}, {"visible": True, "value": 0.5}
    return {"visible": True}, {"visible": True}, {"visible": True}


def methods_for_classification(method: str, tome_r: float, keep: float, threshold: float) -> Dict[str, Any]:
    """``accel.patch`` keywords for the classification tab's training-free methods and their values."""
    if method == "ToMe":
        return {"tome": {"r": int(tome_r), "trace_source": True}}  # the source map shows the merges
    if method == "EViT":
        return {"evit": {"keep_rate": float(keep)}}
    if method == "token exit":
        return {"token_exit": {"threshold": float(threshold)}}
    raise ValueError(f"method must be one of {', '.join(CLASSIFY)}; got {method!r}")


class Demo:
    """The models (loaded once, on first use), the side-by-side runner and the handlers the page calls.
    Every handler returns a message instead of raising, so that bad input shows in the page."""

    def __init__(self) -> None:
        from .eval.side_by_side import SideBySide

        self.runner = SideBySide()
        self.pipes: Dict[str, Any] = {}
        self.vit: Optional[Tuple[Any, Any, Any]] = None  # (fashion-vit, (A-ViT model, config), test subset)
        self.exit_heads: Dict[float, Any] = {}
        self.loading = threading.Lock()

    # -- models -------------------------------------------------------------------------------
    def pipeline(self, ref: str) -> Any:
        """A built-in pipeline by name, or a local diffusers folder / cached hub id (nothing downloaded)."""
        ref = (ref or "").strip()
        with self.loading:
            if ref not in self.pipes:
                if ref in PIPELINES:
                    from .pipelines import load

                    self.pipes[ref] = load(ref)
                else:
                    from diffusers import DiffusionPipeline

                    try:
                        pipe = DiffusionPipeline.from_pretrained(ref, local_files_only=True)
                    except Exception as error:  # OSError, ValueError ... depending on what is missing
                        raise ValueError(f"model: {ref!r} is neither built in ({', '.join(PIPELINES)}) nor a "
                                         f"diffusers folder or cached hub id ({type(error).__name__})") from None
                    pipe.set_progress_bar_config(disable=True)
                    self.pipes[ref] = pipe
            return self.pipes[ref]

    def classifier(self) -> Tuple[Any, Any, Any]:
        with self.loading:
            if self.vit is None:
                from .pipelines import load, load_test_subset

                self.vit = (load("fashion-vit"), load("fashion-vit-avit"), load_test_subset())
            return self.vit

    def early_exit(self, budget: float) -> Any:
        """The shipped exit heads with thresholds calibrated on the first 1,000 test images to lose at
        most ``budget`` points of accuracy (cached per budget)."""
        from .patches.early_exit import EarlyExit
        from .patches.early_exit.heads import load_heads
        from .patches.early_exit.train import calibrate_heads
        from .pipelines.data import ASSETS
        from .pipelines.fashion_vit import preprocess

        key = round(float(budget), 2)
        if key not in self.exit_heads:
            model, _, (images, labels) = self.classifier()
            heads = load_heads(ASSETS / "fashion-vit-exits")
            calibrate_heads(model, heads, (preprocess(images[:1000]), labels[:1000]), max_drop=key / 100)
            self.exit_heads[key] = EarlyExit(heads=heads)
        return self.exit_heads[key]

    # -- handlers ---------------------------------------------------------------------------------
    def generate(self, model: str, prompt: str, seed: float, steps: float, guidance: float, tome: float,
                 tome_mode: str, deepcache: float, branch: float, region: float) -> Tuple[Any, ...]:
        """(baseline image, accelerated image, timing, views picture, captions, message) for the
        text-to-image tab."""
        from .eval.spec import parse_setting

        try:
            if not (prompt or "").strip():
                raise ValueError("prompt: empty; write what to draw (fashion-dit: a class name such as sneaker)")
            methods = methods_for_generation(tome, tome_mode, int(deepcache or 0), int(branch or 0), region)
            if not methods:
                raise ValueError(NO_METHOD)
            parse_setting(methods)  # every value checked before the model runs
            pipe = self.pipeline(model)
            from .eval.evaluation import to_uint8
            from .pipelines.fashion_sd import pipeline_images

            text, postprocess = prompt.strip(), (pipeline_images if model in PIPELINES else to_uint8)
            if hasattr(pipe, "get_label_ids"):  # class-conditional: the class name, "a photo of a" optional
                text = text.removeprefix("a photo of a ").removeprefix("a photo of an ")
                if text not in pipe.labels:
                    raise ValueError(f"prompt: {model} draws classes; one of {', '.join(sorted(pipe.labels))}")
            outcome = self.runner.generate(pipe, text, methods, seed=int(seed), steps=int(steps),
                                           guidance=float(guidance), postprocess=postprocess)
        except (ValueError, TypeError) as error:
            return None, None, "", None, "", f"**Error:** {error}"
        from .eval.side_by_side import enlarge

        return (enlarge(outcome.baseline), enlarge(outcome.accelerated), _timing(outcome, methods),
                *_views(outcome.views), "")

    def classify(self, upload: Any, index: float, method: str, tome_r: float, keep: float, threshold: float,
                 eps: float, budget: float) -> Tuple[Any, ...]:
        """(input shown, baseline top classes, accelerated top classes, timing, views picture, captions,
        message)."""
        from .eval.side_by_side import enlarge
        from .pipelines import FASHION_CLASSES
        from .pipelines.fashion_vit import preprocess

        try:
            model, (avit_model, halting), (images, _) = self.classifier()
            image = _grey28(upload) if upload is not None else images[int(index)]
            other = None
            if method == "A-ViT":
                import dataclasses

                methods, other = {"avit": dataclasses.replace(halting, eps=float(eps))}, avit_model
            elif method == "early exit":
                methods = {"early_exit": self.early_exit(budget)}
            else:
                methods = methods_for_classification(method, tome_r, keep, threshold)
            from .eval.spec import parse_setting

            parse_setting(methods)  # every value checked before the model runs
            outcome = self.runner.classify(model, preprocess(image[None])[0], methods, patched_model=other,
                                           image=image)
        except (ValueError, TypeError) as error:
            return None, None, None, "", None, "", f"**Error:** {error}"

        def top(probs: torch.Tensor) -> Dict[str, float]:
            return {FASHION_CLASSES[i]: float(p) for i, p in enumerate(probs)}

        return (enlarge(image), top(outcome.baseline), top(outcome.accelerated), _timing(outcome, methods),
                *_views(outcome.views), "")


def _grey28(picture: Any) -> torch.Tensor:
    """An uploaded picture (numpy ``[H, W]`` or ``[H, W, C]``) as Fashion-MNIST sees one: grey 28x28 uint8."""
    import numpy as np
    from PIL import Image

    array = np.asarray(picture)
    if array.ndim not in (2, 3) or array.size == 0:
        raise ValueError(f"image: expected a picture, got an array of shape {array.shape}")
    grey = Image.fromarray(array.astype(np.uint8)).convert("L").resize((28, 28), Image.BILINEAR)
    return torch.from_numpy(np.asarray(grey).copy())


def _views(views: Sequence[Tuple[str, Any]]) -> Tuple[Any, str]:
    """The views stacked into one picture (white between them) and their captions, numbered."""
    import numpy as np

    if not views:
        return None, "The method reported nothing for this call."
    width = max(image.shape[1] for _, image in views)
    gap = np.full((12, width, 3), 255, dtype=np.uint8)
    parts = []
    for _, image in views:
        pad = np.full((image.shape[0], width - image.shape[1], 3), 255, dtype=np.uint8)
        parts += [np.concatenate([image, pad], axis=1), gap]
    captions = "\n".join(f"{i}. {caption}" for i, (caption, _) in enumerate(views, 1))
    return np.concatenate(parts[:-1]), captions


def _timing(outcome: Any, methods: Dict[str, Any]) -> str:
    shown = json.dumps({k: v if isinstance(v, (dict, int, float, str)) else type(v).__name__
                        for k, v in methods.items()})
    return (f"unpatched {outcome.baseline_s * 1000:.0f} ms, patched {outcome.accelerated_s * 1000:.0f} ms: "
            f"**{outcome.speedup:.2f}x** with `{shown}` (one call each, same seed; `accel eval` measures "
            f"speedups properly, interleaved over rounds)")


def _presets(tuned: Sequence[Path], classifier: bool) -> Dict[str, Dict[str, Any]]:
    """``{label: settings}`` from ``accel tune``'s ``tune.json`` files: those of fashion-vit for the
    classification tab (``classifier``), the others for text to image."""
    found = {}
    for path in tuned:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(result, dict) or "settings" not in result or (result.get("model") == "fashion-vit") != classifier:
            continue
        found[f"{result.get('model', '?')}: {result['label']} ({result.get('budget', 'tuned')})"] = result["settings"]
    return found


def _classification_controls(settings: Dict[str, Any]) -> Tuple[str, float, float, float]:
    """Classification control values (method, ToMe r, EViT keep rate, token-exit threshold) for tuned ``settings``."""
    def value(name: str, key: str, default: float) -> float:
        v = settings.get(name)
        return float(v.get(key, default) if isinstance(v, dict) else (default if v is None else v))

    method = {"tome": "ToMe", "evit": "EViT", "token_exit": "token exit"}.get(next(iter(settings), ""), "ToMe")
    return method, value("tome", "r", 3), value("evit", "keep_rate", 0.7), value("token_exit", "threshold", 0.3)


def _preset_controls(settings: Dict[str, Any]) -> Tuple[float, str, int, int, float]:
    """Text-to-image control values for tuned ``settings`` (shorthand or dict values)."""
    tome, deepcache, region = settings.get("tome"), settings.get("deepcache"), settings.get("region_cache")
    ratio = tome.get("ratio", 0.5) if isinstance(tome, dict) else (tome or 0)
    mode = tome.get("mode", "merge") if isinstance(tome, dict) else "merge"
    interval = deepcache.get("interval", 3) if isinstance(deepcache, dict) else (deepcache or 0)
    branch = deepcache.get("branch", 0) if isinstance(deepcache, dict) else 0
    region_ratio = region.get("ratio", 0.5) if isinstance(region, dict) else (region or 0)
    return float(ratio), mode, int(interval), int(branch), float(region_ratio)


def build_app(demo: Optional[Demo] = None, tuned: Sequence[Path] = ()) -> Any:
    """The Gradio Blocks (not launched)."""
    import gradio as gr

    demo = demo or Demo()
    presets, presets_vit = _presets(tuned, classifier=False), _presets(tuned, classifier=True)
    with gr.Blocks(title="accel demo", analytics_enabled=False) as app:
        gr.Markdown("# accel: what each method does to your model\nThe same input through the unpatched and the "
                    "patched model, on the same seed. Below the outputs: what the method did.")
        with gr.Tab("Text to image"):
            with gr.Row():
                model = gr.Dropdown(list(PIPELINES), value=PIPELINES[0], allow_custom_value=True,
                                    label="model (built in, a diffusers folder or a cached hub id)", elem_id="model")
                prompt = gr.Textbox("a photo of a sneaker", label="prompt", elem_id="prompt")
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                steps = gr.Slider(1, 50, 20, step=1, label="steps", elem_id="steps")
                guidance = gr.Slider(1, 10, 3, step=0.5, label="guidance", elem_id="guidance")
            with gr.Row():
                tome = gr.Slider(0, 0.9, 0, step=0.05, label="ToMe ratio (0: off)")
                tome_mode = gr.Radio(["merge", "downsample"], value="merge", label="ToMe mode")
                deepcache = gr.Slider(0, 10, 3, step=1, label="DeepCache interval (0: off; UNets)", elem_id="deepcache")
                branch = gr.Number(0, label="DeepCache branch", precision=0)
                region = gr.Slider(0, 1, 0, step=0.05, label="RegionCache ratio (0: off; DiTs)", visible=False)
            model.change(lambda name: tuple(gr.update(**u) for u in controls_for(name)), model,
                         [deepcache, branch, region])
            if presets:
                preset = gr.Dropdown(list(presets), label="presets from accel tune")
                preset.change(lambda name: _preset_controls(presets[name]), preset,
                              [tome, tome_mode, deepcache, branch, region])
            run = gr.Button("Run", variant="primary", elem_id="run-generate")
            message = gr.Markdown(elem_id="message-generate")
            with gr.Row():
                baseline = gr.Image(label="unpatched", format="png", elem_id="baseline-image")
                accelerated = gr.Image(label="patched", format="png", elem_id="patched-image")
            timing = gr.Markdown(elem_id="timing-generate")
            with gr.Row():
                views = gr.Image(label="what the method did", format="png", elem_id="views-generate")
                captions = gr.Markdown(elem_id="captions-generate")
            run.click(demo.generate, [model, prompt, seed, steps, guidance, tome, tome_mode, deepcache, branch,
                                      region], [baseline, accelerated, timing, views, captions, message])
        with gr.Tab("Classification"):
            with gr.Row():
                upload = gr.Image(label="your image (optional; else a test image)", type="numpy")
                index = gr.Slider(0, 1999, 0, step=1, label="test image")
            with gr.Row():
                method = gr.Radio(list(CLASSIFY), value="ToMe", label="method")
                tome_r = gr.Slider(0, 4, 3, step=1, label="ToMe r (tokens merged per block)")
                keep = gr.Slider(0.1, 1, 0.7, step=0.05, label="EViT keep rate")
                threshold = gr.Slider(0.05, 1, 0.3, step=0.05, label="token exit: residual threshold")
            with gr.Row():
                eps = gr.Slider(0, 0.5, 0.01, step=0.01, label="A-ViT eps (its fine-tuned model)")
                budget = gr.Slider(0, 5, 0.5, step=0.25, label="early exit: accuracy budget (points)")
            if presets_vit:
                preset_vit = gr.Dropdown(list(presets_vit), label="presets from accel tune")
                preset_vit.change(lambda name: _classification_controls(presets_vit[name]), preset_vit,
                                  [method, tome_r, keep, threshold])
            run_vit = gr.Button("Classify", variant="primary", elem_id="run-classify")
            message_vit = gr.Markdown(elem_id="message-classify")
            with gr.Row():
                shown = gr.Image(label="input", format="png")
                top_base = gr.Label(num_top_classes=3, label="unpatched")
                top_fast = gr.Label(num_top_classes=3, label="patched")
            timing_vit = gr.Markdown(elem_id="timing-classify")
            with gr.Row():
                views_vit = gr.Image(label="what the method did", format="png", elem_id="views-classify")
                captions_vit = gr.Markdown(elem_id="captions-classify")
            run_vit.click(demo.classify, [upload, index, method, tome_r, keep, threshold, eps, budget],
                          [shown, top_base, top_fast, timing_vit, views_vit, captions_vit, message_vit])
    return app


def launch(host: str = "127.0.0.1", port: Optional[int] = None, tuned: Sequence[Path] = (),
           block: bool = True) -> Any:
    """Start the app offline on ``host``:``port`` (default ``GRADIO_SERVER_PORT`` or 7860); returns it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Behind an HTTP proxy, launch() checks its own URL through the proxy and hangs.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name, ""), "127.0.0.1", "localhost"]))
    port = port or int(os.environ.get("GRADIO_SERVER_PORT", 7860))
    app = build_app(tuned=tuned)
    app.queue(default_concurrency_limit=4)  # requests wait on the runner's lock, not on Gradio
    app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, prevent_thread_lock=not block,
               quiet=not block)
    return app


def found_tune_results(folder: Path = Path(".")) -> List[Path]:
    """``tune.json`` files of ``accel tune`` runs under ``folder`` (its default ``accel-tune/``, and
    ``docs/tune/*/``)."""
    return sorted(Path(folder).glob("accel-tune/tune.json")) + sorted(Path(folder).glob("docs/tune/*/tune.json"))
