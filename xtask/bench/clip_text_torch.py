"""PyTorch side of `benches/text_encoder.rs`: transformers' CLIPTextModel at the SD 1.5 and 2.1
text-encoder sizes, batch 2 x 77 tokens, f32, on this machine's threads.

    cargo xtask py bench/clip_text_torch.py
"""

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(torch.get_num_threads())

for name in ["sd15", "sd21"]:
    cfg = json.loads((ROOT / f"crates/kiln-clip/configs/{name}_text_encoder.json").read_text())
    model = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    ids = torch.tensor([[(i * 77 + j) * 131 % 49406 for j in range(77)] for i in range(2)])
    with torch.inference_mode():
        for _ in range(2):
            model(input_ids=ids)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t)
    print(f"text_encoder/{name}/batch2: median {statistics.median(times) * 1e3:.1f} ms "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
