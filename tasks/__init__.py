"""Prefect tasks, each a thin wrapper over one conan_core library call.

Stage modules import their conan_core entry point inside the task body: loading the flow (for `prefect
deploy`, the UI's parameter schema, a worker's first look) then does not pull in torch, Ray or mteb.
"""
