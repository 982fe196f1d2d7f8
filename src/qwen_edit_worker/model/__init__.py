"""Assembling the pipeline at run time: where the weights come from, loading, attention, offload, compile.

`sources` (baked folder, RunPod's model cache, any folder), `loader` (the one entry, `load_model`),
`attention` (the measured backend choice), `accel` (offload hooks and memory savers), `speedups`
(regional compile), `tiny` (the random-weight model built in code for tests and demos).
"""
