"""Attention to the prompt: capturing one layer's attention during the current forward and reducing it to each
response token's attention score (`capture.py`)."""
