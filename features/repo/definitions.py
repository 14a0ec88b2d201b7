"""Feast CLI entry: the definitions live in features/definitions.py."""

from features.definitions import item, item_covisit, item_recent, user, user_recent

__all__ = ["item", "item_covisit", "item_recent", "user", "user_recent"]
