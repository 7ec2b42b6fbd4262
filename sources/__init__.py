"""Where a model comes from: folders and families (models.py), downloads (download.py), the identity of its
vision weights (weights_identity.py), the embedded synthetic models (synthetic.py), transformers versions
(tf_compat.py)."""
