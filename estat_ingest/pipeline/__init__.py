"""The data path between the HTTP front and the sinks: queue → batcher → encoder → engine."""
