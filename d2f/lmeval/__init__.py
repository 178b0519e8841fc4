"""lm-eval integration of d2f: model, local tasks, code sanitiser, results table."""
