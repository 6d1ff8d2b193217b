"""Inference cost of AnyStory vs plain SDXL, and the simplified ReferenceNet (DESIGN §4).

On an SDXL-topology U-Net (SDXL's blocks and transformer depths; channel width divided
by --width-div so that it runs on a CPU), measured side by side in one run:
(a) simplified ReferenceNet forward (no cross-attention, stops after the last
    self-attention) vs the original design (a full U-Net copy run to the end);
(b) seconds per image of AnyStorySDXLPipeline with N = 0, 1, 2, 4 subjects vs
    StableDiffusionXLPipeline, and of diffusers' IP-Adapter (one image) on the same U-Net,
    same steps, resolution and CFG;
(c) peak resident memory of each run (every configuration runs in its own process).
Prints ratios against the baseline measured in the same run.

    python benchmarks/bench_inference.py --width-div 4 --size 512 --steps 4
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def sdxl_topology_components(width_div: int, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from anystory.models import sdxl_unet_config
    from anystory.testing import tiny_sdxl_components

    components = tiny_sdxl_components(seed)
    config = sdxl_unet_config()
    config["block_out_channels"] = [c // width_div for c in config["block_out_channels"]]
    config["norm_num_groups"] = math.gcd(32, config["block_out_channels"][0])  # SDXL's heads kept: head width / width_div
    config["cross_attention_dim"] = 32  # the tiny text encoders' width (16 + 16)
    config["addition_time_embed_dim"] = 8
    config["projection_class_embeddings_input_dim"] = 6 * 8 + 32
    torch.manual_seed(seed)
    components["unet"] = UNet2DConditionModel.from_config(config).eval()
    components["vae"] = AutoencoderKL(  # SDXL's 8x downsampling, so the latent grid is SDXL's
        block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
    ).eval()
    return components


def adapter_for(unet, reference_size: int, width_div: int):
    """The SDXL adapter's per-layer proportions at the benchmark's width (the router's
    width scales with the U-Net's: 256 at full SDXL width); the encoders' size does
    not matter here, they run once per call."""
    from anystory import AnyStoryAdapter

    return AnyStoryAdapter.from_unet(
        unet, image_embed_dim=24, num_subject_tokens=64, qformer_dim=64, qformer_heads=4,
        routing_dim=64, router_dim=256 // width_div, router_heads=4, reference_size=reference_size, router_trained=True,
    )


def subjects(count: int):
    from anystory import Subject

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        image = rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)
        mask = np.zeros((96, 80), dtype=bool)
        mask[10:80, 8 + i : 70] = True
        out.append(Subject(image, mask))
    return out


def time_reference_net(args) -> dict:
    """(a): simplified vs original ReferenceNet on the same input, best of `repeats`."""
    from anystory.models import ReferenceNet

    components = sdxl_topology_components(args.width_div)
    unet = components["unet"]
    net = ReferenceNet.from_unet(unet).eval()
    side = args.size // 8  # latent side of the reference
    latents, mask = torch.randn(1, 4, side, side), torch.ones(1, 1, side, side)
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    full_inputs = dict(
        encoder_hidden_states=torch.zeros(1, 1, unet.config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.zeros(1, text_dim), "time_ids": torch.zeros(1, 6)},
    )

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    with torch.no_grad():
        # interleaved, best of `repeats` each: robust to load that drifts during the run
        pairs = [
            (timed(lambda: unet(latents, 0, **full_inputs)), timed(lambda: net(latents, mask, (args.size, args.size))))
            for _ in range(args.repeats + 1)
        ][1:]
    original, simplified = (min(times) for times in zip(*pairs))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"original_s": original, "simplified_s": simplified, "unet_params": count(unet), "refnet_params": count(net)}


def load_random_ip_adapter(pipe, seed: int = 0) -> None:
    """diffusers' own IP-Adapter (4 image tokens, the lightest peer) with random weights,
    in the layout `load_ip_adapter` reads: one K/V pair per cross-attention layer."""
    g = torch.Generator().manual_seed(seed)
    unet, image_dim = pipe.unet, pipe.image_encoder.config.projection_dim
    cross = unet.config.cross_attention_dim
    layers = {}
    cross_attention_layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for index, name in enumerate(cross_attention_layers):
        width = unet.get_submodule(name.rsplit(".", 1)[0]).to_k.out_features
        layers[f"{2 * index + 1}.to_k_ip.weight"] = torch.randn(width, cross, generator=g) * cross**-0.5
        layers[f"{2 * index + 1}.to_v_ip.weight"] = torch.randn(width, cross, generator=g) * cross**-0.5
    image_proj = {
        "proj.weight": torch.randn(4 * cross, image_dim, generator=g) * image_dim**-0.5,
        "proj.bias": torch.zeros(4 * cross), "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross),
    }
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": layers}])
    pipe.set_ip_adapter_scale(1.0)


def time_generation(args, count: int | None) -> dict:
    """(b)+(c) for one configuration: None = plain StableDiffusionXLPipeline, -1 = IP-Adapter."""
    from diffusers import StableDiffusionXLPipeline

    from anystory import AnyStorySDXLPipeline

    components = sdxl_topology_components(args.width_div)
    if count is None:
        pipe = StableDiffusionXLPipeline(**components)
        extra = {}
    elif count < 0:
        pipe = StableDiffusionXLPipeline(**components)
        load_random_ip_adapter(pipe)
        extra = {"ip_adapter_image": subjects(1)[0].image}
    else:
        pipe = AnyStorySDXLPipeline(**components, adapter=adapter_for(components["unet"], args.size // 2, args.width_div))
        extra = {"subjects": subjects(count)} if count else {}
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red dog", num_inference_steps=args.steps, guidance_scale=7.5,
                height=args.size, width=args.size, output_type="latent", **extra)
    pipe(**{**call, "num_inference_steps": 1})  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        pipe(**call, generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_isolated(args, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--width-div", str(args.width_div), "--size", str(args.size),
           "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width-div", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="output side in pixels (references: half of it)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        result = time_reference_net(args) if args.child == "refnet" else time_generation(
            args, None if args.child == "plain" else int(args.child)
        )
        print(json.dumps(result))
        return

    ref = run_isolated(args, "refnet")
    print(f"SDXL topology, width / {args.width_div}, {args.size}px output, {args.steps} steps, CFG 7.5, {args.threads} thread(s)")
    print(f"(a) ReferenceNet: simplified {ref['simplified_s']:.3f}s vs original {ref['original_s']:.3f}s "
          f"-> ratio {ref['simplified_s'] / ref['original_s']:.2f} (paper 0.86); "
          f"params {ref['refnet_params'] / 1e6:.1f}M vs {ref['unet_params'] / 1e6:.1f}M")
    plain = run_isolated(args, "plain")
    print(f"(b,c) plain SDXL: {plain['seconds']:.2f} s/image, peak RSS {plain['peak_rss_mb']:.0f} MB")
    for label, child in [("IP-Adapter (1 image)", "-1")] + [(f"AnyStory N={n}", str(n)) for n in (0, 1, 2, 4)]:
        r = run_isolated(args, child)
        print(f"      {label}: {r['seconds']:.2f} s/image -> time ratio {r['seconds'] / plain['seconds']:.2f}, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (ratio {r['peak_rss_mb'] / plain['peak_rss_mb']:.2f})")


if __name__ == "__main__":
    main()
