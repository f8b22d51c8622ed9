"""kvroute's router: the KV-aware routing library (`Router`) and the HTTP proxy built on it."""

from kvroute.router._version import __version__
from kvroute.router.core import Router
from kvroute.router.load import LoadTracker, Ticket, WorkerStats
from kvroute.router.policies.base import NoWorkerAvailable

__all__ = ["LoadTracker", "NoWorkerAvailable", "Router", "Ticket", "WorkerStats", "__version__"]
