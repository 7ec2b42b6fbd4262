"""The vocabulary every part shares, importing nothing of the pack: options, request, result, the Backend
protocol (api.py), sampling settings (sampling.py), errors (errors.py) and the one LRU (lru.py)."""
