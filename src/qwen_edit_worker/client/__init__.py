"""The `qwen-edit` command-line client: edits through an endpoint, and the cost of each image."""
