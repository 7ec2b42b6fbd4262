"""Hash stage through the Run node: a new 1024x1024 ComfyUI IMAGE (an inference-mode tensor), then the very
same tensor again, three rounds on a tiny synthetic model (the hash stage does not depend on the model).

    .venv/bin/python docs/measurements/hash_through_node.py
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pack_path  # noqa: E402

pack_path.import_pack()
from qwenvl_fast import nodes  # noqa: E402
from qwenvl_fast.sources import synthetic  # noqa: E402

work = Path(tempfile.mkdtemp())
synthetic.save_synthetic("synthetic:tiny-qwen2.5-vl", work / "tiny")
os.environ["QWENVL_FAST_MODELS_DIR"] = str(work)
os.environ["QWENVL_FAST_CACHE_DIR"] = str(work / "cache")


def run(image: torch.Tensor) -> dict:
    out = nodes.QwenVLFastRun().run(
        model="tiny", quantization="none", attention_mode="auto", prompt="Hi", system_prompt="",
        image_quality="balanced", enable_image_cache=True, max_new_tokens=1, do_sample=False, temperature=0.7,
        top_p=0.9, top_k=50, repetition_penalty=1.0, seed=0, batch_mode="one prompt, all images",
        keep_model_loaded=True, image=image)
    return json.loads(out["result"][2])


run(torch.rand(1, 64, 64, 3))  # loads the model
for r in range(3):
    with torch.inference_mode():  # as ComfyUI's loaders make them
        image = torch.rand(1, 1024, 1024, 3, generator=torch.Generator().manual_seed(100 + r))
    new, again = run(image), run(image)
    print(f"round {r}: new image hash {new['stages']['hash'] * 1000:.2f} ms ({new['images'][0]['cache']}), "
          f"same tensor again {again['stages']['hash'] * 1000:.3f} ms ({again['images'][0]['cache']}), "
          f"ratio {again['stages']['hash'] / new['stages']['hash']:.3f}")
