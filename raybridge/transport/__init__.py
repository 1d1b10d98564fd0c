"""How the user's side reaches the cluster: runners (here, or the login node over SSH), byte-range
transfer, and the tunnel to the head's ports. runner.py imports neither yaml nor paramiko: the agents
use its LocalRunner inside the allocation."""
