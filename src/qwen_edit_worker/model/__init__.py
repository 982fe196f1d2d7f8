"""Assembling the pipeline at run time: where the weights come from, loading, attention, offload, compile.

`sources` (baked folder, RunPod's model cache, any folder), `sequence` (the one entry, `load_model`: the
load's steps in order), `choices` (what the load will do, decided before a weight is read), `loaded`
(LoadedModel, what a job reports of the model), `by_block` and `text_encoder` (components read on their own),
`attention` (the measured backend choice), `accel` (offload hooks and memory savers), `speedups`
(regional compile), `tiny` (the random-weight model built in code for tests and demos).
"""
