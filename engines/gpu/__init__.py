"""kvroute's GPU engine: a Llama-shaped model over a paged KV pool with Triton kernels, behind SGLang's API.

Modules: ``config`` (presets), ``model`` (weights, forward), ``kv_pool`` (pages), ``attention`` (step
metadata, torch and Triton backends), ``kernels`` (Triton), ``scheduler`` (continuous batching),
``engine`` (the ``EngineCore``), ``launch`` (N engines on one device), and for PD disaggregation
``bootstrap`` (the prefill's bootstrap server, the decode's client) and ``transfer`` (KV page transports).
Torch is imported by the modules that need it only, so the scheduler works (and is tested) without it.
"""
