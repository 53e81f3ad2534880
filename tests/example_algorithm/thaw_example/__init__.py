"""FreezeEmbeddings: keep a model's token embeddings (and optionally its output embeddings) fixed.

The worked example of CONTRIBUTING.md: a composer-thaw algorithm in a package of its own, registered under the
``composer_thaw.algorithms`` entry point.

Example:
    >>> from thaw_example import FreezeEmbeddings
    >>> trainer = Trainer(model=model, train_dataloader=loader, max_duration='1ep',
    ...                   algorithms=[FreezeEmbeddings(which='input')])
"""

from thaw_example.freeze_embeddings import EXAMPLES, FreezeEmbeddings, apply_freeze_embeddings, embedding_parameters

__all__ = ['EXAMPLES', 'FreezeEmbeddings', 'apply_freeze_embeddings', 'embedding_parameters']
