"""The ComfyUI glue: model folders, interrupt and progress (glue.py) and ComfyUI's model manager (model_manager.py).
The only part of the pack that imports ComfyUI; everything else runs without it."""
