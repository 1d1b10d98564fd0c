"""The user's side: profile → spec → rendered script → submission, and the handle, status and tools
of a running cluster. Runs on the laptop or the login node."""
