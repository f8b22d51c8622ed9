"""Simulated SGLang engines: a timing model of continuous batching behind SGLang's API and KV events."""

from engines.sim.engine import SimConfig, SimEngine
from engines.sim.faults import FaultConfig
from engines.sim.fleet import SimFleet
from engines.sim.profiles import GpuProfile, get_profile

__all__ = ["FaultConfig", "GpuProfile", "SimConfig", "SimEngine", "SimFleet", "get_profile"]
