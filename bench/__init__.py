"""Benchmarks (pytest-benchmark), skipped unless asked for:

    pytest bench/ --benchmark --benchmark-json=/tmp/bench.json     # runs the suites and prints the markdown table
    python -m bench.report /tmp/bench.json --update BENCHMARKS.md  # keeps the latest table per device

Suites, each with one setup factory that the consistency tests (tests/bench) import too:
- test_train_step.py  ``train_step_case``: a full MeanFlow step, engines "func" / "dual" / "dual+kernels" and a
  plain flow-matching step, interleaved round by round (CPU and GPU).
- test_attention.py   ``attention_case``: attention_jvp kernel vs torch.func.jvp over SDPA MATH (GPU only).
- test_adaln.py       ``adaln_case``: the fused adaLN dual op vs its torch composites (GPU only).

Every suite times the reference and the project's path in the same run; the report's headline is their ratio.
``--gpu-check`` runs them with the quick profile of `make gpu-check` (bench.gpu_check, which validates a GPU machine).
"""
