"""End-to-end benchmarks: every stage and transformers' own generation on the same
weights and workload, in one process run, so each figure is a side-by-side ratio.

    python -m benchmarks run --compare stage01_core,hf-generate --workload single --device cpu
"""
