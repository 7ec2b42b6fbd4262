"""Vision input: ComfyUI images and files to pixels (images.py), video clips (video.py), the tensor-native
preprocessing (fast_preprocess.py), and the vision tower's attention and compile (attention.py, tower_compile.py)."""
