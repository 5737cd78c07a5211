"""Judging generated images: the judge classifier, Fréchet distances, Inception metrics with
local weights, the shapes prompt checker, the evaluation runner and its plots.

Above `sampling` in the import graph: it may import sampling, prior, tokenizer and training;
only scripts/ and bench/ import it.
"""
