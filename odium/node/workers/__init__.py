"""The node's worker kit: worker processes tied to the node's life (``start``), the connection
to them (``channel``), what runs inside them (``code``, ``capture``, the session loop in
``session`` and the job loop in ``job``), and the node-side managers on top (``sessions``'
Executor for broadcasts, ``pool``'s JobPool for jobs).

The worker-side modules (and what they import) are preloaded by the node's fork server:
none of them imports zmq.
"""
