"""Quality and speed evaluation: datasets, prompts, metrics, method specs, runner, plots, report.

Data flow: datasets (raw files -> ``Example``) -> prompts (``Example`` -> ``Segments``) -> runner
(every method on the same segments: first-token logits, answer, stats; one JSONL row per
(example, method)) -> metrics -> summary -> report / plots. ``sweep`` measures TTFT against
prompt length. ``cli`` is ``cacheblend eval``.
"""
