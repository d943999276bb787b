"""The Python API: ``Hub`` (this process is the hub) and ``Admin`` (a hub in another process)
over one interface, and the handles of queued jobs."""
