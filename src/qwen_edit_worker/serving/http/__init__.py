"""The load-balancing front door (ENDPOINT_TYPE=lb): the worker's own HTTP server.

`server` (the aiohttp apps on PORT and PORT_HEALTH, `serve`), `routes` (thin route handlers),
`openai_images` (the OpenAI Images API's form to this worker's job input, and the answer back),
`admission` (how many requests a worker holds, and /ping's state), `errors` (the one OpenAI-shaped
error helper).
"""
