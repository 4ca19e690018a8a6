"""The config values that name code: every `_target_`, and the settings passed to it.

Each group may name only the classes that belong there (`TARGETS`; why: `core.targets`), and
`check_targets` refuses any other in one line before any work, reading only strings.

`check_buildable` runs once Keras is imported and before any data is loaded: it builds each of
them (the optimizer, the enabled callbacks, the augmentation layers) and resolves the backbone's
constructor and the head's activation. A setting a class does not take (`+optimizer.foo=1`), a
module or activation that does not exist, is then one line too, not a FAILED run after the data
loaded.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from experiments.core.errors import ExperimentError

# The targets each group may name (full matches), and an example for the refusal.
TARGETS: dict[str, tuple[tuple[str, ...], str]] = {
    "optimizer": (
        (r"keras\.optimizers\.[A-Z]\w*", r"keras\.optimizers\.schedules\.[A-Z]\w*"),
        "a class of keras.optimizers (e.g. keras.optimizers.AdamW) or of its schedules",
    ),
    "trainer": (
        (r"keras\.callbacks\.[A-Z]\w*",),
        "a class of keras.callbacks (e.g. keras.callbacks.EarlyStopping)",
    ),
    "augmentation": (
        (r"keras\.layers\.[A-Z]\w*", r"experiments\.model\.augmentation\.[A-Z]\w*"),
        "a preprocessing layer of keras.layers (e.g. keras.layers.RandomFlip) or "
        "experiments.model.augmentation.RandomAffine",
    ),
}
# Layers that wrap code or a saved graph given as a value: they augment nothing.
CODE_LAYERS = ("Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer")


def check_targets(cfg: DictConfig) -> None:
    """Refuse any `_target_` its group does not allow, and any in a group that allows none."""
    from experiments.core.targets import check_targets as check_node

    config = OmegaConf.to_container(cfg, resolve=True)
    for group, node in config.items():
        if group != "hydra":
            allowed, example = TARGETS.get(group, ((), ""))
            check_node(node, group, allowed, example, denied=CODE_LAYERS)


def check_buildable(cfg: DictConfig) -> None:
    """Build what the config names, with Keras imported and before any data is loaded."""
    import keras

    _check_backbone(cfg.backbone)
    try:
        keras.activations.get(str(cfg.head.activation))
    except ValueError:
        raise ExperimentError(
            f"head.activation={cfg.head.activation} is not a Keras activation; e.g. relu, gelu, "
            f"swish or tanh"
        ) from None
    from experiments.training.strategies import make_optimizer

    _built(
        "optimizer",
        cfg.optimizer,
        lambda: make_optimizer(cfg.optimizer),
        keras.optimizers.Optimizer,
    )
    for name in ("early_stopping", "reduce_lr"):
        node = cfg.trainer[name]
        if node.enabled:
            settings = {k: v for k, v in node.items() if k != "enabled"}
            _built(
                f"trainer.{name}",
                node,
                lambda s=settings: _instantiate(s),
                keras.callbacks.Callback,
            )
    for index, layer in enumerate(cfg.augmentation.layers or []):
        _built(
            f"augmentation.layers[{index}]",
            layer,
            lambda n=layer: _instantiate(n),
            keras.layers.Layer,
        )


def _instantiate(node):
    from hydra.utils import instantiate

    return instantiate(node, _convert_="all")


def _built(key: str, node, build, kind: type) -> None:
    """Build `node` once: what it refuses, or a result that is not a `kind`, is one line."""
    target = node.get("_target_")
    try:
        built = build()
    except ExperimentError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the class raises on its settings
        reason = err.__cause__ or err  # Hydra's InstantiationException wraps the class's error
        first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason)
        raise ExperimentError(
            f"{key}: {target} cannot be built from its settings ({first}); fix or remove the "
            f"setting (python -m experiments.train --cfg job shows them)"
        ) from None
    if not isinstance(built, kind):
        raise ExperimentError(
            f"{key}._target_={target} builds a {type(built).__name__}, not a {kind.__name__}"
        )


def _check_backbone(backbone) -> None:
    import importlib

    try:
        module = importlib.import_module(f"keras.applications.{backbone.module}")
    except ImportError:
        import keras.applications

        known = sorted(n for n in dir(keras.applications) if n.islower() and n[0] != "_")
        raise ExperimentError(
            f"backbone.module={backbone.module} is not a module of keras.applications; use one "
            f"of {', '.join(known)}, or a preset (backbone=vgg16, resnet50, efficientnetb0, ...)"
        ) from None
    if not callable(getattr(module, str(backbone.constructor), None)) or not hasattr(
        module, "preprocess_input"
    ):
        offered = sorted(n for n in dir(module) if n[:1].isupper())
        raise ExperimentError(
            f"backbone.constructor={backbone.constructor} is not in keras.applications."
            f"{backbone.module}; it offers {', '.join(offered) or 'none'}"
        )
