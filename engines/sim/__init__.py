"""Simulated SGLang engines: a timing model of continuous batching behind SGLang's API and KV events."""

from kvroute.engines.sim.engine import SimConfig, SimEngine
from kvroute.engines.sim.faults import FaultConfig
from kvroute.engines.sim.fleet import SimFleet
from kvroute.engines.sim.profiles import GpuProfile, get_profile

__all__ = ["FaultConfig", "GpuProfile", "SimConfig", "SimEngine", "SimFleet", "get_profile"]
