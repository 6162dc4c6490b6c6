"""Measurement primitives every wing shares: batched prediction, NME metrics, parity, timing.

Converters measure parity of what they wrote, validation scores artifacts on AFLW2000-3D, the NME-budget search
judges int8 variants on held-out crops: all with these, so a figure means the same wherever it is printed.
"""
