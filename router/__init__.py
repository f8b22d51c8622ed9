"""kvroute's router: the KV-aware routing library (`Router`) and the HTTP proxy built on it."""

from router._version import __version__
from router.core import Router
from router.load import LoadTracker, Ticket, WorkerStats
from router.policies.base import NoWorkerAvailable

__all__ = ["LoadTracker", "NoWorkerAvailable", "Router", "Ticket", "WorkerStats", "__version__"]
