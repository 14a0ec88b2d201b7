"""The Feast store for a configuration: Redis online, Parquet offline, local registry."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from feast import FeatureStore, RepoConfig

from freshrec.config import Settings


def redis_connection_string(redis_url: str) -> str:
    """``redis://host:port/db`` as Feast writes it: ``host:port,db=N``."""
    url = urlparse(redis_url)
    db = (url.path or "/0").lstrip("/") or "0"
    extra = f",password={url.password}" if url.password else ""
    return f"{url.hostname or '127.0.0.1'}:{url.port or 6379},db={db}{extra}"


def repo_dir(settings: Settings) -> Path:
    return (settings.state_dir / "feast" / settings.feast_project).resolve()


def repo_config(settings: Settings) -> RepoConfig:
    path = repo_dir(settings)
    path.mkdir(parents=True, exist_ok=True)
    return RepoConfig(
        project=settings.feast_project,
        registry=str(path / "registry.db"),
        provider="local",
        online_store={"type": "redis", "connection_string": redis_connection_string(settings.redis_url)},
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=path,
    )


def feature_store(settings: Settings) -> FeatureStore:
    config = repo_config(settings)
    return FeatureStore(repo_path=str(config.repo_path), config=config)


def apply(settings: Settings) -> FeatureStore:
    """Register the entities, the feature views and the ranking service (what `feast apply` does
    for features/repo), and delete catalogue views whose definitions are gone."""
    from features.definitions import ENTITIES
    from features.dsl import load, load_ranking
    from features.registry import all_views, plan, ranking_service

    store = feature_store(settings)
    defs = load(settings.features)
    gone = plan(defs, store.list_feature_views()).removed
    store.apply([*ENTITIES, *all_views(settings, defs), ranking_service(load_ranking(settings.features))],
                objects_to_delete=[store.get_feature_view(n) for n in gone], partial=False)
    return store
