"""Feast CLI entry (`feast apply`, `feast ui` in this directory): the built-in views live in
features/definitions.py, the catalogue's in the module FRESHREC_FEATURES names (default
features.catalog), each definition a view of its own name."""

import os

from features.definitions import category, item, item_covisit, item_recent, user, user_recent
from features.dsl import load
from features.registry import definition_views

# Feast finds views among a module's names.
globals().update({v.name: v for v in definition_views(load(os.environ.get("FRESHREC_FEATURES", "features.catalog")))})

__all__ = ["category", "item", "item_covisit", "item_recent", "user", "user_recent"]
