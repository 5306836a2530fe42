"""ToMe and DeepCache on a UNet with Stable Diffusion 1.5's configuration: seconds per image and
speedup against the unpatched UNet, side by side in one process.

Two workloads, fp32, seeded random weights (no model hub):
1. a real scheduler loop (StableDiffusionPipeline with DDIM, ``output_type="latent"``, prompt
   embeddings given so the text encoder and VAE do not count) at 64x64 latents (512x512 images);
2. single UNet calls at 128x128 latents (1024x1024 images), where attention dominates.

Every variant runs interleaved with the baseline (rounds rotate the order), medians reported; the
reference packages ``tomesd`` and ``DeepCache`` are included when installed (benchmark only,
``pip install tomesd DeepCache``). Closeness: PSNR of the final latents against the unpatched
run's, with the latents' own range as the peak. Writes docs/bench_diffusion.json and the
``bench_diffusion`` section of docs/benchmarks.md (``bench_diffusion_cuda`` with --device cuda).

    python scripts/bench_diffusion.py                   # the full run (about 22 minutes on 2 cores)
    python scripts/bench_diffusion.py --device cuda --dtype float16 --repeats 10 --repeats-large 20
    python scripts/bench_diffusion.py --config tiny ... # a smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import accel  # noqa: E402
from accel.eval.bench import device_sync  # noqa: E402
from accel.eval.report import (add_device_args, checked_device, device_section, format_table,  # noqa: E402
                               replace_section, run_meta)
from accel.eval.timing import time_interleaved  # noqa: E402

# runwayml/stable-diffusion-v1-5's unet/config.json (the fields that differ from diffusers' defaults)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_UNET = dict(sample_size=16, cross_attention_dim=32, attention_head_dim=2, block_out_channels=(32, 64),
                 layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

# (label, method for the table, how to switch it on and off on a pipeline)
Variant = Tuple[str, str, Callable[[Any], None], Callable[[Any], None]]


def ours(label: str, **methods: Any) -> Variant:
    return (label, "accel " + "+".join(methods), lambda pipe: accel.patch(pipe, **methods),
            lambda pipe: accel.unpatch(pipe))


def tomesd_variant(label: str, **settings: Any) -> Optional[Variant]:
    try:
        import tomesd
    except ImportError:
        return None
    return (label, "tomesd", lambda pipe: tomesd.apply_patch(pipe, **settings), lambda pipe: tomesd.remove_patch(pipe))


def deepcache_variant(interval: int) -> Optional[Variant]:
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        return None
    helpers: Dict[int, Any] = {}

    def enable(pipe: Any) -> None:
        helper = helpers[id(pipe)] = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()

    return (f"DeepCache interval={interval}", "DeepCache (reference)", enable,
            lambda pipe: helpers.pop(id(pipe)).disable())


def build_pipeline(unet_config: Dict[str, Any], seed: int):
    """StableDiffusionPipeline around a UNet of ``unet_config`` (seeded random weights); the text
    encoder and VAE are tiny placeholders (embeddings are given, latents returned)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from transformers import CLIPTokenizer

    from accel.pipelines.fashion_sd import FASHION_SD_DIR, noise_scheduler_config

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tokenizer = CLIPTokenizer.from_pretrained(FASHION_SD_DIR / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=tokenizer.vocab_size, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**noise_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of ``x`` against ``reference`` with the reference's range as the peak."""
    peak = (reference.max() - reference.min()).item()
    mse = (x.float() - reference.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


def run_variants(name: str, pipe: Any, variants: List[Variant], call: Callable[[], torch.Tensor],
                 repeats: int, workload: str, device: str = "cpu") -> List[Dict[str, Any]]:
    """Time the unpatched call and each variant interleaved; PSNR of each output against the unpatched one."""
    def switched(enable: Callable, disable: Callable) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            enable(pipe)
            try:
                return call()
            finally:
                disable(pipe)
        return run

    calls = {"unpatched": call}
    failures: Dict[str, str] = {}
    with torch.inference_mode():
        outputs = {"unpatched": call()}  # each variant's first run checks it works and gives its output
        for label, _, enable, disable in variants:
            try:  # a reference package that fails on current diffusers is reported, not fatal
                outputs[label] = switched(enable, disable)()
                calls[label] = switched(enable, disable)
            except Exception as error:  # noqa: BLE001
                failures[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
                print(f"  {label} failed: {failures[label]}", flush=True)
        print(f"{name} {workload}: {len(calls)} variants x {repeats} rounds", flush=True)
        timings = time_interleaved(calls, repeats=repeats, warmup=0, sync=device_sync(device))
    reference = outputs["unpatched"]
    rows = []
    for label, method, _, _ in [("unpatched", "-", None, None)] + variants:
        row = {"model": name, "workload": workload, "method": method, "settings": label}
        if label in failures:
            row.update(note=failures[label])
        else:
            row.update(s_per_image=timings[label].median_s, speedup=timings[label].speedup_over(timings["unpatched"]),
                       psnr=None if label == "unpatched" else latent_psnr(outputs[label], reference))
        rows.append(row)
    return rows


COLUMNS = [("workload", "workload", ""), ("method", "method", ""), ("settings", "settings", ""),
           ("s_per_image", "s/image", ".2f"), ("speedup", "speedup", ".2f"),
           ("psnr", "latent PSNR vs unpatched (dB)", ".1f"), ("note", "note", "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the loop workload")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the loop workload")
    parser.add_argument("--repeats-large", type=int, default=2, help="interleaved rounds of the single-call workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", default="loop,large", help="loop (64x64 scheduler loop), large (128x128 call)")
    parser.add_argument("--section", default=None,
                        help="section of benchmarks.md to write (default bench_diffusion, bench_diffusion_cuda on a GPU)")
    add_device_args(parser)
    parser.add_argument("--match", default=None, help="only the variants whose label matches this regex")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.section = args.section or device_section("bench_diffusion", checked_device(parser, args))
    started = time.perf_counter()
    config = SD15_UNET if args.config == "sd15" else TINY_UNET
    name = "SD-1.5 UNet" if args.config == "sd15" else "tiny UNet"
    dtype = getattr(torch, args.dtype)
    pipe = build_pipeline(config, args.seed).to(args.device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    embeds = torch.randn(1, 77, config["cross_attention_dim"], generator=gen).to(args.device, dtype)
    side = config["sample_size"]
    vae_scale = pipe.vae_scale_factor

    def loop() -> torch.Tensor:
        return pipe(prompt_embeds=embeds, num_inference_steps=args.steps, guidance_scale=1.0, height=side * vae_scale,
                    width=side * vae_scale, output_type="latent", generator=torch.Generator().manual_seed(1)).images

    # ToMe's ratios are compared with tomesd at 128x128 latents, where attention dominates; the loop
    # keeps the ToMe settings that compose with DeepCache (the whole run stays under 30 minutes).
    loop_variants = [ours("tome 0.5", tome=0.5), ours("tome downsample (ToDo) 2x", tome=accel.ToMe(mode="downsample"))]
    loop_variants += [ours(f"deepcache {n}", deepcache=n) for n in (2, 3, 5)]
    loop_variants += [ours("tome 0.5 + deepcache 3", tome=0.5, deepcache=3)]
    loop_variants += [v for v in (deepcache_variant(3), deepcache_variant(5)) if v]
    if args.match:
        import re

        loop_variants = [v for v in loop_variants if re.search(args.match, v[0])]
    workloads = args.workloads.split(",")
    rows: List[Dict[str, Any]] = []
    if "loop" in workloads:
        rows += run_variants(name, pipe, loop_variants, loop, args.repeats,
                             f"{args.steps}-step DDIM loop, {side}x{side} latents", args.device)

    large = torch.randn(1, 4, 2 * side, 2 * side, generator=gen).to(args.device, dtype)
    t = torch.tensor([500], device=args.device)

    def single() -> torch.Tensor:
        return pipe.unet(large, t, encoder_hidden_states=embeds).sample

    large_variants = [ours(f"tome {r}", tome=r) for r in (0.3, 0.5, 0.6)]
    large_variants += [ours("tome downsample (ToDo) 2x", tome=accel.ToMe(mode="downsample"))]
    large_variants += [ours("tome 0.5, attn+mlp, 2 levels",
                            tome=accel.ToMe(ratio=0.5, max_downsample=2, merge_mlp=True))]
    large_variants += [v for v in (tomesd_variant("tomesd 0.5", ratio=0.5),
                                   tomesd_variant("tomesd 0.5, attn+mlp, 2 levels", ratio=0.5, max_downsample=2,
                                                  merge_mlp=True)) if v]
    if args.match:
        large_variants = [v for v in large_variants if re.search(args.match, v[0])]
    if "large" in workloads:
        rows += run_variants(name, pipe, large_variants, single, args.repeats_large,
                             f"one UNet call, {2 * side}x{2 * side} latents", args.device)

    table = format_table(rows, COLUMNS)
    print(table)
    if args.no_write:
        return
    meta = run_meta(" ".join(["python scripts/bench_diffusion.py"] + sys.argv[1:]), args.seed, "diffusers",
                    device=args.device, dtype=args.dtype)
    machine = meta["machine"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.section}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    replace_section(args.out / "benchmarks.md", args.section, (
        f"Measured {meta['date']} on {machine}. {name} configuration, {args.dtype}, {meta['weights']} weights, batch 1 "
        f"without guidance; baseline = the unpatched UNet (SDPA attention); interleaved in one process, medians "
        f"of {args.repeats} (loop) and {args.repeats_large} (single call) rounds.\n\nCommand: `{meta['command']}` "
        f"(the whole run: {(time.perf_counter() - started) / 60:.1f} minutes)\n\n"
        f"{table}\n"))


if __name__ == "__main__":
    main()
