"""Data: the built-in data sets made from text that ships with Python (:mod:`~composer_thaw.datasets.builtin`) and
the user's own local files (:mod:`~composer_thaw.datasets.local_files`)."""
