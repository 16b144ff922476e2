"""The durable engine: runs workflow bodies, records steps, replays them on resume."""
