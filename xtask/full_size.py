"""Full-size SD 1.5 and SD 2.1 models with random weights, for Kiln's full-size parity checks.

    cargo xtask py full_size.py make      # write .cache/full-size/ (about 11 GB, git-ignored)
    cargo xtask py full_size.py memory    # diffusers' peak RSS for one SD 1.5 UNet forward, 64x64, batch 2
    cargo xtask py full_size.py single-file   # .cache/full-size/<sd15|sd21>.safetensors (after make)
    cargo xtask py full_size.py make-sdxl     # .cache/full-size/sdxl/ and sdxl.safetensors (about 21 GB)

`make` builds the UNet, VAE and text encoder of each pipeline from its published `config.json`
(reproduced below, so no download is needed), randomises every parameter with a fixed seed, saves
each with `save_pretrained` into `.cache/full-size/<sd15|sd21>/<unet|vae|text_encoder>/`, and
writes next to it `io.safetensors`: inputs at a small spatial size and diffusers' outputs (f32, CPU),
plus `params.json` with diffusers' parameter counts. The Rust side reads them in the tests gated by
`KILN_FULL_SIZE=1`:

    KILN_FULL_SIZE=1 cargo test -p kiln-unet --test full_size -- --nocapture
    KILN_FULL_SIZE=1 cargo test -p kiln-vae --test full_size -- --nocapture
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from _common import ROOT, randomize_, save_json, save_tensors, seed_all, strip_volatile  # noqa: E402

CACHE = ROOT / ".cache" / "full-size"

UNET_SD15 = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
UNET_SD21 = dict(
    UNET_SD15,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    sample_size=96,
    use_linear_projection=True,
    upcast_attention=True,
)
VAE_SD15 = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAE_SD21 = dict(VAE_SD15, sample_size=768)
TEXT_SD15 = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
TEXT_SD21 = dict(
    TEXT_SD15,
    hidden_act="gelu",
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    projection_dim=512,
)

PIPELINES = {
    "sd15": (UNET_SD15, VAE_SD15, TEXT_SD15),
    "sd21": (UNET_SD21, VAE_SD21, TEXT_SD21),
}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def make_unet(out: Path, config: dict, seed: int) -> int:
    from diffusers import UNet2DConditionModel

    gen = seed_all(seed)
    unet = UNet2DConditionModel(**config).eval()
    randomize_(unet, seed + 1)
    unet.save_pretrained(out, safe_serialization=True)
    sample = torch.randn(1, 4, 16, 24, generator=gen)
    timestep = torch.tensor([421.0])
    context = torch.randn(1, 77, config["cross_attention_dim"], generator=gen)
    start = time.time()
    output = unet(sample, timestep, encoder_hidden_states=context).sample
    print(f"  unet forward {time.time() - start:.1f} s")
    save_tensors(
        out / "io.safetensors",
        {"sample": sample, "timestep": timestep, "encoder_hidden_states": context, "output": output},
    )
    return count(unet)


@torch.no_grad()
def make_vae(out: Path, config: dict, seed: int) -> int:
    from diffusers import AutoencoderKL

    gen = seed_all(seed)
    vae = AutoencoderKL(**config).eval()
    randomize_(vae, seed + 1)
    vae.save_pretrained(out, safe_serialization=True)
    image = torch.randn(1, 3, 64, 96, generator=gen)
    latent = torch.randn(1, 4, 16, 24, generator=gen)
    posterior = vae.encode(image).latent_dist
    decoded = vae.decode(latent).sample
    save_tensors(
        out / "io.safetensors",
        {"image": image, "mean": posterior.mean, "logvar": posterior.logvar, "latent": latent, "decoded": decoded},
    )
    return count(vae)


@torch.no_grad()
def make_text_encoder(out: Path, config: dict, seed: int) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel

    gen = seed_all(seed)
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    randomize_(model, seed + 1)
    model.save_pretrained(out, safe_serialization=True)
    ids = torch.randint(3, config["vocab_size"], (1, 77), generator=gen)
    ids[0, 0] = config["bos_token_id"]
    ids[0, 20:] = config["eos_token_id"]
    result = model(ids)
    save_tensors(
        out / "io.safetensors",
        {
            "input_ids": ids.to(torch.int64),
            "last_hidden_state": result.last_hidden_state,
            "pooler_output": result.pooler_output,
        },
    )
    return count(model)


def make() -> None:
    for p, (name, (unet, vae, text)) in enumerate(PIPELINES.items()):
        base = CACHE / name
        base.mkdir(parents=True, exist_ok=True)
        params = {}
        for i, (part, maker, config) in enumerate(
            [("unet", make_unet, unet), ("vae", make_vae, vae), ("text_encoder", make_text_encoder, text)]
        ):
            print(f"{name}/{part}")
            params[part] = maker(base / part, config, seed=1000 + 100 * p + 10 * i)
            strip_volatile(base / part)
        save_json(base / "params.json", params)
        print(f"{name}: {params}")


@torch.no_grad()
def memory() -> None:
    """One SD 1.5 UNet forward at latent 64x64, batch 2, random weights, without autograd, after a
    small warm-up forward (as Kiln's `unet_memory` example does): time and peak RSS."""
    from diffusers import UNet2DConditionModel

    gen = seed_all(0)
    unet = UNet2DConditionModel(**UNET_SD15).eval()
    sample = torch.randn(2, 4, 64, 64, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([1.0]), encoder_hidden_states=context[:1])
        start = time.time()
        unet(sample, torch.tensor([500.0, 500.0]), encoder_hidden_states=context)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": round(time.time() - start, 2), "peak_rss_gib": round(peak, 2)}))


def single_file() -> None:
    """Each pipeline of `make` as one single-file checkpoint in the original LDM layout, f32, as
    real SD 1.5 / 2.1 files are laid out (SD 2.1: OpenCLIP text encoder with its unused 24th
    block, `text_projection`, `logit_scale`; both: the DDPM buffers), written with
    `fixtures/single_file.py`'s converters. SD 2.1 takes SD 1.5's VAE weights (same shapes).
    `KILN_FULL_SIZE=1 cargo test -p kiln-pipeline --test full_size` loads them with inferred
    configs and compares against the components' `io.safetensors`."""
    from safetensors.torch import load_file, save_file
    from single_file import clip_to_ldm, clip_to_open_clip, ddpm_buffers, unet_to_ldm, vae_to_ldm

    for name, unet_cfg, open_clip in [("sd15", UNET_SD15, False), ("sd21", UNET_SD21, True)]:
        base = CACHE / name
        state = {}
        state.update(unet_to_ldm(load_file(base / "unet" / "diffusion_pytorch_model.safetensors"), unet_cfg))
        state.update(vae_to_ldm(load_file(CACHE / "sd15" / "vae" / "diffusion_pytorch_model.safetensors"), VAE_SD15))
        text = load_file(base / "text_encoder" / "model.safetensors")
        if open_clip:
            state.update(clip_to_open_clip(text, projection_dim=1024, extra_layers=1, seed=7))
        else:
            state.update(clip_to_ldm(text))
        state.update(ddpm_buffers())
        path = CACHE / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        print(f"{path}: {len(state)} tensors, {path.stat().st_size / 2**30:.2f} GiB")


def half_round_(module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


@torch.no_grad()
def make_sdxl() -> None:
    """SDXL 1.0 base at full size with random weights, from Kiln's `sdxl` preset (the configs
    `fixtures/sdxl_single_file.py` checks against diffusers): `.cache/full-size/sdxl/` with the
    UNet, VAE and both text encoders (f32 files holding f16-representable values), each with
    `io.safetensors` (the UNet's inputs with its added conditioning; the encoders' penultimate
    hidden states, as SDXL reads them, and the second one's `text_embeds`), `params.json`, and
    `.cache/full-size/sdxl.safetensors`: the same weights as one F16 single-file checkpoint in
    Stability's layout (the values are f16's, so it loads to exactly the folder's weights).
    `KILN_FULL_SIZE=1 cargo test -p kiln-unet -p kiln-clip -p kiln-pipeline --test full_size`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from sdxl_single_file import checkpoint_of
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = json.loads((ROOT / "crates/kiln-pipeline/presets/sdxl.json").read_text(encoding="utf-8"))
    cfg = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in preset.items() if isinstance(c, dict)}
    base = CACHE / "sdxl"
    base.mkdir(parents=True, exist_ok=True)
    params, halves = {}, {}

    print("sdxl/text encoders")
    texts = {}
    for i, (part, cls) in enumerate([("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)]):
        gen = seed_all(3000 + 10 * i)
        model = cls(CLIPTextConfig(**cfg[part])).eval()
        randomize_(model, 3001 + 10 * i)
        half_round_(model)
        model.save_pretrained(base / part, safe_serialization=True)
        ids = torch.randint(3, 49400, (1, 77), generator=gen)
        ids[0, 0] = 49406
        ids[0, 20:] = 49407
        out = model(ids, output_hidden_states=True)
        io = {"input_ids": ids.to(torch.int64), "penultimate": out.hidden_states[-2]}
        if part == "text_encoder_2":
            io["text_embeds"] = out.text_embeds
        save_tensors(base / part / "io.safetensors", io)
        params[part] = count(model)
        texts[part] = {k: v.half() for k, v in model.state_dict().items()}
        strip_volatile(base / part)
        del model

    print("sdxl/vae")
    gen = seed_all(3100)
    vae = AutoencoderKL(**cfg["vae"]).eval()
    randomize_(vae, 3101)
    half_round_(vae)
    vae.save_pretrained(base / "vae", safe_serialization=True)
    latent = torch.randn(1, 4, 16, 24, generator=gen)
    image = torch.randn(1, 3, 64, 96, generator=gen)
    save_tensors(
        base / "vae" / "io.safetensors",
        {"latent": latent, "decoded": vae.decode(latent).sample, "image": image,
         "mean": vae.encode(image).latent_dist.mean},
    )
    params["vae"] = count(vae)
    vae_half = {k: v.half() for k, v in vae.state_dict().items()}
    strip_volatile(base / "vae")
    del vae

    print("sdxl/unet")
    gen = seed_all(3200)
    unet = UNet2DConditionModel(**cfg["unet"]).eval()
    randomize_(unet, 3201)
    half_round_(unet)
    unet.save_pretrained(base / "unet", safe_serialization=True)
    sample = torch.randn(1, 4, 16, 24, generator=gen)
    timestep = torch.tensor([421.0])
    context = torch.randn(1, 77, 2048, generator=gen)
    text_embeds = torch.randn(1, 1280, generator=gen)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    start = time.time()
    output = unet(sample, timestep, encoder_hidden_states=context,
                  added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    print(f"  unet forward {time.time() - start:.1f} s")
    save_tensors(base / "unet" / "io.safetensors", {
        "sample": sample, "timestep": timestep, "encoder_hidden_states": context,
        "text_embeds": text_embeds, "time_ids": time_ids, "output": output,
    })
    params["unet"] = count(unet)
    unet_half = {k: v.half() for k, v in unet.state_dict().items()}
    unet_config = unet.config
    strip_volatile(base / "unet")
    del unet
    save_json(base / "params.json", params)
    print(f"sdxl: {params}")

    state = checkpoint_of(unet_half, unet_config, vae_half, dict(cfg["vae"]), texts["text_encoder"], texts["text_encoder_2"])
    path = CACHE / "sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    print(f"{path}: {len(state)} tensors, {path.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "make"
    {"make": make, "memory": memory, "single-file": single_file, "make-sdxl": make_sdxl}[command]()
