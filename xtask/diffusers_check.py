"""Loads a Kiln-written model folder with diffusers and generates from it.

    cargo xtask py diffusers_check.py runs/tiny-shapes/model --prompt "a red circle on a blue background" --output out.png

What it checks, and fails on (exit status 1, with the reason):
- every component a `StableDiffusionPipeline` needs is there: `model_index.json`, `tokenizer/`
  (transformers' `CLIPTokenizer`), `text_encoder/` (`CLIPTextModel`), `unet/`, `vae/`,
  `scheduler/`;
- each model's weights load strictly: no missing, unexpected or mis-shaped keys (diffusers and
  transformers only warn about those, so the loading info is checked here);
- `StableDiffusionPipeline.from_pretrained(folder)` loads it, and generates an image of the
  model's default size with the folder's `kiln.json` steps and guidance (when present), which
  is finite and not constant.

The image is written to `--output` (a PNG) when given. Runs on the CPU in f32.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


class CheckFailed(Exception):
    """A folder that diffusers cannot load as Kiln means it to be."""


def _loading_problems(name: str, info: dict) -> list[str]:
    problems = []
    for key in ["missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"]:
        found = list(info.get(key) or [])
        if found:
            problems.append(f"{name}: {len(found)} {key.replace('_', ' ')}: {found[:5]}")
    return problems


def load_checked(folder: Path) -> StableDiffusionPipeline:
    """The folder as a diffusers pipeline, after checking every component loads strictly."""
    folder = Path(folder)
    for part in ["model_index.json", "tokenizer", "text_encoder", "unet", "vae", "scheduler"]:
        if not (folder / part).exists():
            raise CheckFailed(f"{folder} has no {part}: diffusers' StableDiffusionPipeline needs it")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    if index.get("_class_name") != "StableDiffusionPipeline":
        raise CheckFailed(f"model_index.json names {index.get('_class_name')!r}, not StableDiffusionPipeline")
    CLIPTokenizer.from_pretrained(folder / "tokenizer")
    problems = []
    _, info = CLIPTextModel.from_pretrained(folder / "text_encoder", output_loading_info=True)
    problems += _loading_problems("text_encoder", info)
    for name, cls in [("unet", UNet2DConditionModel), ("vae", AutoencoderKL)]:
        _, info = cls.from_pretrained(folder, subfolder=name, output_loading_info=True)
        problems += _loading_problems(name, info)
    if problems:
        raise CheckFailed("; ".join(problems))
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation_defaults(folder: Path) -> dict:
    """The folder's `kiln.json` (steps, guidance), or diffusers' pipeline defaults."""
    path = Path(folder) / "kiln.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"steps": 50, "guidance_scale": 7.5}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    try:
        pipe = load_checked(args.folder)
    except (CheckFailed, OSError, ValueError) as e:
        print(f"diffusers_check: {e}", file=sys.stderr)
        return 1
    defaults = generation_defaults(args.folder)
    steps = args.steps or defaults["steps"]
    guidance = args.guidance if args.guidance is not None else defaults["guidance_scale"]
    with torch.no_grad():
        image = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="np",
        ).images[0]
    if not np.isfinite(image).all() or float(image.std()) == 0.0:
        print("diffusers_check: the generated image is not finite or is constant", file=sys.stderr)
        return 1
    h, w, _ = image.shape
    print(
        f"diffusers_check: {args.folder} loads strictly in diffusers; generated {w}x{h} "
        f"({steps} steps, guidance {guidance}, {type(pipe.scheduler).__name__}) for {args.prompt!r}"
    )
    if args.output:
        from PIL import Image

        Image.fromarray((image * 255).round().astype(np.uint8)).save(args.output)
        print(f"diffusers_check: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
