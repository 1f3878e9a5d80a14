"""Downstream evaluation: tasks (multiple choice, cloze, rolling log-likelihood) and their scorer.

  task     task files (YAML/JSON naming a JSONL), their examples, metrics and the CORE aggregate
  scorer   batched, jitted log-likelihoods of continuations with lm-eval's tokenization rule
  shakespeare  the shipped tasks, built from the default experiment's held-out text
  harness  the lm-evaluation-harness model "jaxlm" (optional extra `eval`), built on the scorer
"""
