"""Code that runs on the compute nodes, inside the allocation (started by the generated script)."""
