"""Composer callbacks of a run: the non-finite loss guard and the checkpoint taken on an interrupting signal."""
