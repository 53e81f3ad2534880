"""The recipe application: a YAML recipe's schema and checks (:mod:`~composer_thaw.recipes.schema`), building what it
names (:mod:`~composer_thaw.recipes.building`), running it (:mod:`~composer_thaw.recipes.running`), its run folder's
files (:mod:`~composer_thaw.recipes.run_files`) and the memory estimate (:mod:`~composer_thaw.recipes.memory_estimate`).

Recipes sit above everything else: they may import any part of the package, and nothing but the CLI imports them.
"""
