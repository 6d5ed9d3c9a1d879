"""Evaluation: the metrics, the evaluator the modules delegate validation, test and predict to,
and the gradient diagnostics.

Imports training and the layers below it; never the modules or the CLI.
"""
