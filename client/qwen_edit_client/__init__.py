"""The `qwen-edit` client: edits through an endpoint, the cost of each image, and the endpoint plan.

Its own distribution (`qwen-edit-client`, in the repository's client/ folder) so it installs
without the worker's torch and diffusers.
"""
