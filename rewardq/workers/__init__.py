"""Celery app, tasks, the batching engine, the reward model, trainer and scheduler."""
