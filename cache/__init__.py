"""The embedding cache's parts below its public face, ``embedding_cache.py``: the entry format, the disk tier
and the cache folder."""
