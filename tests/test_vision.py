"""The four algorithms on torchvision's ResNet-18 and a small ViT in Composer's Trainer (``ComposerClassifier``),
with the suite's invariants: during every step, each parameter that does not require grad stays bit-identical, has
no gradient and no optimizer state. LayerFreezing freezes units bottom-up, HiFT trains one unit per step, LoRA adapts
``Conv2d`` and ``Linear`` layers (its adapter loads in PEFT with equal outputs and merged weights), RegexFreeze
trains only what its patterns name.

Units as discovered today (``split_into_units``): ViT: ``embeddings`` (class token, patch convolution, position
embedding), ``encoder.layers.encoder_layer_0``, ``..._1``, ``encoder.ln``, ``heads``. ResNet-18: only the last stage's
blocks are found (``layer4.0``, ``layer4.1``); ``conv1``, ``bn1`` and ``layer1`` .. ``layer3`` all land in
``embeddings``, then ``fc``. Expected once every stack counts: ``embeddings`` (``conv1``, ``bn1``), the eight blocks
``layer1.0`` .. ``layer4.1`` in order, ``fc``. The tests below hold either way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from composer import Callback, Trainer
from composer.core import State
from composer.loggers import Logger

from composer_thaw.hift_rotation import HiFTRotation
from composer_thaw.layer_freezing import LayerFreezing
from composer_thaw.lora_inject import LoRAInject, merge_adapters, save_adapter
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.models.vision import SyntheticImages, synthetic_image_loader, vision_classifier, vision_model
from composer_thaw.regex_freeze import RegexFreeze
from composer_thaw.utils.parameter_selection import user_module

MODELS = ('resnet18', 'vit')
LORA_TARGETS = {'resnet18': ['conv1', 'conv2', 'fc'], 'vit': ['conv_proj', 'mlp.0', 'mlp.3', 'head']}
# ResNet-18's widths are fixed (64 .. 512 channels): small images and batches keep it cheap.
IMAGE_SIZE, BATCH_SIZE = {'resnet18': 16, 'vit': 32}, {'resnet18': 4, 'vit': 8}
REGEX_TRAINABLE = {'resnet18': ['fc', 'layer1.1'], 'vit': ['heads', 'encoder.layers.encoder_layer_1']}


class FrozenStaysFrozen(Callback):
    """At every step: what does not require grad when the step starts is unchanged at its end, has no gradient and
    no optimizer state. Records, per step, the names of the parameters that changed.

    Parameters are copied once, then again only after a step in which they trained (frozen ones cannot change
    between steps: a change would show at the end of the step after it)."""

    def __init__(self) -> None:
        self.changed: list[set[str]] = []
        self.frozen_checked = 0
        self._copies: dict[str, torch.Tensor] = {}
        self._trainable: set[str] = set()

    def batch_start(self, state: State, logger: Logger) -> None:
        self._trainable = set()
        for name, param in user_module(state.model).named_parameters():
            if param.requires_grad:
                self._trainable.add(name)
            if name not in self._copies:
                self._copies[name] = param.detach().clone()

    def batch_end(self, state: State, logger: Logger) -> None:
        params = dict(user_module(state.model).named_parameters())
        optimizer_state = state.optimizers[0].state
        changed = set()
        for name, param in params.items():
            if name in self._trainable:
                if not torch.equal(param, self._copies[name]):
                    changed.add(name)
                    self._copies[name] = param.detach().clone()
                continue
            assert torch.equal(param, self._copies[name]), f'{name} moved although frozen'
            assert param.grad is None or not param.grad.any(), f'{name} has a gradient although frozen'
            assert param not in optimizer_state, f'{name} has optimizer state although frozen'
            self.frozen_checked += 1
        self.changed.append(changed)


def _train(name: str, algorithms: list, batches: int, lr: float = 1e-3):
    torch.manual_seed(0)
    model = vision_classifier(name, num_classes=4, image_size=IMAGE_SIZE[name])
    watcher = FrozenStaysFrozen()
    batch_size = BATCH_SIZE[name]
    trainer = Trainer(
        model=model,
        train_dataloader=synthetic_image_loader(
            batch_size * batches, batch_size=batch_size, num_classes=4, image_size=IMAGE_SIZE[name]
        ),
        optimizers=torch.optim.AdamW(model.parameters(), lr=lr),
        max_duration=f'{batches}ba',
        algorithms=algorithms,
        callbacks=[watcher],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        seed=17,
    )
    trainer.fit()
    return trainer, watcher


@pytest.mark.parametrize('name', MODELS)
def test_layer_freezing_freezes_units_bottom_up(name):
    algorithm = LayerFreezing(freeze_start=0.0, freeze_level=1.0, granularity='block', interval=1)
    trainer, watcher = _train(name, [algorithm], batches=2)
    units = [unit.name for unit in algorithm._units]
    assert len(units) >= 3
    root = user_module(trainer.state.model)
    frozen = {n for n, p in root.named_parameters() if not p.requires_grad}
    assert frozen and watcher.frozen_checked > 0
    # frozen parameters are those of a prefix of the units, in order
    frozen_units = [unit for unit in algorithm._units if set(unit.parameter_names) <= frozen]
    assert [u.name for u in frozen_units] == units[: len(frozen_units)]
    assert frozen == {p for unit in frozen_units for p in unit.parameter_names}


@pytest.mark.parametrize('name', MODELS)
def test_hift_trains_one_group_per_step_and_each_unit_in_a_pass(name):
    # One pass over ResNet-18's 10 units (stem, 8 blocks, fc) in groups of 2 takes 5 steps, as over the ViT's 5.
    group_size = {'resnet18': 2, 'vit': 1}[name]
    hift = HiFTRotation(group_size=group_size)
    _, watcher = _train(name, [hift], batches=5)
    assert hift.rotation is not None
    plan = hift.rotation.plan
    assert len(plan.units) > 2 and len(watcher.changed) == -(-len(plan.units) // group_size)
    trained_units: list[int] = []
    for step, changed in enumerate(watcher.changed):
        owners = {i for i, unit in enumerate(plan.units) if set(unit.parameter_names) & changed}
        assert 1 <= len(owners) <= group_size, f'step {step} changed parameters of units {owners}'
        assert not owners & set(trained_units), f'step {step} trained units {owners} again within one pass'
        trained_units += owners
    assert sorted(trained_units) == list(range(len(plan.units)))
    assert watcher.frozen_checked > 0


@pytest.fixture(scope='module', params=MODELS)
def lora_run(request):
    name = request.param
    trainer, watcher = _train(name, [LoRAInject(r=2, lora_alpha=4, target_modules=LORA_TARGETS[name])], 2, lr=1e-2)
    return name, trainer, watcher


def test_lora_adapts_conv2d_and_linear_and_keeps_the_base(lora_run):
    _, trainer, watcher = lora_run
    root = user_module(trainer.state.model)
    layers = adapter_layers(root)
    assert {type(layer.base_layer).__name__ for layer in layers.values()} >= {'Conv2d', 'Linear'}
    adapters = {n for n, p in root.named_parameters() if p.requires_grad}
    assert adapters and all('.lora_' in n for n in adapters)
    assert all(changed <= adapters for changed in watcher.changed)
    assert any(n.endswith('lora_B') for n in watcher.changed[-1])
    optimizer_params = {id(p) for group in trainer.state.optimizers[0].param_groups for p in group['params']}
    assert optimizer_params == {id(p) for n, p in root.named_parameters() if n in adapters}


# The ViT's patch embedding is a Conv2d and its MLP Linear: one model covers both, at a tenth of ResNet's cost.
@pytest.mark.parametrize('lora_run', ['vit'], indirect=True)
def test_the_vision_lora_adapter_loads_in_peft_with_equal_outputs_and_merged_weights(lora_run, tmp_path):
    import peft

    name, trainer, _ = lora_run
    ours = copy.deepcopy(user_module(trainer.state.model)).eval()
    save_adapter(ours, tmp_path)
    torch.manual_seed(0)
    base = vision_model(name, num_classes=4).eval()  # the Trainer's initial weights: the same seed
    base.load_state_dict({k.replace('.base_layer', ''): v for k, v in ours.state_dict().items() if 'lora_' not in k})
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    images = SyntheticImages(4, num_classes=4, image_size=32, seed=3).images
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), ours(images), atol=1e-5, rtol=1e-4)
        merge_adapters(ours)
        merged = theirs.merge_and_unload().state_dict()
        for key, value in ours.state_dict().items():
            if 'lora_' not in key:
                torch.testing.assert_close(value, merged[key.replace('.base_layer', '')], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_regex_freeze_trains_only_what_its_patterns_name(name):
    patterns = REGEX_TRAINABLE[name]
    trainer, watcher = _train(name, [RegexFreeze(trainable=patterns)], batches=2)
    root = user_module(trainer.state.model)
    trainable = {n for n, p in root.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in root.named_parameters() if n.startswith(tuple(f'{p}.' for p in patterns))}
    assert all(changed <= trainable for changed in watcher.changed) and watcher.changed[-1]
    assert watcher.frozen_checked > 0


def test_a_recipe_pairs_vision_models_with_images_only():
    from support import REPO

    from composer_thaw.core.validation import ConfigError
    from composer_thaw.recipes.schema import load_recipe

    recipe = REPO / 'yamls/lora_vit_images.yaml'
    assert load_recipe(recipe, ['model.name=resnet18']).model.name == 'resnet18'
    with pytest.raises(ConfigError, match=r"data.name = 'stdlib-docs': model 'vit' is an image classifier"):
        load_recipe(recipe, ['data.name=stdlib-docs'])
    with pytest.raises(ConfigError, match=r"model.name = 'minilm': data 'synthetic-images' are images"):
        load_recipe(recipe, ['model.name=minilm'])


def test_synthetic_images_are_deterministic_and_labelled_in_turn():
    first, again = SyntheticImages(12, num_classes=4, seed=0), SyntheticImages(12, num_classes=4, seed=0)
    other = SyntheticImages(12, num_classes=4, seed=1)
    assert torch.equal(first.images, again.images) and not torch.equal(first.images, other.images)
    assert first.labels.tolist() == [0, 1, 2, 3] * 3 and first.images.shape == (12, 3, 32, 32)
    # the same class pattern under other noise: images of one class are closer to each other than to other classes
    means = torch.stack([first.images[first.labels == c].mean(0) for c in range(4)])
    distances = torch.cdist(other.images.flatten(1), means.flatten(1))
    assert (distances.argmin(1) == other.labels).all()
    with pytest.raises(ValueError, match='two classes'):
        SyntheticImages(4, num_classes=1)
    with pytest.raises(ValueError, match="name='vgg' is not a built-in vision model"):
        vision_model('vgg')  # type: ignore[arg-type]


def test_the_out_proj_multihead_attention_bypasses_is_refused_and_left_out_of_all_linear():
    from composer_thaw.lora_inject import apply_lora

    model = vision_model('vit', num_classes=4)
    with pytest.raises(ValueError, match=r"'encoder.layers.encoder_layer_0.self_attention.out_proj' is the output"):
        apply_lora(model, r=2, target_modules=['out_proj', 'mlp.0'])
    assert not adapter_layers(model) and all(p.requires_grad for p in model.parameters())
    summary = apply_lora(model, r=2, target_modules='all-linear')
    assert summary.adapted and not any(name.endswith('out_proj') for name in summary.adapted)
