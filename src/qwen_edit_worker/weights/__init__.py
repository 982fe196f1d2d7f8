"""The weights themselves: which variant, the Lightning LoRA, precision, and the bake-time preparation.

Why this exists as a subpackage: builder/bake.py runs in the image's build stage with only this
folder copied beside it (the Dockerfile's bake layer depends on nothing else of the worker, so a
change elsewhere never re-runs the 58 GB download).  It imports nothing from the rest of the package
(a test pins that): `variants` (the catalogue), `lightning` (reading and fusing the LoRA),
`precision` (torchao int8/fp8), `prepare` (fuse and quantise a baked folder), `errors`.
"""
