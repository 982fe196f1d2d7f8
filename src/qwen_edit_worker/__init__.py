"""Qwen-Image-Edit on RunPod serverless: 3-step Lightning edits, timed and costed per job."""

__version__ = "0.1.0"
