"""The trainer: recipe, plan, model setup, loss, optimizer, the loop, checkpoints and metrics.

Names are imported lazily (PEP 562): ``qlora plan`` reads a recipe through
:mod:`qlora.train.recipe` and must not pay for importing the loop.
"""

_API = {
    "train": "qlora.train.loop",
    "TrainResult": "qlora.train.stops",
    "Recipe": "qlora.train.recipe",
    "load_recipe": "qlora.train.recipe",
    "recipe_from_dict": "qlora.train.recipe",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qlora.train' has no attribute {name!r}")
