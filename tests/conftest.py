"""Test-session set-up shared by every test module."""

import os

# OpenMP threads that spin-wait between parallel regions starve each other on
# a small shared machine (and the subprocesses some tests start). Must be set
# before torch loads its OpenMP runtime, which this module precedes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
