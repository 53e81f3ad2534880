"""The notions every algorithm shares, with no dependency on the rest of the package.

* :mod:`~composer_thaw.core.state`: an algorithm's ``repr``, its checkpoint state and the state's version;
* :mod:`~composer_thaw.core.validation`: :class:`~composer_thaw.core.validation.ConfigError`, option checks from type
  annotations and the one "did you mean" helper;
* :mod:`~composer_thaw.core.options`: options given as one configuration object or as its fields (``LoRAInject``'s
  ``LoRAConfig``);
* :mod:`~composer_thaw.core.registry`: the algorithms a recipe can name (ours, Composer's, third parties');
* :mod:`~composer_thaw.core.compatibility`: which algorithms combine, from what each one claims;
* :mod:`~composer_thaw.core.resume_checks` and :mod:`~composer_thaw.core.checkpoint_algorithms`: what a checkpoint
  resumes with;
* :mod:`~composer_thaw.core.types`: the optimizers an algorithm is given.

Modules here import nothing else of the package (the rule is tested: ``tests/test_layout.py``).
"""
