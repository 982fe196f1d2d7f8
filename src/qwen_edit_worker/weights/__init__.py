"""The weights themselves: which variant, the Lightning LoRA, precision, and the bake-time preparation.

Why this exists as a subpackage: builder/bake.py runs in the image's build stage with only this
folder copied beside it (the Dockerfile's bake layer depends on nothing else of the worker, so a
change elsewhere never re-runs the 58 GB download).  It imports nothing from the rest of the package
(a test pins that): `variants` (the catalogue), `lightning` (the scheduler and fusing the LoRA),
`lightning_file` (the LoRA file read and checked against the transformer), `precision` (torchao
int8/fp8), `int8_mm` (torchao's int8 matmul without a host sync), `prepare` (fuse and quantise a
baked folder, streamed shard by shard: `stream` the per-shard work, `stream_plan` what will be
stored, `skeleton` the component on the meta device, `shards` safetensors read and written a tensor
at a time, `lora_stream` the Lightning LoRA a layer at a time), `fp8_cpu` (torchao's fp8 made on
the build machine's CPU), `errors`.
"""
