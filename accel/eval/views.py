"""Pictures of what a method did in the last call, for the demo (baseline and accelerated side by side).

Every function returns an RGB image as a ``uint8`` numpy array ``[H, W, 3]`` (what Gradio's
``Image`` takes). Maps over the input (``source_map``, ``depth_map_image``) are drawn with numpy,
one flat-coloured cell per patch; charts (``step_timeline``, ``exit_chart``, ``token_chart``) with
matplotlib on an Agg canvas (no pyplot: no global figure state, no display), imported inside the
functions so that ``import accel`` stays fast. ``method_views(model)`` picks the right picture for
each method patched on a model from its ``last_call()`` and state.
"""
from __future__ import annotations

import colorsys
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..patches.registry import located

__all__ = ["palette", "source_map", "depth_map_image", "step_timeline", "exit_chart", "token_chart", "method_views",
           "MIN_SIDE", "TIMELINE_SIZE", "CHART_SIZE"]

MIN_SIDE = 224  # maps are upscaled by a whole factor until their longer side reaches this many pixels
TIMELINE_SIZE = (640, 160)  # (width, height) in pixels of step_timeline
CHART_SIZE = (480, 300)  # of exit_chart and token_chart
DPI = 100
BORDER = np.array([255, 255, 255], dtype=np.uint8)  # lines between patches of different merged tokens
UNASSIGNED = np.array([128, 128, 128], dtype=np.uint8)  # a patch no output token stands for
DARK, LIGHT, HIGHLIGHT = "#0072B2", "#BFDDF2", "#E69F00"  # Okabe & Ito blue, a pale blue, orange

Image = np.ndarray  # [H, W, 3] uint8


# -- maps over the input ------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _palette(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    colours = np.zeros((0, 3))
    spacing, misses = 90.0, 0
    while len(colours) < n:
        # saturated, not too dark: the colours must stay apart when blended over a photo
        h, s, v = rng.uniform((0.0, 0.45, 0.55), (1.0, 1.0, 1.0))
        rgb = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
        if len(colours) == 0 or np.sqrt(((colours - rgb) ** 2).sum(1)).min() >= spacing:
            colours, misses = np.vstack([colours, rgb]), 0
        else:
            misses += 1
            if misses > 50:  # the space is crowded: accept closer colours, but never equal ones
                spacing, misses = max(1.0, spacing * 0.8), 0
    return colours.astype(np.uint8)


def palette(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 3]`` uint8: ``n`` distinct colours drawn with ``seed``; colour ``i`` depends only on
    ``seed`` and ``i`` (a longer palette extends a shorter one)."""
    return _palette(int(n), int(seed)).copy()


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device and dtype
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _as_rgb(image: Any) -> np.ndarray:
    """A uint8 (or float in [0, 1]) image ``[H, W]``, ``[H, W, 1|3|4]`` or PIL image -> ``[H, W, 3]`` uint8."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"views: image must be [H, W] or [H, W, 3]; got shape {array.shape}")
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3]


def _canvas_size(grid: Tuple[int, int], image: Optional[np.ndarray]) -> Tuple[int, int]:
    h, w = grid if image is None else image.shape[:2]
    scale = max(1, -(-MIN_SIDE // max(h, w)))
    return h * scale, w * scale


def _upscale(cells: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``[gh, gw, ...]`` -> ``[H, W, ...]``, nearest: pixel row ``y`` shows cell row ``y * gh // H``."""
    rows = np.arange(size[0]) * cells.shape[0] // size[0]
    cols = np.arange(size[1]) * cells.shape[1] // size[1]
    return cells[rows[:, None], cols[None, :]]


def _over(colours: np.ndarray, image: Any, alpha: float) -> np.ndarray:
    """Cell colours ``[gh, gw, 3]`` drawn at the canvas size, blended over ``image`` when given."""
    rgb = None if image is None else _as_rgb(image)
    size = _canvas_size(colours.shape[:2], rgb)
    out = _upscale(colours, size)
    if rgb is not None:
        out = np.round(alpha * out + (1 - alpha) * _upscale(rgb, size)).astype(np.uint8)
    return out


def source_map(source: Any, grid: Tuple[int, int], image: Any = None, seed: int = 0, alpha: float = 0.6,
               borders: bool = True) -> Image:
    """ToMe's visualisation (Bolya et al. 2023, Fig. 4): each input patch in the colour of the merged
    token it ended in.

    source: ``[N_out, N_in]`` 0/1 (``accel.tome.get_source(model)[b]``); the first ``N_in - gh * gw``
        columns are prefix tokens (CLS, registers) and are not drawn. grid: ``(gh, gw)`` patches.
    image: optional ``[H, W]``/``[H, W, 3]`` input the map is blended over (``alpha``: map's weight).
    Output token ``i`` has ``palette(N_out, seed)[i]``; ``borders`` draws white lines between
    patches of different tokens. Returns ``[H', W', 3]`` uint8 (image size, or grid, upscaled).
    """
    gh, gw = grid
    src = _numpy(source)
    prefix = src.shape[1] - gh * gw
    if src.ndim != 2 or prefix < 0:
        raise ValueError(f"source_map: source must be [N_out, N_in >= {gh * gw}] for grid {grid}; got {src.shape}")
    patches = src[:, prefix:]
    group = patches.argmax(0)
    group[patches.max(0) <= 0] = -1  # in no output token (not a source matrix of ToMe's)
    colours = np.where((group >= 0)[:, None], palette(src.shape[0], seed)[np.maximum(group, 0)], UNASSIGNED)
    out = _over(colours.reshape(gh, gw, 3), image, alpha)
    if borders:
        labels = _upscale(group.reshape(gh, gw), out.shape[:2])
        edge = np.zeros(labels.shape, dtype=bool)
        edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
        edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
        out[edge] = BORDER
    return out


def depth_map_image(depth: Any, blocks: int, image: Any = None, alpha: float = 0.6) -> Image:
    """Heat map (viridis) of ``depth: [gh, gw]`` ints, the blocks each patch went through (A-ViT
    halting depth, token-exit depth, RegionCache steps computed): 0 is viridis' dark end, ``blocks``
    its yellow end. Blended over ``image`` when given; ``[H', W', 3]`` uint8 as ``source_map``."""
    from matplotlib import colormaps

    values = np.clip(_numpy(depth).astype(np.float64) / max(blocks, 1), 0.0, 1.0)
    if values.ndim != 2:
        raise ValueError(f"depth_map_image: depth must be [gh, gw]; got shape {values.shape}")
    colours = np.round(colormaps["viridis"](values)[..., :3] * 255).astype(np.uint8)
    return _over(colours, image, alpha)


# -- charts ---------------------------------------------------------------------------------------
def _figure(size: Tuple[int, int]) -> Tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _pixels(fig: Any) -> Image:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _step_ticks(ax: Any, steps: int) -> None:
    every = 1 if steps <= 25 else 5
    ticks = [i for i in range(steps) if (i + 1) % every == 0 or i == 0]
    ax.set_xticks(ticks, [str(i + 1) for i in ticks])  # users count steps from 1
    ax.set_xlim(-0.6, steps - 0.4)


def step_timeline(steps: int, full_steps: Sequence[int], tokens_per_step: Optional[Sequence[int]] = None,
                  tokens: Optional[int] = None, title: str = "") -> Image:
    """One cell per denoising step: full steps dark, cached steps light (DeepCache). With
    ``tokens_per_step`` (RegionCache) each bar is as high as the fraction of the ``tokens`` (default:
    the largest count) the step computed. Returns ``TIMELINE_SIZE`` pixels: ``[160, 640, 3]`` uint8."""
    full = set(int(s) for s in full_steps)
    fig, ax = _figure(TIMELINE_SIZE)
    colours = [DARK if i in full else LIGHT for i in range(steps)]
    if tokens_per_step is None:
        heights = [1.0] * steps
        ax.set_yticks([])
    else:
        if len(tokens_per_step) != steps:
            raise ValueError(f"step_timeline: {len(tokens_per_step)} tokens_per_step for {steps} steps")
        total = tokens or max(tokens_per_step, default=1)
        heights = [t / total for t in tokens_per_step]
        ax.set_yticks([0, 0.5, 1], ["0%", "50%", "100%"])
        ax.set_ylabel("tokens")
    ax.bar(range(steps), heights, width=0.85, color=colours)
    ax.set_ylim(0, 1.02)
    _step_ticks(ax, steps)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("step (dark: full, light: cached)")
    if title:
        ax.set_title(title, fontsize=10)
    return _pixels(fig)


def exit_chart(exit_blocks: Sequence[int], exited: Sequence[int], final: int, blocks: int,
               highlight: Optional[int] = None) -> Image:
    """Bar chart of early exit: how many images left at each exit block (0-based ``exit_blocks``,
    labelled by blocks computed, ``b + 1``) and how many ran all ``blocks``. ``highlight``: the bar
    (0..len(exit_blocks)) drawn in orange, e.g. where one image left. ``CHART_SIZE``: ``[300, 480, 3]``."""
    if len(exited) != len(exit_blocks):
        raise ValueError(f"exit_chart: {len(exited)} counts for {len(exit_blocks)} exit blocks")
    fig, ax = _figure(CHART_SIZE)
    labels = [str(b + 1) for b in exit_blocks] + [f"{blocks} (all)"]
    counts = list(exited) + [final]
    colours = [HIGHLIGHT if i == highlight else DARK for i in range(len(counts))]
    bars = ax.bar(range(len(counts)), counts, color=colours)
    ax.bar_label(bars, fontsize=9)
    ax.set_xticks(range(len(counts)), labels)
    ax.set_xlabel("blocks computed before the image left")
    ax.set_ylabel("images")
    ax.set_ylim(0, max(max(counts, default=0), 1) * 1.15)
    ax.yaxis.get_major_locator().set_params(integer=True)  # image counts: no 2.5 images
    return _pixels(fig)


def token_chart(tokens_in: Sequence[int], tokens_out: Sequence[int], labels: Optional[Sequence[str]] = None,
                title: str = "", xlabel: str = "block", removed: str = "merged") -> Image:
    """Stacked bars per block (or resolution): tokens kept (dark) and removed (light, legend
    ``removed``) out of ``tokens_in``. ``CHART_SIZE``: ``[300, 480, 3]`` uint8."""
    fig, ax = _figure(CHART_SIZE)
    x = range(len(tokens_in))
    gone = [a - b for a, b in zip(tokens_in, tokens_out)]
    ax.bar(x, tokens_out, color=DARK, label="kept")
    ax.bar(x, gone, bottom=tokens_out, color=LIGHT, label=removed)
    ax.set_xticks(list(x), list(labels) if labels is not None else [str(i + 1) for i in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens per image")
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    return _pixels(fig)


# -- views of a patched model ------------------------------------------------------------------------
View = Tuple[str, Image]


def _check_index(index: int, batch: int, method: str) -> None:
    if not 0 <= index < batch:
        raise IndexError(f"method_views: {method}: image {index} is not in the last batch of {batch}")


def _grid_of(model: Any, n: int, image: Any) -> Optional[Tuple[int, int]]:
    """The patch grid of ``n`` patch tokens: the model's own, else the factorisation of ``n`` closest
    to the image's aspect ratio (square without an image); None for a prime count that fits neither."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and grid[0] * grid[1] == n:
        return int(grid[0]), int(grid[1])
    if n <= 0:
        return None
    aspect = 1.0 if image is None else np.asarray(image).shape[0] / np.asarray(image).shape[1]
    pairs = [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    h, w = min(pairs, key=lambda p: abs(np.log(p[0] / p[1] / aspect)))
    return None if min(h, w) == 1 and n > 3 else (h, w)


def _depth_caption(method: str, what: str, depth: np.ndarray, blocks: int) -> str:
    return f"{method}: {what} (mean {depth.mean():.1f} of {blocks}; dark purple: none, yellow: all {blocks})"


def _tome_vit(patch: Any, info: Dict[str, Any], image: Any, index: int) -> List[View]:
    source = patch.state.source if patch.config.trace_source else None
    if source is not None:
        _check_index(index, source.shape[0], "tome")
        src, prefix = source[index], patch.num_prefix
        grid = _grid_of(patch.target, src.shape[1] - prefix, image)
        if grid is not None:
            tokens = int((_numpy(src[:, prefix:]).max(1) > 0).sum())
            caption = (f"ToMe: the {grid[0] * grid[1]} patches of image {index} ended in {tokens} tokens; "
                       "patches of one colour were merged into one token")
            return [(caption, source_map(src, grid, image))]
    tokens_in, merged = info["tokens_in"], info["merged"]
    caption = (f"ToMe: {sum(merged)} tokens merged away over {len(merged)} blocks "
               f"({tokens_in[0]} → {info['tokens_out']} tokens per image)")
    out = [t - m for t, m in zip(tokens_in, merged)]
    return [(caption, token_chart(tokens_in, out, title="tokens each block received, and merged away"))]


def _tome_diffusion(patch: Any, info: Dict[str, Any], image: Any, index: int) -> List[View]:
    levels = info["per_downsample"]
    if not levels:
        return []
    labels, tokens, kept, phrases = [], [], [], []
    for level in sorted(levels):
        entry = levels[level]
        h, w = entry["grid"]
        left = entry["tokens"] - entry["merged"] if "merged" in entry else entry.get("kv_tokens", entry["tokens"])
        labels.append(f"{h}×{w}")
        tokens.append(entry["tokens"])
        kept.append(left)
        blocks = entry["blocks"]
        phrases.append(f"{left} of {entry['tokens']} tokens at {h}×{w} ({blocks} block{'s' * (blocks != 1)})")
    what = "attention ran on" if patch.config.mode == "merge" else "self-attention read keys/values from"
    caption = f"ToMe: {what} {'; '.join(phrases)} in the last denoiser call"
    return [(caption, token_chart(tokens, kept, labels, xlabel="latent resolution",
                                  removed="merged" if patch.config.mode == "merge" else "subsampled"))]


def _avit(patch: Any, info: Dict[str, Any], image: Any, index: int) -> List[View]:
    depth = _numpy(patch.depth_map())
    _check_index(index, depth.shape[0], "avit")
    depth = depth[index]
    if depth.ndim == 1:
        grid = _grid_of(patch.target, depth.shape[0], image)
        if grid is None:
            return []
        depth = depth.reshape(grid)
    blocks = len(patch.blocks)
    caption = _depth_caption("A-ViT", f"blocks each patch of image {index} went through before halting", depth,
                             blocks)
    return [(caption, depth_map_image(depth, blocks, image))]


def _token_exit(patch: Any, info: Dict[str, Any], image: Any, index: int) -> List[View]:
    try:
        depth = _numpy(patch.depth_map())
    except RuntimeError:  # the patch tokens formed no grid (patch dropout): no map to draw
        return []
    _check_index(index, depth.shape[0], "token_exit")
    blocks = len(patch.blocks)
    caption = _depth_caption("Token exit", f"blocks that updated each patch of image {index} before it stopped",
                             depth[index], blocks)
    return [(caption, depth_map_image(depth[index], blocks, image))]


def _early_exit(patch: Any, info: Dict[str, Any], image: Any, index: int) -> List[View]:
    batch, blocks, exit_blocks = info["batch"], len(patch.blocks), info["exit_blocks"]
    _check_index(index, batch, "early_exit")
    depth = int(patch.exit_depths()[index])
    early = batch - info["final"]
    if depth < blocks:
        bar = exit_blocks.index(depth - 1)
        where = f"left after block {depth} of {blocks}, its exit head confident enough"
    else:
        bar, where = len(exit_blocks), f"ran all {blocks} blocks"
    caption = f"Early exit: image {index} {where}; {early} of {batch} images left early (orange: this image)"
    return [(caption, exit_chart(exit_blocks, info["exited"], info["final"], blocks, highlight=bar))]


def _evit(patch: Any, info: Dict[str, Any], image: Any, index: int) -> List[View]:
    tokens_in, tokens_out = info["tokens_in"], info["tokens_out"]
    where = ", ".join(str(b + 1) for b in info["reduced_in"]) or "none"
    caption = (f"EViT: kept {patch.config.keep_rate:.0%} of the patch tokens in blocks {where}, the rest fused "
               f"into one ({tokens_in[0]} → {tokens_out[-1]} tokens per image)")
    return [(caption, token_chart(tokens_in, tokens_out, title="tokens leaving each block", removed="dropped"))]


def _deepcache(patch: Any, info: Dict[str, Any], image: Any, index: int) -> List[View]:
    steps, full = info["steps"], info["full_steps"]
    caption = (f"DeepCache: {len(full)} of {steps} steps ran the full UNet; the other {steps - len(full)} "
               "reused its cached deep features")
    return [(caption, step_timeline(steps, full, title="UNet per denoising step"))]


def _region_cache(patch: Any, info: Dict[str, Any], image: Any, index: int) -> List[View]:
    steps, full, tokens = info["steps"], info["full_steps"], info["tokens"]
    per_step = info["tokens_per_step"]
    cached = [t for i, t in enumerate(per_step) if i not in set(full)]
    share = f"; the other {len(cached)} recomputed {np.mean(cached) / tokens:.0%} of them" if cached else ""
    views = [(f"RegionCache: {len(full)} of {steps} steps computed all {tokens} patch tokens{share}",
              step_timeline(steps, full, per_step, tokens, title="patch tokens computed per step"))]
    counts = np.asarray(info["computed_steps"])  # [rows, h, w]: a row per batch row (CFG halves share regions)
    if index < counts.shape[0]:
        caption = (f"RegionCache: steps (of {steps}) that recomputed each latent patch of image {index} "
                   f"(dark purple: none, yellow: every step)")
        views.append((caption, depth_map_image(counts[index], steps)))
    return views


def _builders() -> List[Tuple[type, Callable[..., List[View]]]]:
    from ..patches.avit.timm import AViTTimm
    from ..patches.deepcache.unet import DeepCacheUNet
    from ..patches.early_exit.timm import EarlyExitTimm
    from ..patches.evit.timm import EViTTimm
    from ..patches.region_cache.diffusers import RegionCacheDiT
    from ..patches.token_exit.timm import TokenExitTimm
    from ..patches.tome.diffusers import ToMeDiffusers
    from ..patches.tome.timm import ToMeTimm

    return [(ToMeTimm, _tome_vit), (ToMeDiffusers, _tome_diffusion), (AViTTimm, _avit),
            (TokenExitTimm, _token_exit), (EarlyExitTimm, _early_exit), (EViTTimm, _evit),
            (DeepCacheUNet, _deepcache), (RegionCacheDiT, _region_cache)]


def method_views(model: Any, image: Any = None, index: int = 0) -> List[View]:
    """(caption, ``[H, W, 3]`` uint8 picture) for every method patched on ``model`` (a timm ViT, a
    diffusers pipeline or denoiser) that has run at least once, in the order applied.

    Per-image methods show image ``index`` of the last batch (``IndexError`` beyond it), drawn over
    ``image`` (its input, ``[H, W]``/``[H, W, 3]``) when given: ToMe's source map (with
    ``trace_source``, else tokens per block), A-ViT and token-exit depth maps, the early exit of that
    image. DeepCache and RegionCache show step timelines; ToMe on diffusers the tokens per
    resolution; EViT the tokens per block. Methods this module does not know are skipped.
    """
    builders = _builders()
    views: List[View] = []
    for _, _, patch in located(model):
        info = patch.last_call()
        build = next((b for cls, b in builders if isinstance(patch, cls)), None)
        if info is None or build is None:
            continue
        views += build(patch, info, image, index)
    return views
