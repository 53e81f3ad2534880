"""Vision models and a synthetic image set for Composer's :class:`~composer.models.ComposerClassifier`.

torchvision's ResNet-18 and a small Vision Transformer, randomly initialized (nothing is downloaded), and
:class:`SyntheticImages`, a learnable image classification set made on the fly: each class has its own fixed
pattern, and every image is its class's pattern plus noise. Together they let every algorithm of this package be
tried on vision models in Composer's Trainer, and ``thaw run`` train a vision recipe (``model: {name: resnet18}``,
``data: {name: synthetic-images}``).

Example:
    >>> from composer import Trainer
    >>> from composer_thaw import LoRAInject
    >>> model = vision_classifier('vit', num_classes=4, image_size=32)
    >>> loader = synthetic_image_loader(64, batch_size=8, num_classes=4, image_size=32)
    >>> trainer = Trainer(model=model, train_dataloader=loader, max_duration='2ba', progress_bar=False,
    ...                   algorithms=[LoRAInject(r=4, target_modules=['conv_proj', 'mlp.0', 'mlp.3', 'head'])])
    >>> trainer.fit()
    >>> sorted({name.rpartition('.')[2] for name, p in model.named_parameters() if p.requires_grad})
    ['lora_A', 'lora_B']
"""

from __future__ import annotations

from typing import Literal, Optional, get_args

import torch
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    'IMAGE_SIZE',
    'SYNTHETIC_IMAGES',
    'VISION_MODELS',
    'SyntheticImages',
    'VisionModel',
    'check_vision_recipe',
    'synthetic_image_loader',
    'synthetic_image_loaders',
    'vision_classifier',
    'vision_model',
]

VisionModel = Literal['resnet18', 'vit']
VISION_MODELS: tuple[str, ...] = get_args(VisionModel)

SYNTHETIC_IMAGES = 'synthetic-images'
"""The recipe data name of :class:`SyntheticImages`."""

IMAGE_SIZE = 32
"""Side of a recipe's images (the ViT's patches are 8 x 8)."""

_RECIPE_CLASSES = 10
_RECIPE_SAMPLES = (512, 128)  # train, eval


def vision_model(
    name: VisionModel = 'resnet18',
    num_classes: int = 10,
    image_size: int = 32,
    patch_size: int = 8,
    num_layers: int = 2,
    hidden_dim: int = 32,
    num_heads: int = 2,
) -> nn.Module:
    """A randomly initialized torchvision classifier (initialization follows the current torch seed).

    Args:
        name: ``'resnet18'`` (torchvision's ``resnet18``, any image size >= 16) or ``'vit'`` (torchvision's
            ``VisionTransformer`` with ``num_layers`` encoder blocks of width ``hidden_dim``, ``num_heads`` heads,
            MLP width ``2 * hidden_dim``).
        num_classes: outputs of the head.
        image_size: the ViT's image side (a multiple of ``patch_size``).
    """
    import torchvision

    if name == 'resnet18':
        return torchvision.models.resnet18(num_classes=num_classes)
    if name == 'vit':
        if image_size % patch_size:
            raise ValueError(f'image_size={image_size} must be a multiple of patch_size={patch_size} for the ViT.')
        return torchvision.models.VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=2 * hidden_dim,
            num_classes=num_classes,
        )
    raise ValueError(f'name={name!r} is not a built-in vision model; choose one of {list(VISION_MODELS)}.')


def vision_classifier(
    name: VisionModel = 'resnet18', num_classes: int = 10, image_size: int = 32, **options: int
) -> ComposerClassifier:
    """:func:`vision_model` (``options``: the ViT's ``num_layers``, ``hidden_dim``, ``num_heads``) in Composer's
    ``ComposerClassifier`` (cross-entropy loss, accuracy metrics)."""
    return ComposerClassifier(vision_model(name, num_classes, image_size, **options), num_classes=num_classes)


class SyntheticImages(Dataset):
    """``num_samples`` RGB images of side ``image_size``, labelled ``0 .. num_classes - 1`` in turn.

    Class ``c`` has a fixed random pattern (smooth: drawn at a quarter of the resolution and upsampled); an image is
    its pattern plus Gaussian noise of standard deviation ``noise``. The same ``seed`` gives the same set; a set for
    evaluation uses the same patterns (``pattern_seed``) and another ``seed``.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 10,
        image_size: int = 32,
        noise: float = 0.5,
        seed: int = 0,
        pattern_seed: int = 1234,
    ):
        if num_samples < 1 or num_classes < 2 or image_size < 4:
            raise ValueError(
                f'num_samples={num_samples}, num_classes={num_classes}, image_size={image_size}: need at least one '
                'sample, two classes and images of side 4 or more.'
            )
        patterns = torch.randn(
            num_classes, 3, image_size // 4, image_size // 4, generator=torch.Generator().manual_seed(pattern_seed)
        )
        patterns = nn.functional.interpolate(patterns, size=(image_size, image_size), mode='bilinear')
        self.labels = torch.arange(num_samples) % num_classes
        noise_tensor = torch.randn(
            num_samples, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)
        )
        self.images = patterns[self.labels] + noise * noise_tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def synthetic_image_loader(
    num_samples: int,
    batch_size: int,
    num_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
    shuffle: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of ``(images, labels)`` batches over :class:`SyntheticImages` (what ``ComposerClassifier``
    takes)."""
    dataset = SyntheticImages(num_samples, num_classes, image_size, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)


def synthetic_image_loaders(
    train_batch_size: int,
    eval_batch_size: int,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
) -> tuple[DataLoader, DataLoader, int, float]:
    """A recipe's ``data: {name: synthetic-images}``: shuffled train batches (the last partial one dropped), eval
    batches over other draws of the same class patterns, the number of classes (10; 512 train and 128 eval images of
    side :data:`IMAGE_SIZE` unless ``max_*_samples`` say fewer) and the eval set's majority-class rate."""
    train_samples = min(_RECIPE_SAMPLES[0], max_train_samples or _RECIPE_SAMPLES[0])
    eval_samples = min(_RECIPE_SAMPLES[1], max_eval_samples or _RECIPE_SAMPLES[1])
    train = synthetic_image_loader(
        train_samples, train_batch_size, _RECIPE_CLASSES, IMAGE_SIZE, seed=0, shuffle=True, drop_last=True
    )
    eval_ = synthetic_image_loader(eval_samples, eval_batch_size, _RECIPE_CLASSES, IMAGE_SIZE, seed=1)
    labels = torch.arange(eval_samples) % _RECIPE_CLASSES
    majority = torch.bincount(labels, minlength=_RECIPE_CLASSES).max().item() / eval_samples
    return train, eval_, _RECIPE_CLASSES, majority


def check_vision_recipe(model_name: str, data_name: str) -> Optional[tuple[str, str, str]]:
    """``(key, value, problem)`` when a recipe pairs a vision model with text data or the other way round."""
    if model_name in VISION_MODELS and data_name != SYNTHETIC_IMAGES:
        return (
            'data.name',
            data_name,
            f'model {model_name!r} is an image classifier: use data.name {SYNTHETIC_IMAGES!r}.',
        )
    if data_name == SYNTHETIC_IMAGES and model_name not in VISION_MODELS:
        return (
            'model.name',
            model_name,
            f'data {SYNTHETIC_IMAGES!r} are images: use a vision model, one of {list(VISION_MODELS)}.',
        )
    return None
