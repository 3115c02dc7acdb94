"""Readers for the paper's corpora in their original formats."""
