"""The node side: joining a hub, heartbeats, running broadcasts and jobs in worker processes
tied to the node's life."""
