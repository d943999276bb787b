"""The pure core: the wire, keys, sealing, targeting, results, the job state machine. No
sockets, no database, no threads: everything here is tested without them."""
