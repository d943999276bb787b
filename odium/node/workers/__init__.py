"""The node's worker kit: worker processes tied to the node's life (``start``, ``zygote``),
the connection to them (``channel``), what runs inside them (``code``, ``capture``, the
session loop in ``session`` and the job loop in ``job``), and the node-side managers on top
(``sessions``' Executor for broadcasts, ``pool``'s JobPool for jobs).

Workers are forked by the node's zygote (``zygote``), which has the worker-side modules
imported already.
"""
