"""The local transformers backend: ``model.QwenVLModel`` orchestrates encoding (vision_encode.py), prompts
(prompting.py), generation (generation.py, decode_compile.py), prefix-KV reuse (prefix_cache.py, prefix_reuse.py),
Cancel (interrupt.py), memory (memory.py) and device/dtype/attention choices (runtime_choice.py)."""
