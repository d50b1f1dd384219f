"""PyTorch's side of `kiln bench`: the same workloads on the same model shapes through diffusers
and transformers, with the same options and the same JSON report as the last line of stdout.

    cargo xtask py bench/torch_bench.py unet --preset sd15 --height 512 --width 512

Presets are read from Kiln's own preset files (`crates/kiln-pipeline/presets/<name>.json`; `tiny`
from the embedded model's configs), so both sides build the same shapes. Weights are PyTorch's
default initialisation (speed does not depend on their values). 2 threads unless
`--threads` says otherwise; inference mode (no autograd). FLOPs are counted by PyTorch's
`FlopCounterMode` on a `meta` copy of the model, the rules Kiln's counters follow.
"""

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
SCHEDULERS = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}


def preset(name: str) -> dict:
    if name == "tiny":
        base = ROOT / "crates/kiln-pipeline/embedded/tiny-shapes"
        read = lambda p: json.loads((base / p).read_text(encoding="utf-8"))  # noqa: E731
        return dict(
            text_encoder=read("text_encoder/config.json"),
            unet=read("unet/config.json"),
            vae=read("vae/config.json"),
            scheduler=read("scheduler/scheduler_config.json"),
            pad_token="<|endoftext|>",
        )
    return json.loads((ROOT / f"crates/kiln-pipeline/presets/{name}.json").read_text(encoding="utf-8"))


def strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def tokenizer(pad_token: str) -> CLIPTokenizer:
    tmp = Path(tempfile.mkdtemp())
    for name in ["vocab.json", "merges.txt"]:
        shutil.copy(ROOT / "crates/kiln-clip/vocab" / name, tmp / name)
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token=pad_token, model_max_length=77)
    shutil.rmtree(tmp)
    return tok


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def flops_of(build, run, dtype=torch.float32) -> int:
    with torch.device("meta"):
        model = build().to(dtype)
    with FlopCounterMode(display=False) as counter:
        run(model, "meta")
    return int(counter.get_total_flops())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["unet", "vae-decode", "vae-encode", "text-encoder", "pipeline"])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    cfg = preset(args.preset)
    f = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    sample = cfg["unet"].get("sample_size", 64)
    height = args.height or sample * f
    width = args.width or sample * f
    batch = args.batch or (2 if args.workload == "unet" else 1)
    lh, lw, tokens = height // f, width // f, 77
    # SDXL: the two encoders' states side by side, a pooled embedding and six time ids
    hidden = cfg["text_encoder"]["hidden_size"] + cfg.get("text_encoder_2", {}).get("hidden_size", 0)
    xl = cfg["unet"].get("addition_embed_type") == "text_time"

    def added(n, device="cpu", dtype=torch.float32):
        if not xl:
            return None
        pooled = cfg["text_encoder_2"]["projection_dim"]
        ids = torch.tensor([[height, width, 0, 0, height, width]] * n, dtype=dtype, device=device)
        return {"text_embeds": torch.randn(n, pooled, device=device, dtype=dtype), "time_ids": ids}
    print(f"torch bench {args.workload} on {args.preset} ({args.dtype}): batch {batch}, {width}x{height}, {args.threads} thread(s)", file=sys.stderr)

    build_unet = lambda: UNet2DConditionModel(**strip(cfg["unet"])).eval()  # noqa: E731
    build_vae = lambda: AutoencoderKL(**strip(cfg["vae"])).eval()  # noqa: E731
    build_text = lambda: CLIPTextModel(CLIPTextConfig(**strip(cfg["text_encoder"]))).eval()  # noqa: E731
    build_text_2 = lambda: CLIPTextModelWithProjection(CLIPTextConfig(**strip(cfg["text_encoder_2"]))).eval()  # noqa: E731

    start = time.perf_counter()
    if args.workload == "unet":
        shape = (batch, cfg["unet"].get("in_channels", 4), lh, lw)

        def run(model, device="cpu"):
            x = torch.randn(shape, device=device, dtype=dtype)
            ctx = torch.randn(batch, tokens, hidden, device=device, dtype=dtype)
            t = torch.full((batch,), 500.0, device=device)
            return model(x, t, ctx, added_cond_kwargs=added(batch, device, dtype)).sample

        flops = flops_of(build_unet, run, dtype)
        model = build_unet().to(dtype)
        work = lambda: run(model)  # noqa: E731
    elif args.workload in ("vae-decode", "vae-encode"):
        decode = args.workload == "vae-decode"

        def run(model, device="cpu"):
            if decode:
                z = torch.randn(batch, cfg["vae"].get("latent_channels", 4), lh, lw, device=device, dtype=dtype)
                return model.decode(z).sample
            x = torch.randn(batch, cfg["vae"].get("in_channels", 3), height, width, device=device, dtype=dtype)
            return model.encode(x).latent_dist.mean

        flops = flops_of(build_vae, run, dtype)
        model = build_vae().to(dtype)
        work = lambda: run(model)  # noqa: E731
    elif args.workload == "text-encoder":
        ids = torch.tensor([[(i * 131 + b * 7) % 49000 + 1 for i in range(tokens)] for b in range(batch)])

        def run(model, device="cpu"):
            return model(ids.to(device))[0]

        flops = flops_of(build_text, run)
        model = build_text()
        work = lambda: run(model)  # noqa: E731
    else:
        scheduler = SCHEDULERS[cfg["scheduler"]["_class_name"]].from_config(cfg["scheduler"])
        unet = build_unet().to(dtype)
        if xl:
            pipe = StableDiffusionXLPipeline(
                vae=build_vae().to(dtype),
                text_encoder=build_text(),
                text_encoder_2=build_text_2(),
                tokenizer=tokenizer(cfg.get("pad_token", "<|endoftext|>")),
                tokenizer_2=tokenizer("!"),
                unet=unet,
                scheduler=scheduler,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=build_vae().to(dtype),
                text_encoder=build_text(),
                tokenizer=tokenizer(cfg.get("pad_token", "<|endoftext|>")),
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        # the same sum as `kiln bench pipeline`: 2 text encodings, `steps` guided UNet passes, 1 decode
        encode = lambda m, d: m(torch.zeros(1, tokens, dtype=torch.long, device=d))[0]  # noqa: E731
        text = flops_of(build_text, encode) + (flops_of(build_text_2, encode) if xl else 0)
        step = flops_of(
            build_unet,
            lambda m, d: m(
                torch.randn(2 * batch, 4, lh, lw, device=d), torch.full((2 * batch,), 500.0, device=d),
                torch.randn(2 * batch, tokens, hidden, device=d), added_cond_kwargs=added(2 * batch, d),
            ).sample,
        )
        dec = flops_of(build_vae, lambda m, d: m.decode(torch.randn(batch, 4, lh, lw, device=d)).sample)
        flops = 2 * text + args.steps * step + dec

        def work():
            return pipe(
                "a photo of an astronaut riding a horse on mars", negative_prompt="blurry", guidance_scale=7.5,
                num_inference_steps=args.steps, height=height, width=width, num_images_per_prompt=batch,
                generator=torch.Generator().manual_seed(0), output_type="np",
            ).images

    print(f"built in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    times = []
    with torch.inference_mode():
        for i in range(args.warmup):
            t0 = time.perf_counter()
            work()
            print(f"warm-up {i + 1}/{args.warmup}: {time.perf_counter() - t0:.3f} s", file=sys.stderr)
        for i in range(args.runs):
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
            print(f"run {i + 1}/{args.runs}: {times[-1]:.3f} s", file=sys.stderr)
    ordered = sorted(times)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    report = dict(
        workload=args.workload, model=args.preset, device="cpu", dtype=args.dtype, batch=batch, height=height,
        width=width, steps=args.steps if args.workload == "pipeline" else None, warmup=args.warmup, runs=args.runs,
        times_s=times, median_s=median, min_s=ordered[0], max_s=ordered[-1], flops=flops,
        gflops_per_s=flops / median / 1e9, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        threads=args.threads, cpu=cpu_name(), torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
