"""Queries, one module per table family: routers, services, the runner and the reconciler ask here.

Repositories read and write through the caller's session and only flush; the request dependency or the
task's session scope commits. Status changes are not here: they go through app/job_states.py.
"""
