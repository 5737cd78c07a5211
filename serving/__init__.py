"""Serving: continuous batching on the decode engine (scheduler) behind an HTTP API (app)."""

from serving.app import GenerationRequest, create_app
from serving.scheduler import Job, Scheduler

__all__ = ["GenerationRequest", "Job", "Scheduler", "create_app"]
