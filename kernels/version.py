"""Triton's (major, minor): register allocation differs between versions, so a few tiles and the
dense attention's address scheme are chosen by it (checked on 3.6 and 3.9; README, "Triton versions")."""
import triton

TRITON = tuple(int(v) for v in triton.__version__.split(".")[:2])
