"""Serving jobs: the Worker (one job's story), the Editor on the GPU section, lazy loading, fitness, logs.

`worker` (input to output, every error shaped), `engine` (one pipeline call, timed by stage),
`gpu_section` (one job at a time on one thread), `lazy` (the background load), `fitness` (RunPod's
check before taking jobs), `local` (`python handler.py` runs), `logs`, and `http` (ENDPOINT_TYPE=lb:
the load-balancing endpoint's own HTTP server, the OpenAI Images API).
"""
