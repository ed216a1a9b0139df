"""Sparse training: the shared mask engine and the techniques built on it."""
