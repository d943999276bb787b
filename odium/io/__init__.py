"""Input and output: the only place that makes ZeroMQ sockets (CURVE, ZAP) and the loop that
owns them."""
