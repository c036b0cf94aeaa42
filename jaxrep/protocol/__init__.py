"""The client: protocol state, the client's steps, the loop over sub-runs,
and replay of the detection step on recorded evidence."""

from jaxrep.protocol.detection import detection_step, medoid, replay
from jaxrep.protocol.loop import initial_state, run
from jaxrep.protocol.results import SimResult
from jaxrep.protocol.simulation import (METRICS, Simulation, load, resolve,
                                        setup, train_config, validate)
from jaxrep.protocol.state import ProtocolState
