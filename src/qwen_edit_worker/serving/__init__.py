"""Serving jobs: the Worker (one job's story), the Editor on the GPU section, lazy loading, logs.

`worker` (input to output, every error shaped), `engine` (one pipeline call, timed by stage),
`seeds` (a generator for every 64-bit seed), `gpu_section` (one job at a time on one thread), `lazy`
(the background load, and the parts it publishes before it ends), `early_text` (a cold job's prompt
encoded while the transformer is read), `local` (`python handler.py` runs), `logs`, and `http`
(ENDPOINT_TYPE=lb: the load-balancing endpoint's own HTTP server, the OpenAI Images API).
"""
